"""A ``dict`` that keeps its insertion order through ``jax.jit`` and every pytree function
(:class:`InsertionOrderDict`), and :func:`ordered_dicts` to carry a tree's dicts so (see
:mod:`mlpug.jax.trainers.compilation`: the batch's dicts reach the model in the order the user wrote)."""

from __future__ import annotations

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


def ordered_dicts(tree: Any) -> Any:
    """``tree`` with every plain ``dict`` (at any depth) as an :class:`InsertionOrderDict` in the same order."""
    if type(tree) is dict:
        return InsertionOrderDict((key, ordered_dicts(value)) for key, value in tree.items())
    if type(tree) in (list, tuple):
        return type(tree)(ordered_dicts(value) for value in tree)
    if isinstance(tree, (jax.Array, np.ndarray, np.generic)):
        return tree
    children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda node: node is not tree)  # one level
    if jax.tree_util.treedef_is_leaf(treedef):
        return tree
    return jax.tree_util.tree_unflatten(treedef, [ordered_dicts(child) for child in children])
