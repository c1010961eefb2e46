"""The optax optimizers of the JAX ``DefaultTrainer`` and their states (:class:`OptaxOptimizers`).

The trainer owns the optimizer states: per optimizer, ``transformation.init`` of the values of the parameters it
updates (a list of arrays, in the order of :func:`mlpug.jax.trainers.live_model.component_parameters`).

The states are made when they are first needed (the first step, :meth:`OptaxOptimizers.flat_states` for
``get_state``, the learning rate), from the parameters' values *then*, and made again from the new values as long as
they are untouched: no step has run and no state was loaded (:meth:`OptaxOptimizers.set_state`). So weights loaded
into the modules after the trainer was made (``nnx.update(classifier, pretrained)``, before or after
``set_training_model``) are those that ``init`` sees, which matters for optimizers whose state holds the parameters
(``optax.contrib.schedule_free_*``, ``optax.lookahead``). A learning rate set before the first step
(:meth:`OptaxOptimizers.set_learning_rate`) is kept when the states are made again.

In a training checkpoint a state is a flat dict ``{key path: array}`` of its leaves (``jax.tree_util.keystr`` of each
leaf's path, e.g. ``"[0].mu[1]"``), loaded back into the structure that ``init`` gives.

The learning rate is read and set where ``optax.inject_hyperparams`` keeps it: ``state.hyperparams
["learning_rate"]`` (searched anywhere in the state, e.g. inside an ``optax.chain``). Other optimizers have no
learning rate that can be read or set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlpug.jax.trainers.compilation import copy_arrays

LEARNING_RATE = "learning_rate"


def _is_injected(node: Any) -> bool:
    return isinstance(getattr(node, "hyperparams", None), Mapping) and hasattr(node, "_replace")


def injected_learning_rate(state: Any) -> Optional[Any]:
    """The learning rate in an optax state made by ``optax.inject_hyperparams`` (the first one found, as a 0-d
    array; inside a compiled step a tracer), or None."""
    for node in jax.tree_util.tree_leaves(state, is_leaf=_is_injected):
        if _is_injected(node) and LEARNING_RATE in node.hyperparams:
            return node.hyperparams[LEARNING_RATE]
    return None


def _is_scheduled(state: Any) -> bool:
    """Whether the injected learning rate of ``state`` is a schedule (``inject_hyperparams(...)(learning_rate=
    schedule)``): then optax computes it anew every step."""
    for node in jax.tree_util.tree_leaves(state, is_leaf=_is_injected):
        if _is_injected(node) and LEARNING_RATE in node.hyperparams:
            return LEARNING_RATE in (getattr(node, "hyperparams_states", None) or {})
    return False


def _with_learning_rate(state: Any, learning_rate: float) -> Any:
    """``state`` with the first injected learning rate set to ``learning_rate`` (in its dtype)."""
    replaced = False

    def replace(node: Any) -> Any:
        nonlocal replaced
        if replaced or not _is_injected(node) or LEARNING_RATE not in node.hyperparams:
            return node
        replaced = True
        old = node.hyperparams[LEARNING_RATE]
        hyperparams = {**node.hyperparams, LEARNING_RATE: jnp.asarray(learning_rate, dtype=jnp.result_type(old))}
        return node._replace(hyperparams=hyperparams)

    return jax.tree_util.tree_map(replace, state, is_leaf=_is_injected)


ParameterValues = Callable[[], Mapping[str, Sequence[Any]]]
"""Returns, per optimizer name, the current values of the parameters it updates (arrays, in the order of its
state)."""


class OptaxOptimizers:
    """The optax transformations by name and their states, made when first needed (module docstring).

    Args:
        transformations: Per optimizer name, its ``optax.GradientTransformation``.
        parameters: Returns the current values of the parameters of every optimizer (see :data:`ParameterValues`);
            called when the states are made, never during training.
    """

    def __init__(self, transformations: Mapping[str, optax.GradientTransformation], parameters: ParameterValues):
        self.transformations = dict(transformations)
        self._parameters = parameters
        self._states: Optional[dict[str, Any]] = None
        self._initialised_from: Optional[list[Any]] = None  # the parameter arrays that made the untouched states
        self._touched = False
        self._learning_rates: dict[str, float] = {}  # set while untouched, applied to states made again
        self._place: Callable[[tuple], tuple] = lambda states: states

    @property
    def states(self) -> dict[str, Any]:
        """Per optimizer name, its optax state (made or made again from the current parameter values while
        untouched; see the module docstring)."""
        if self._touched:
            assert self._states is not None
            return self._states
        parameters = self._parameters()
        arrays = [value for name in self.transformations for value in parameters[name]]
        if (
            self._states is None
            or self._initialised_from is None
            or len(arrays) != len(self._initialised_from)
            or any(new is not old for new, old in zip(arrays, self._initialised_from))
        ):  # JAX arrays are immutable: the same array objects give the same state
            states = {
                name: copy_arrays(transformation.init(list(parameters[name])))  # optax may share one array
                for name, transformation in self.transformations.items()
            }
            for name, learning_rate in self._learning_rates.items():
                states[name] = _with_learning_rate(states[name], learning_rate)
            states = dict(zip(self.transformations, self._place(tuple(states.values()))))
            self._states, self._initialised_from = states, arrays
        return self._states

    @states.setter
    def states(self, states: dict[str, Any]) -> None:
        self._states, self._touched, self._initialised_from = states, True, None

    def place(self, place: Callable[[tuple], tuple]) -> None:
        """Place the states where the compiled step reads them (a strategy's ``place_state``), now and whenever
        they are made again; an untouched state stays untouched (it is still made again from new parameter values).

        Args:
            place: Takes and returns the states as :meth:`state_tuple` gives them, as new arrays.
        """
        self._place = place
        if self._states is not None:
            self._states = dict(zip(self.transformations, place(tuple(self._states.values()))))

    # ----- the states as a tuple, for a compiled step -----
    def state_tuple(self) -> tuple:
        """The optimizer states as the compiled step takes them.

        Returns:
            One optax state per optimizer, in the order of the optimizers (the live arrays, not copied: the step
            donates them, so the caller replaces them with :meth:`set_state_tuple` at once).
        """
        return tuple(self.states.values())

    def set_state_tuple(self, states: Sequence[Any]) -> None:
        """Take the new optimizer states that the compiled step returned.

        Args:
            states: One optax state per optimizer, in the order of :meth:`state_tuple` (kept, not copied).
        """
        self.states = dict(zip(self.transformations, states))

    # ----- checkpoints -----
    def flat_states(self) -> dict[str, dict[str, Any]]:
        """Per optimizer name, ``{key path: leaf}`` of its state (the live arrays, not copied)."""
        return {
            name: {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
            for name, state in self.states.items()
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Load what :meth:`flat_states` returned (NumPy or JAX arrays; each leaf in the dtype of the current one).

        Raises:
            ValueError: An optimizer's state has other leaves (key paths) or shapes than this optimizer's (both are
                named); nothing is loaded then.
        """
        loaded = {}
        for name, current in self.states.items():
            given = state[name]
            leaves, treedef = jax.tree_util.tree_flatten_with_path(current)
            keys = [jax.tree_util.keystr(path) for path, _ in leaves]
            if not isinstance(given, Mapping) or set(given) != set(keys):
                found = sorted(given) if isinstance(given, Mapping) else f"a {type(given).__name__}"
                raise ValueError(
                    f"state of optimizer {name!r}: its leaves {found} do not match the optimizer's {keys} (another "
                    "optax transformation, or other parameters?)"
                )
            values = []
            for key, (_, leaf) in zip(keys, leaves):
                value = given[key]
                if np.shape(value) != np.shape(leaf):
                    raise ValueError(
                        f"state of optimizer {name!r}: {key} has shape {np.shape(value)}, the optimizer's "
                        f"{np.shape(leaf)}"
                    )
                values.append(jnp.array(value, dtype=jnp.result_type(leaf)) if isinstance(leaf, jax.Array) else value)
            loaded[name] = jax.tree_util.tree_unflatten(treedef, values)
        self.states = loaded

    # ----- learning rate -----
    def get_learning_rate(self, name: str) -> Optional[float]:
        """The learning rate of optimizer ``name`` now, or None when it was not made with
        ``optax.inject_hyperparams``."""
        learning_rate = injected_learning_rate(self.states[name])
        return None if learning_rate is None else float(jax.device_get(learning_rate))

    def set_learning_rate(self, names: Sequence[str], learning_rate: float) -> None:
        """Set the learning rate of the optimizers ``names`` in their states (all of them, or none).

        Raises:
            TypeError: An optimizer was not made with ``optax.inject_hyperparams``, or its learning rate is a
                schedule (optax computes it every step); no learning rate is set then.
        """
        for name in names:
            state = self.states[name]
            if injected_learning_rate(state) is None:
                raise TypeError(
                    f"optimizer {name!r} has no learning rate that can be set: make it with optax.inject_hyperparams, "
                    "e.g. optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), so that its learning rate is part "
                    "of its state"
                )
            if _is_scheduled(state):
                raise TypeError(
                    f"optimizer {name!r} has a learning rate schedule (optax computes it every step), which cannot be "
                    "set"
                )
        if not self._touched:  # kept for the states made again (now, and from other parameter values)
            self._learning_rates.update(dict.fromkeys(names, learning_rate))
            self._states = None
            return
        states = dict(self.states)
        for name in names:
            states[name] = _with_learning_rate(states[name], learning_rate)
        self.states = states
