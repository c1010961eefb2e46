"""JAX :class:`~mlpug.trainers.snapshot.EvaluationSnapshot`: copies of the training model's values on the device,
evaluated with the trainer's compiled evaluation step.

The compiled training step donates the buffers of the variables' arrays (see :mod:`mlpug.jax.trainers.trainer`):
the arrays a snapshot would merely reference are deleted by the next step (``RuntimeError: Array has been
deleted``). So :meth:`JaxEvaluationSnapshot.capture` copies them: one ``jnp.array(value, copy=True)`` per variable,
dispatched on the training thread, on the device where the value lives (its sharding kept), with no host transfer
and no wait for the device (JAX orders the copy before the next step reuses the donated buffer). The worker thread
then runs the trainer's evaluation step function over the copies (compiled with ``jax.jit``, the same executable as
a synchronous evaluation of a batch of that signature), so the same weights give the same numbers. A dataset
evaluation (:meth:`JaxEvaluationSnapshot.evaluate_losses`, what the ``MetricEvaluator`` calls) stacks up to
``evaluation_steps_per_execution`` batches into one compiled call, as the trainer's own ``evaluate_losses`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax import nnx

from mlpug.jax.checkpointing import to_numpy
from mlpug.jax.trainers.compilation import copy_arrays
from mlpug.jax.trainers.component_state import component_updates, weight_variables
from mlpug.jax.trainers.live_model import LiveModel
from mlpug.trainers.snapshot import EvaluationSnapshot
from mlpug.trainers.trainer import ModelOutputs

EvaluateValues = Callable[[Sequence[Sequence[Any]], Sequence[Any], Any, Any, bool], ModelOutputs]
"""``evaluate(trainable, rest, batch, evaluate_settings, inference_mode)``: the trainer's compiled evaluation of the
training model with the given values (``trainable``: per optimizer a list of arrays; ``rest``: the other variables'
values, in the order of :class:`~mlpug.jax.trainers.live_model.LiveModel`), its outputs normalised."""

EvaluateValuesOfBatches = Callable[
    [Sequence[Sequence[Any]], Sequence[Any], Sequence[Any], Any, bool], list[ModelOutputs]
]
"""``evaluate(trainable, rest, batches, evaluate_settings, inference_mode)``: :data:`EvaluateValues` of each batch,
in order, the trainer's ``evaluation_steps_per_execution`` batches of the same shapes in one compiled call."""


class JaxEvaluationSnapshot(EvaluationSnapshot):
    """A frozen copy of the values of a JAX ``DefaultTrainer``'s training model (module docstring).

    The trainer creates it (``DefaultTrainer.evaluation_snapshot()``) once its training model is set. It holds no
    values until :meth:`capture` or :meth:`set_model_components_state`.

    Args:
        live: The trainer's :class:`~mlpug.jax.trainers.live_model.LiveModel` (the training model's variables).
        evaluate: The trainer's evaluation over given values (see :data:`EvaluateValues`).
        model_components: The trainer's model components by name (``nnx.Module`` s inside the training model);
            :meth:`model_components_state` gives their weights in the form of ``trainer.get_state()``.
        evaluate_batches: The trainer's evaluation of several batches over given values (see
            :data:`EvaluateValuesOfBatches`), for :meth:`evaluate_losses`.

    Raises:
        ValueError: A model component has a variable that is not part of the training model.
    """

    def __init__(
        self,
        live: LiveModel,
        evaluate: EvaluateValues,
        model_components: Mapping[str, nnx.Module],
        evaluate_batches: EvaluateValuesOfBatches,
    ):
        self._live = live
        self._evaluate = evaluate
        self._evaluate_batches = evaluate_batches
        self._model_components = dict(model_components)
        position = {id(variable): index for index, variable in enumerate(live.variables)}
        missing = [
            f"{name}.{'.'.join(map(str, path))}"
            for name, component in self._model_components.items()
            for path, variable in weight_variables(component)
            if id(variable) not in position
        ]
        if missing:
            raise ValueError(
                f"the model components' variables {missing[:5]} are not part of the training model, so a snapshot of "
                "it cannot hold them: the training model must hold the model components"
            )
        # where the value of the live variable at each index is kept: (optimizer group, position) or (None, position)
        self._slots: dict[int, tuple[Any, int]] = {}
        for group, indices in enumerate(live.trainable_indices.values()):
            for slot, index in enumerate(indices):
                self._slots[index] = (group, slot)
        for slot, index in enumerate(live.rest_indices):
            self._slots[index] = (None, slot)
        self._position = position
        self._trainable: list[list[Any]] = []
        self._rest: list[Any] = []

    def capture(self) -> None:
        """Copy the values of every variable of the training model (dispatched, no host transfer, no wait)."""
        trainable, rest = copy_arrays((self._live.trainable_values(), self._live.rest_values()))
        self._trainable, self._rest = [list(group) for group in trainable], list(rest)

    def _value(self, variable: nnx.Variable) -> Any:
        group, slot = self._slots[self._position[id(variable)]]
        return self._rest[slot] if group is None else self._trainable[group][slot]

    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """``DefaultTrainer.evaluate_loss`` of the snapshot's values: the trainer's compiled evaluation step, the same
        settings and precision (worker thread).

        Raises:
            RuntimeError: Nothing was captured or loaded yet.
        """
        self._check_captured("evaluate_loss()")
        return self._evaluate(self._trainable, self._rest, batch, evaluate_settings, bool(inference_mode))

    def evaluate_losses(
        self, batches: Sequence[Any], evaluate_settings: Any = None, inference_mode: bool = True
    ) -> list[ModelOutputs]:
        """``DefaultTrainer.evaluate_losses`` of the snapshot's values: :meth:`evaluate_loss` of each batch, in
        order, up to ``evaluation_steps_per_execution`` batches of the same shapes in one compiled call (worker
        thread); the same values as batch by batch.

        Raises:
            RuntimeError: Nothing was captured or loaded yet.
        """
        self._check_captured("evaluate_losses()")
        return self._evaluate_batches(self._trainable, self._rest, batches, evaluate_settings, bool(inference_mode))

    def _check_captured(self, what: str) -> None:
        """Raise ``RuntimeError`` naming ``what`` was called when the snapshot holds no values yet."""
        if not self._trainable and not self._rest:
            raise RuntimeError(
                f"{what} of an evaluation snapshot that holds no values yet: call capture() or "
                "set_model_components_state() first"
            )

    def model_components_state(self) -> dict:
        """Per model component the nested dict of its variables' values in the snapshot (NumPy copies, one host
        transfer; the form of ``trainer.get_state()["model_components"]``).

        Raises:
            RuntimeError: Nothing was captured or loaded yet.
        """
        self._check_captured("model_components_state()")
        state: dict = {}
        for name, component in self._model_components.items():
            nested: dict = {}
            for path, variable in weight_variables(component):
                node = nested
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = self._value(variable)
            state[name] = nested
        return to_numpy(state)

    def set_model_components_state(self, model_components: dict) -> None:
        """Load model component weights (as :meth:`model_components_state` returns them); the training model's other
        variables (outside every component) are copied from the live model.

        Args:
            model_components: Per model component name, the nested dict of its variables' values (NumPy or JAX
                arrays); every model component of the trainer must be there.

        Raises:
            ValueError: A model component is missing from ``model_components`` (its name and the names given are
                listed), or a component's state has other paths or shapes than the component (nothing is loaded
                then).
        """
        missing = [name for name in self._model_components if name not in model_components]
        if missing:
            raise ValueError(
                f"model_components has no state for the model components {missing}; it has {list(model_components)}, "
                f"the trainer's model components are {list(self._model_components)}"
            )
        updates = [
            update
            for name, component in self._model_components.items()
            for update in component_updates(name, component, model_components[name])
        ]
        self.capture()
        for variable, value in updates:
            group, slot = self._slots[self._position[id(variable)]]
            if group is None:
                self._rest[slot] = value
            else:
                self._trainable[group][slot] = value
