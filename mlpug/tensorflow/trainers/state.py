"""The state of the TensorFlow ``DefaultTrainer`` (a mixin): weights, optimizer variables and the Keras seed
generators, as numpy arrays, and a state kept until the models can be built."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mlpug.tensorflow.trainers.checks import check_arrays
from mlpug.tensorflow.trainers.seed_generators import (
    find_seed_generator_variables,
    get_seed_generator_states,
    set_seed_generator_states,
)

_log = logging.getLogger("mlpug.tensorflow.DefaultTrainer")


class KerasTrainerState:
    """``get_state`` / ``set_state`` of the TensorFlow ``DefaultTrainer``."""

    # provided by the DefaultTrainer
    model_components: dict
    optimizers: dict
    training_model: Any
    _pending_state: Any  # a state given to set_state before the models could be built
    _build: Any  # () -> bool: whether the models and optimizers are built (building them if it can)
    _check_state_names: Any  # (state) -> None, raises ValueError

    def get_state(self) -> dict:
        """Weights, optimizer variables and seed generator states as numpy arrays (copies, made once).

        Returns:
            ``{"model_components": {name: [np.ndarray, ...]}, "optimizers": {name: [np.ndarray, ...]},
            "seed_generators": [np.ndarray, ...]}``: per component its ``get_weights()`` (trainable and
            non-trainable, in Keras' order); per optimizer the values of ``optimizer.variables`` (iteration
            count, learning rate, slots, in creation order); the states (int64, shape ``(2,)``) of the Keras seed
            generators of the model components and then of the training model (``Dropout`` etc.; each once, in
            the order of ``.variables``), which ``get_weights()`` leaves out. When the trainer cannot be built
            yet (see :meth:`_build`), a state given to :meth:`set_state` and not applied yet is returned, else
            what exists so far.
        """
        self._build()
        if self._pending_state is not None:
            return self._pending_state
        return {
            "model_components": {name: component.get_weights() for name, component in self.model_components.items()},
            "optimizers": {
                name: [np.asarray(variable.numpy()) for variable in optimizer.variables]
                for name, optimizer in self.optimizers.items()
            },
            "seed_generators": get_seed_generator_states(self._seed_generator_variables()),
        }

    def _seed_generator_variables(self) -> list:
        """The seed generator state variables of the model components, then of the training model."""
        return find_seed_generator_variables([*self.model_components.values(), self.training_model])

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned.

        Unbuilt model components are built first (from ``batch_data_signature`` when given); when they cannot be
        built without data, the state is kept and applied right after building, before the first update. A
        state without ``"seed_generators"`` (taken before they were part of it) leaves the seed generators as
        they are.

        Raises:
            ValueError: Names, numbers of arrays or shapes in ``state`` do not match the trainer's (raised when
                the state is applied: at once, or on building when it is pending).
        """
        self._check_state_names(state)
        if self._build():
            self._load_state(state)
        else:
            _log.debug("Model not built yet: the state is applied when it is built (before the first update)")
            self._pending_state = state

    def _load_state(self, state: dict) -> None:
        for name, component in self.model_components.items():
            weights = state["model_components"][name]
            check_arrays(f"model component {name!r}", component.weights, weights)
            component.set_weights(weights)
        for name, optimizer in self.optimizers.items():
            values = state["optimizers"][name]
            check_arrays(f"optimizer {name!r}", optimizer.variables, values)
            for variable, value in zip(optimizer.variables, values):
                variable.assign(value)
        if state.get("seed_generators") is not None:
            set_seed_generator_states(self._seed_generator_variables(), state["seed_generators"])
