"""A ``dict`` that keeps its insertion order through ``jax.jit`` and every pytree function
(:class:`InsertionOrderDict`), :func:`ordered_dicts` to carry a tree's dicts so, and :func:`rebuild_dicts`, the
traversal that converts them both ways (see
:mod:`mlpug.jax.trainers.compilation`: the batch's dicts reach the model in the order the user wrote)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


class InsertionOrderDict(dict):
    """A ``dict`` whose pytree children follow its insertion order, not the sorted keys (module docstring); JAX
    rebuilds it with the keys in that order. Its key paths are those of a ``dict`` (``jax.tree_util.DictKey``)."""

    def __repr__(self) -> str:
        return f"InsertionOrderDict({dict.__repr__(self)})"


def _flatten_with_keys(node: InsertionOrderDict) -> tuple[list[tuple[Any, Any]], tuple]:
    return [(jax.tree_util.DictKey(key), value) for key, value in node.items()], tuple(node)


def _flatten(node: InsertionOrderDict) -> tuple[list[Any], tuple]:
    return list(node.values()), tuple(node)


def _unflatten(keys: tuple, children: Any) -> InsertionOrderDict:
    return InsertionOrderDict(zip(keys, children))


jax.tree_util.register_pytree_with_keys(InsertionOrderDict, _flatten_with_keys, _unflatten, _flatten)


def _same(leaf: Any) -> Any:
    return leaf


def rebuild_dicts(tree: Any, dict_type: type[dict], leaf: Callable[[Any], Any] = _same) -> Any:
    """``tree`` rebuilt node by node, every node's children in their order: the one traversal behind
    :func:`ordered_dicts` and :func:`~mlpug.jax.trainers.compilation.from_traceable`.

    Args:
        tree: A pytree (dicts, lists, tuples, named tuples, registered nodes, None ...) of arrays and other values.
        dict_type: What every ``dict`` and :class:`InsertionOrderDict` becomes (``dict`` or
            :class:`InsertionOrderDict`), with its keys in their order. Other mappings (``OrderedDict``, ...) keep
            their own pytree rules.
        leaf: Applied to every leaf: arrays (``jax.Array``, tracers included, NumPy arrays and scalars), values
            that are not pytree nodes, and nodes without children (None, a static node). Default: the leaf itself.

    Returns:
        The same structure; lists and tuples keep their types, other nodes are rebuilt by their own unflatten.
    """
    if type(tree) in (dict, InsertionOrderDict):
        return dict_type((key, rebuild_dicts(value, dict_type, leaf)) for key, value in tree.items())
    if type(tree) in (list, tuple):
        return type(tree)(rebuild_dicts(value, dict_type, leaf) for value in tree)
    if isinstance(tree, (jax.Array, np.ndarray, np.generic)):
        return leaf(tree)
    children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda node: node is not tree)  # one level
    if jax.tree_util.treedef_is_leaf(treedef):
        return leaf(tree)
    return jax.tree_util.tree_unflatten(treedef, [rebuild_dicts(child, dict_type, leaf) for child in children])


def ordered_dicts(tree: Any) -> Any:
    """``tree`` with every plain ``dict`` (at any depth) as an :class:`InsertionOrderDict` in the same order, so
    that pytree functions (``jax.tree_util.tree_map``, ``jax.jit``, ``lax.scan``) keep that order (see
    :func:`rebuild_dicts`)."""
    return rebuild_dicts(tree, InsertionOrderDict)
