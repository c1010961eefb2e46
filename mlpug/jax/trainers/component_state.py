"""The state of a model component of the JAX ``DefaultTrainer``: its variables as a nested dict of arrays.

A component's state is ``nnx.state(component)`` as a pure dict (``{"layers": {0: {"kernel": array, "bias": array},
...}}``: the keys of each variable's path, its value at the leaf), without the ``nnx.Rngs`` keys and counts
(``nnx.RngState``), which are random states (:mod:`mlpug.jax.random_state`). Loading checks the paths and shapes
against the component's before anything is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlpug.jax.trainers.live_model import flat_variables, path_name


def weight_variables(component: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    """The variables of ``component`` that its state holds (all but ``nnx.RngState``), with their paths."""
    return [(path, var) for path, var in flat_variables(component)[1] if not isinstance(var, nnx.RngState)]


def component_state(component: nnx.Module) -> dict:
    """The nested dict of ``component``'s variable values (``jax.Array`` s, not copied; see the module docstring)."""
    state: dict = {}
    for path, variable in weight_variables(component):
        node = state
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = variable.get_raw_value()
    return state


def _flatten(state: Any, path: tuple = ()) -> dict[tuple, Any]:
    """``{path of str keys: leaf}`` of a nested dict (keys as strings: a checkpoint may hold ``0`` or ``"0"``)."""
    if isinstance(state, Mapping):
        flat: dict[tuple, Any] = {}
        for key, value in state.items():
            flat.update(_flatten(value, (*path, str(key))))
        return flat
    return {path: state}


def component_updates(name: str, component: nnx.Module, state: Any) -> list[tuple[nnx.Variable, Any]]:
    """``(variable, new value)`` for every variable of ``component``, from ``state`` (a nested dict as
    :func:`component_state` returns it, with NumPy or JAX arrays): each value a new ``jax.Array`` in the variable's
    dtype. Nothing is written.

    Raises:
        ValueError: ``state`` has other paths (missing or unexpected ones are named) or shapes than the component.
    """
    variables = {tuple(str(key) for key in path): variable for path, variable in weight_variables(component)}
    given = _flatten(state) if isinstance(state, Mapping) else None
    if given is None or set(given) != set(variables):
        if given is None:
            raise ValueError(
                f"state of model component {name!r} must be a nested dict of arrays, got a {type(state).__name__}"
            )
        missing = sorted(".".join(path) for path in set(variables) - set(given))
        unexpected = sorted(".".join(path) for path in set(given) - set(variables))
        raise ValueError(
            f"state of model component {name!r} does not match its variables: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]} (a state of another model?)"
        )
    updates = []
    for path, variable in variables.items():
        value, current = given[path], variable.get_raw_value()
        if np.shape(value) != np.shape(current):
            raise ValueError(
                f"state of model component {name!r}: {path_name(path)} has shape {np.shape(value)}, the variable "
                f"{np.shape(current)}"
            )
        if isinstance(current, jax.Array):
            value = jnp.array(value, dtype=current.dtype, copy=True)
        updates.append((variable, value))
    return updates
