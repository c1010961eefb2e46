"""The training model of the JAX ``DefaultTrainer`` as flat lists of arrays, and back (:class:`LiveModel`).

Flax NNX's functional API, done once: the training model is split (``flax.nnx.graphlib.flatten``, what
``nnx.split`` does) into a graph definition and its ``nnx.Variable`` s, in the order of the graph. A compiled step
takes their values as flat lists, rebuilds the model inside the trace with ``nnx.merge(graphdef, values)``, and
returns the new values in the same order (:meth:`LiveModel.values_of`); the trainer then writes them into the very
``Variable`` objects of the live modules (:meth:`LiveModel.write`: what ``nnx.update`` does, without walking the
graph), so ``classifier(images)`` predicts with the trained weights. Reading and writing is a Python loop over the
variables: no host transfer, no graph traversal per step.

Two graph definitions are made, one per mode, from clones of the module graph that share the variables
(``nnx.clone(model, variables=False)``): ``train()`` and ``eval()`` set ``deterministic`` / ``use_running_average``
on the clones (``nnx.Dropout``, ``nnx.BatchNorm`` and every module with those attributes), never on the live
modules, whose modes stay as the user left them.

The variables are grouped: the **trainable** ones, per optimizer (the ``nnx.Param`` s of the model components
that the optimizer updates, in the order of :func:`component_parameters`), and the **rest** (everything else:
``nnx.BatchStat``, the ``nnx.Rngs`` keys and counts, ``nnx.Param`` s of the training model outside every model
component, which are not trained). After a forward pass the rest's new values are taken by path
(:meth:`LiveModel.rest_of`): a forward pass that creates or removes variables is refused, since its variables would
no longer be those of the live modules.

A compiled training step donates the buffers of the values it is given, so :class:`LiveModel` gives every variable a
copy of its array once, when it is made: arrays that others hold (an ``nnx.clone`` of a model component, the arrays
of ``nnx.to_pure_dict(nnx.state(component))`` taken before training, an array given to ``nnx.Param(array)``, one
array in two variables) are never donated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import graphlib

_log = logging.getLogger("mlpug.jax.DefaultTrainer")


def path_name(path: Sequence[Any]) -> str:
    """A variable's path in its module as a dotted name, e.g. ``layers.0.kernel``."""
    return ".".join(str(part) for part in path)


def flat_variables(module: nnx.Module) -> tuple[Any, list[tuple[tuple, nnx.Variable]]]:
    """``(graphdef, [(path, variable), ...])`` of ``module``: its graph definition and its variables (the live
    objects, each once) in the order of the graph (the order of ``nnx.merge``'s flat state)."""
    graphdef, flat_state = graphlib.flatten(module, graph=True)
    return graphdef, list(zip(flat_state.paths, flat_state.leaves))


def component_parameters(component: nnx.Module) -> list[tuple[tuple, nnx.Param]]:
    """The ``nnx.Param`` s of a model component with their paths in it, in the order of its graph."""
    return [(path, variable) for path, variable in flat_variables(component)[1] if isinstance(variable, nnx.Param)]


def rng_variables(module: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    """The ``nnx.RngState`` variables (keys and counts of ``nnx.Rngs`` streams) of ``module`` with their paths."""
    return [(path, variable) for path, variable in flat_variables(module)[1] if isinstance(variable, nnx.RngState)]


class LiveModel:
    """The training model's graph definitions and variables, grouped for a compiled step (module docstring).

    Args:
        training_model: The ``nnx.Module`` returning the loss.
        trainable: Per optimizer name, the ``nnx.Param`` objects it updates, in the order of its state.
        component_names: Per variable ``id``, ``"<model component>.<path in it>"`` (names of trainable weights in
            messages and :meth:`trainable_names`).

    Raises:
        ValueError: A trainable parameter is not part of ``training_model`` (its model component is not used by it).
    """

    def __init__(
        self,
        training_model: nnx.Module,
        trainable: Mapping[str, Sequence[nnx.Variable]],
        component_names: Mapping[int, str],
    ):
        training_view = nnx.clone(training_model, variables=False)
        training_view.train()
        evaluation_view = nnx.clone(training_model, variables=False)
        evaluation_view.eval()
        self.training_graphdef, flat = flat_variables(training_view)
        self.evaluation_graphdef, evaluation_flat = flat_variables(evaluation_view)
        if [path for path, _ in flat] != [path for path, _ in evaluation_flat]:  # a mode that changes the graph
            raise ValueError(
                "the training model's train() and eval() modes have different variables; mlpug needs the same "
                "variables in both (a module that creates variables in eval() or train() cannot be trained here)"
            )
        self.paths = [path for path, _ in flat]
        self.variables: list[nnx.Variable] = [variable for _, variable in flat]
        position = {id(variable): index for index, variable in enumerate(self.variables)}
        missing = [
            component_names.get(id(variable), "?")
            for variables in trainable.values()
            for variable in variables
            if id(variable) not in position
        ]
        if missing:
            raise ValueError(
                f"the model components' parameters {missing[:5]}{' ...' if len(missing) > 5 else ''} are not part of "
                "the training model, so they would never be trained: the training model must hold the model "
                "components (e.g. self.classifier = classifier) and call them"
            )
        self.trainable_indices = {
            name: [position[id(variable)] for variable in variables] for name, variables in trainable.items()
        }
        trained = {index for indices in self.trainable_indices.values() for index in indices}
        self.rest_indices = [index for index in range(len(self.variables)) if index not in trained]
        untrained = [
            path_name(self.paths[index]) for index in self.rest_indices if isinstance(self.variables[index], nnx.Param)
        ]
        if untrained:
            _log.warning(
                f"The training model has nnx.Param s outside every model component, which no optimizer updates: "
                f"{untrained[:5]}{' ...' if len(untrained) > 5 else ''}; pass the module that holds them as a model "
                "component to train them"
            )
        self.trainable_names = {
            name: [component_names[id(self.variables[index])] for index in indices]
            for name, indices in self.trainable_indices.items()
        }
        self._own_buffers()

    def _own_buffers(self) -> None:
        """Give every variable a copy of its array (``jnp.array(value, copy=True)``), once: the compiled training
        step donates the variables' buffers, which would delete arrays that the user still holds (module
        docstring), and JAX refuses to donate one buffer twice (two variables made from the same array)."""
        for variable in self.variables:
            value = variable.get_raw_value()
            if isinstance(value, jax.Array):
                variable.set_raw_value(jnp.array(value, copy=True))

    # ----- values of the live variables -----
    def trainable_values(self) -> tuple[list, ...]:
        """The values of the trainable variables: one list per optimizer, in the order of the optimizers."""
        variables = self.variables
        return tuple(
            [variables[index].get_raw_value() for index in indices] for indices in self.trainable_indices.values()
        )

    def rest_values(self) -> list:
        """The values of the other variables (see the module docstring)."""
        variables = self.variables
        return [variables[index].get_raw_value() for index in self.rest_indices]

    def write(self, trainable: Sequence[Sequence[Any]], rest: Sequence[Any]) -> None:
        """Write new values (of a step) into the live variables, without copying them."""
        variables = self.variables
        for indices, values in zip(self.trainable_indices.values(), trainable):
            for index, value in zip(indices, values):
                variables[index].set_raw_value(value)
        for index, value in zip(self.rest_indices, rest):
            variables[index].set_raw_value(value)

    # ----- inside a compiled step -----
    def merge(self, trainable: Sequence[Sequence[Any]], rest: Sequence[Any], inference_mode: bool) -> nnx.Module:
        """A new training model (inside a trace) of these values: in ``eval()`` mode for ``inference_mode``."""
        values: list[Any] = [None] * len(self.variables)
        for indices, group in zip(self.trainable_indices.values(), trainable):
            for index, value in zip(indices, group):
                values[index] = value
        for index, value in zip(self.rest_indices, rest):
            values[index] = value
        graphdef = self.evaluation_graphdef if inference_mode else self.training_graphdef
        return nnx.merge(graphdef, values)

    def rest_of(self, model: nnx.Module) -> list:
        """The values of the rest variables of ``model`` (a model of :meth:`merge`, after its forward pass), found
        by their paths, in the order of :meth:`rest_values`.

        Args:
            model: A training model of :meth:`merge` after its forward pass (inside a trace).

        Returns:
            The new value of every rest variable.

        Raises:
            ValueError: The forward pass created variables (e.g. ``self.counter = nnx.BatchStat(...)`` or a
                lazily created parameter in ``__call__``, ``self.sow(...)``) or removed some: their paths are named.
        """
        _, flat_state = graphlib.flatten(model, graph=True)
        values = {path: variable.get_raw_value() for path, variable in zip(flat_state.paths, flat_state.leaves)}
        if len(values) != len(self.paths) or any(path not in values for path in self.paths):
            known = set(self.paths)
            created = [path_name(path) for path in values if path not in known]
            removed = [path_name(path) for path in self.paths if path not in values]
            raise ValueError(
                f"the training model's forward pass created the variables {created[:8]}"
                f"{' ...' if len(created) > 8 else ''} and removed {removed[:8]}{' ...' if len(removed) > 8 else ''}: "
                "mlpug writes the new values of a step back into the live modules' variables, so a forward pass must "
                "keep the variables the model had when set_training_model was called. Create every variable in "
                "__init__ (e.g. self.counter = nnx.BatchStat(jnp.zeros(()))); collect intermediates with nnx.capture, "
                "or nnx.pop(self, nnx.Intermediate) before __call__ returns, instead of leaving self.sow values on the "
                "model"
            )
        return [values[self.paths[index]] for index in self.rest_indices]
