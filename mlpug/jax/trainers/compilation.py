"""What the JAX ``DefaultTrainer`` compiles, and how values that are not arrays cross ``jax.jit``.

The training and evaluation steps are plain functions of arrays compiled once per input signature with
``jax.jit`` (:func:`compile_step`); the trainer calls the compiled function directly, never ``nnx.jit`` (which
walks the module graph on every call).

Batches, training settings and the model's outputs may hold values that are not arrays (a string in a batch, a
``bool`` switch in the settings, a Python ``int`` as ``num_samples``, a tag among the auxiliary results). Such a
value travels as a :class:`StaticValue`: a pytree node without leaves whose value is part of the tree's structure.
As an input it is a constant of the trace (a different value traces again, like a Python constant of a
``tf.function``); as an output it comes back as the same Python value. Arrays (``jax.Array``, NumPy arrays and
scalars) are traced.

The Python numbers (``int``, ``float``, ``bool``) of a batch are data, different in every batch (``{"x": x,
"lengths": [3, 5, 2]}``): the trainer passes ``trace_numbers=True`` for batches, and they are traced as 0-d arrays
(weakly typed, so they combine with other arrays as the Python numbers would), so the step is compiled once for
all their values. The settings' numbers stay constants (a switch or a size the model may use as a Python value).

Dicts keep the order the user wrote: ``jax.jit`` (like every pytree function) rebuilds a plain ``dict`` with its keys
sorted, so :func:`as_traceable` carries every ``dict`` as an :class:`InsertionOrderDict` (a pytree node whose
children and rebuilt keys follow the insertion order) and :func:`from_traceable` gives back a plain ``dict`` in that
order. The model sees ``{"labels": ..., "features": ...}`` as it was written, and the neutral rule that counts a
batch's samples by its first part (:func:`mlpug.chunking.infer_num_samples`) reads the first key the user wrote, as
on the other backends. The order is part of the trace's signature: a dict with the same keys in another order
compiles the step once more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlpug.jax.trainers.insertion_order_dict import ordered_dicts, rebuild_dicts


@jax.tree_util.register_static
class StaticValue:
    """A value that is not an array, carried through ``jax.jit`` in the tree structure (see the module docstring).

    Two static values are equal when their types and values are equal (so ``1`` and ``True`` trace apart).

    Attributes:
        value: The Python value (hashable).
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"StaticValue({self.value!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StaticValue) and type(self.value) is type(other.value) and bool(self.value == other.value)
        )

    def __hash__(self) -> int:
        return hash((type(self.value), self.value))


def _static_value(leaf: Any) -> Any:
    """The value of a :class:`StaticValue`; any other leaf as it is."""
    return leaf.value if isinstance(leaf, StaticValue) else leaf


def is_array(value: Any) -> bool:
    """True for what a compiled step traces: ``jax.Array`` (also a tracer), NumPy arrays and NumPy scalars."""
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def as_traceable(tree: Any, what: str, trace_numbers: bool = False) -> Any:
    """``tree`` with every leaf that is not an array (see :func:`is_array`) wrapped in a :class:`StaticValue`.

    Args:
        tree: A pytree (tuples, lists, dicts, named tuples, None ...) of arrays and other values.
        what: What ``tree`` is, for the error message (``"the batch"``, ``"the training settings"``, ...).
        trace_numbers: Python ``int``, ``float`` and ``bool`` leaves become 0-d ``jax.Array`` s (weakly typed, as
            ``jnp.asarray`` makes them) instead of static values: traced, so another value does not compile the
            step again (for batches; see the module docstring). An ``int`` that JAX's integers cannot hold stays
            a static value.

    Returns:
        The same structure (every ``dict`` as an :class:`InsertionOrderDict`, module docstring), arrays as they
        are, numbers as arrays (``trace_numbers``), every other leaf a :class:`StaticValue`.

    Raises:
        TypeError: A leaf that is not an array cannot be hashed, so it cannot be a constant of a compiled step
            (its type and position are named).
    """
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(ordered_dicts(tree))
    leaves = []
    for path, leaf in leaves_with_paths:
        if is_array(leaf):
            leaves.append(leaf)
            continue
        if trace_numbers and isinstance(leaf, (bool, int, float)):
            try:
                leaves.append(jnp.asarray(leaf))
                continue
            except OverflowError:  # an int beyond the range of JAX's integers stays a constant
                pass
        try:
            hash(leaf)
        except TypeError:
            raise TypeError(
                f"{what}{jax.tree_util.keystr(path)} is a {type(leaf).__module__}.{type(leaf).__qualname__}, which is "
                "neither an array nor hashable: a compiled JAX step takes arrays (traced) and hashable Python values "
                "(constants of the trace); convert it to an array (np.asarray) or to a hashable value (e.g. a tuple)"
            ) from None
        leaves.append(StaticValue(leaf))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def from_traceable(tree: Any) -> Any:
    """The inverse of :func:`as_traceable`: every :class:`StaticValue` replaced by its value, every
    :class:`InsertionOrderDict` by a plain ``dict`` with its keys in the same (the user's) order."""
    return rebuild_dicts(tree, dict, _static_value)


def copy_arrays(tree: Any) -> Any:
    """Every ``jax.Array`` of ``tree`` copied into a buffer of its own (``jnp.array(value, copy=True)``: on its
    device, its sharding kept, dispatched without a wait); other leaves as they are. For arrays that must not share
    a buffer that a compiled step donates: a snapshot's values (the next training step donates the live ones), new
    optimizer states (optax may give several leaves one array)."""

    def copy(value: Any) -> Any:
        return jnp.array(value, copy=True) if isinstance(value, jax.Array) else value

    return jax.tree_util.tree_map(copy, tree)


def compile_step(
    function: Callable[..., Any],
    donate_argnums: Sequence[int] = (),
    static_argnames: Sequence[str] = (),
) -> Callable[..., Any]:
    """``jax.jit(function)``: compiled once per signature of its arguments (shapes, dtypes, tree structure and
    static values), its donated arguments' buffers reused for its outputs.

    Args:
        function: A function of pytrees of arrays (with :class:`StaticValue` s for the rest) returning the same.
        donate_argnums: Positions of the arguments whose buffers the outputs may take over: the caller must not
            use those arrays after the call (the trainer writes the new state back at once).
        static_argnames: Keyword arguments that are Python constants of the trace.
    """
    return jax.jit(function, donate_argnums=tuple(donate_argnums), static_argnames=tuple(static_argnames))
