"""The state of the TensorFlow ``DefaultTrainer`` (:class:`KerasTrainerState`): weights, optimizer variables and
the Keras seed generators, as numpy arrays, and a state kept until the models can be built."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np
import tensorflow as tf

from mlpug.tensorflow.trainers.checks import check_arrays
from mlpug.tensorflow.trainers.seed_generators import (
    find_seed_generator_variables,
    get_seed_generator_states,
    set_seed_generator_states,
)


class KerasTrainerState:
    """Reads and loads the state of model components, optimizers and seed generators; keeps a state to load later.

    The trainer says whether its models are built (only built models and optimizers have all their variables):
    a state given before that is kept (:attr:`pending`) and loaded by :meth:`load_pending` once they are.

    Args:
        model_components: The model components by name (Keras layers).
        optimizers: The optimizers by name (as the trainer steps them: wrapped for loss scaling where it is used).

    Attributes:
        pending: A state given to :meth:`set_state` before the models were built, not loaded yet; or None.
    """

    def __init__(
        self,
        model_components: Mapping[str, tf.keras.layers.Layer],
        optimizers: Mapping[str, tf.keras.optimizers.Optimizer],
    ):
        self.model_components = model_components
        self.optimizers = optimizers
        self.pending: Optional[dict] = None

    def get_state(self, training_model: Optional[tf.keras.layers.Layer]) -> dict:
        """The state (see ``DefaultTrainer.get_state``): :attr:`pending` when there is one, else the arrays of the
        model components, optimizers and the seed generators of the components and ``training_model``."""
        if self.pending is not None:
            return self.pending
        return {
            "model_components": {name: component.get_weights() for name, component in self.model_components.items()},
            "optimizers": {
                name: [np.asarray(variable.numpy()) for variable in optimizer.variables]
                for name, optimizer in self.optimizers.items()
            },
            "seed_generators": get_seed_generator_states(self._seed_generator_variables(training_model)),
        }

    def set_state(self, state: dict, training_model: Optional[tf.keras.layers.Layer], built: bool) -> None:
        """Load ``state`` when the models are ``built``, else keep it as :attr:`pending`.

        Raises:
            ValueError: Numbers of arrays or shapes in ``state`` do not match (see :meth:`load`).
        """
        if built:
            self.load(state, training_model)
        else:
            self.pending = state

    def load_pending(self, training_model: Optional[tf.keras.layers.Layer]) -> None:
        """Load :attr:`pending`, if any (the models were just built), and drop it."""
        if self.pending is not None:
            state, self.pending = self.pending, None
            self.load(state, training_model)

    def load(self, state: dict, training_model: Optional[tf.keras.layers.Layer]) -> None:
        """Assign the arrays of ``state`` to the variables; a state without ``"seed_generators"`` leaves them.

        Raises:
            ValueError: A component's or optimizer's number of arrays or their shapes differ from its variables'.
        """
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
            set_seed_generator_states(self._seed_generator_variables(training_model), state["seed_generators"])

    def _seed_generator_variables(self, training_model: Optional[tf.keras.layers.Layer]) -> list:
        """The seed generator state variables of the model components, then of the training model."""
        return find_seed_generator_variables([*self.model_components.values(), training_model])
