"""The training model of the JAX ``DefaultTrainer`` as flat lists of arrays, and back (:class:`LiveModel`).

Flax NNX's functional API, done once: the training model is split (``flax.nnx.graphlib.flatten``, what
``nnx.split`` does) into a graph definition and its ``nnx.Variable`` s, in the order of the graph. A compiled step
takes their values as flat lists, rebuilds the model inside the trace with ``nnx.merge(graphdef, values)``, and
returns the new values in the same order (:meth:`LiveModel.values_of`); the trainer then writes them into the very
``Variable`` objects of the live modules (:meth:`LiveModel.write`: what ``nnx.update`` does, without walking the
graph), so ``classifier(images)`` predicts with the trained weights. Reading and writing is a Python loop over the
variables: no host transfer, no graph traversal per step.

Modes: two graph definitions are made, one per mode, from clones of the module graph that share the variables
(``nnx.clone(model, variables=False)``), on which the training model's own ``train()`` and ``eval()`` are called
(they set ``deterministic`` / ``use_running_average`` of ``nnx.Dropout``, ``nnx.BatchNorm`` and every module with
those attributes). The modes are the trainer's, as on PyTorch, where the trainer calls ``model.train()`` before a
training step and ``model.eval()`` for evaluation: a training step and ``evaluate_loss(inference_mode=False)`` run in
``train()`` mode, ``evaluate_loss(inference_mode=True)`` in ``eval()`` mode, whatever mode the live modules are in
(``classifier.eval()`` to predict between epochs does not turn dropout off in training); the live modules' modes are
never changed. To keep a module in another mode while training (a pretrained ``BatchNorm`` frozen), override the
training model's ``train()``: ``def train(self, **attributes): super().train(**attributes); self.backbone.eval()``.

The graph definitions hold the modules' static attributes (a Dropout's ``rate``, a module's own switches, which
submodules there are) as they are when the :class:`LiveModel` is made (``set_training_model``); reading them at every
step would be the graph traversal that the compiled step avoids. After changing one on the live modules, call
``trainer.set_training_model(training_model)`` again: the steps are compiled anew, and the weights, optimizer
states and random streams are kept.

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
from typing import Any, Optional

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


def unsaved_variables(
    flat: Sequence[tuple[tuple, nnx.Variable]], model_components: Mapping[str, nnx.Module]
) -> list[str]:
    """The dotted paths (in the training model) of the variables of ``flat`` that no model component holds and
    checkpoints would not save although training may change them: every variable type but ``nnx.Param`` (not
    trained outside the model components; :class:`LiveModel` warns about them) and ``nnx.RngState`` (the
    ``nnx.Rngs`` streams, saved as random states by :class:`mlpug.jax.random_state.NnxRngStreams`).

    Args:
        flat: ``(path, variable)`` of the training model (:func:`flat_variables`).
        model_components: The model components by name.
    """
    saved = {id(variable) for component in model_components.values() for _, variable in flat_variables(component)[1]}
    return [
        path_name(path)
        for path, variable in flat
        if id(variable) not in saved and not isinstance(variable, (nnx.Param, nnx.RngState))
    ]


class LiveModel:
    """The training model's graph definitions and variables, grouped for a compiled step (module docstring).

    Args:
        training_model: The ``nnx.Module`` returning the loss.
        trainable: Per optimizer name, the ``nnx.Param`` objects it updates, in the order of its state.
        component_names: Per variable ``id``, ``"<model component>.<path in it>"`` (names of trainable weights in
            messages and :meth:`trainable_names`).
        model_components: The model components by name, whose variables checkpoints save: when given, a variable of
            the training model outside all of them that training may change and no checkpoint would hold (anything
            but an ``nnx.Param``, which no optimizer updates, and the ``nnx.Rngs`` streams, which are random states)
            is refused (see :func:`unsaved_variables`).

    Raises:
        ValueError: A trainable parameter is not part of ``training_model`` (its model component is not used by
            it); or the training model holds variables outside the model components that checkpoints would not
            save, e.g. the ``nnx.BatchStat`` s of an ``nnx.BatchNorm`` of the training model (their paths are
            named).
    """

    def __init__(
        self,
        training_model: nnx.Module,
        trainable: Mapping[str, Sequence[nnx.Variable]],
        component_names: Mapping[int, str],
        model_components: Optional[Mapping[str, nnx.Module]] = None,
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
        if model_components is not None:
            unsaved = unsaved_variables(flat, model_components)
            if unsaved:
                raise ValueError(
                    f"the training model holds the variables {unsaved[:8]}{' ...' if len(unsaved) > 8 else ''} "
                    "outside every model component: training may change them (e.g. an nnx.BatchNorm's running "
                    "statistics), but checkpoints save the model components only, so a resumed run would start "
                    "them anew. Pass the module that holds them as a model component (e.g. "
                    "model_components={'classifier': classifier, 'normalisation': training_model.normalisation}), "
                    "or move them into a model component"
                )
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
