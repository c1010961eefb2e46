"""The bfloat16 JAX precision policy (:class:`MixedPrecision`; the protocol is :mod:`mlpug.jax.trainers.precision`).

What a Keras ``mixed_bfloat16`` user expects: the variables stay float32, the forward pass computes in ``bfloat16``,
the loss is float32. Inside the compiled step:

* the floating-point parameter values are cast to ``bfloat16`` for the forward pass; the parameters, their
  gradients (through the cast) and the optimizer states stay float32. Other variables (batch statistics, random
  keys) keep their dtypes.
* the model's **inputs** are cast to ``bfloat16``: the floating-point arrays of the batch parts named by
  ``autocast_inputs`` (key paths as ``jax.tree_util.keystr`` writes them: ``"[0]"`` for ``batch[0]``,
  ``"['image']"`` for ``batch["image"]``, ``"[0]['image']"`` deeper; a path names the part and everything in it).
  By default (``None``) that is the batch's **first part**: ``batch[0]`` of a tuple or list (``(features,
  labels)``), the first value of a dict in the order it was written, the whole batch when it is one array. The other
  parts (targets, sample weights) keep their dtypes, so a float32 regression target is not rounded to bfloat16's 8
  bits of mantissa: Keras casts a layer's inputs to its compute dtype, never the targets. ``autocast_inputs=[]``
  casts no batch part (the model casts its inputs itself).
* the loss the model returns is cast to float32 (:meth:`MixedPrecision.cast_loss`): what is differentiated, returned
  by ``train_on`` / ``evaluate_loss`` and logged. The model computes the loss from its outputs: compute it from
  float32 outputs (``logits.astype(jnp.float32)``), as Keras' losses do, where bfloat16 would lose precision (a
  softmax cross entropy over many classes). The auxiliary results are returned in the dtype the model gives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mlpug.jax.trainers.compilation import from_traceable
from mlpug.jax.trainers.full_precision import FullPrecision
from mlpug.jax.trainers.insertion_order_dict import ordered_dicts
from mlpug.trainers.precision import AutocastDtype, validate_mixed_precision


def _cast_floating(value: Any, dtype: Any) -> Any:
    """``value`` in ``dtype`` when it is a floating-point array, else as it is."""
    if isinstance(value, jax.Array) or hasattr(value, "dtype"):
        if jnp.issubdtype(jnp.result_type(value), jnp.floating):
            return jnp.asarray(value).astype(dtype)
    return value


def _within(path: str, part: str) -> bool:
    """Whether the key path ``path`` is ``part`` or lies inside it (``"[0][1]"`` inside ``"[0]"``, not
    ``"[01]"``)."""
    return path == part or (path.startswith(part) and path[len(part)] in "[.")


def validate_autocast_inputs(autocast_inputs: Any) -> Optional[tuple[str, ...]]:
    """``autocast_inputs`` as a tuple of key paths, or None (the default rule; see the module docstring).

    Raises:
        TypeError: ``autocast_inputs`` is a string, not a sequence, or holds a value that is not a string (e.g.
            ``[0]``: write ``["[0]"]``).
        ValueError: A string that is not a key path (``"[0]"``, ``"['image']"``, ``".field"``).
    """
    if autocast_inputs is None:
        return None
    if isinstance(autocast_inputs, str) or not isinstance(autocast_inputs, Sequence):
        raise TypeError(
            f"autocast_inputs must be None or a list of key paths of the batch, e.g. ['[0]'] or [\"['image']\"]; got "
            f"{autocast_inputs!r}"
        )
    for path in autocast_inputs:
        if not isinstance(path, str):
            example = f"'[{path}]' for batch[{path}]" if isinstance(path, int) else "'[0]' for batch[0]"
            raise TypeError(
                f"autocast_inputs holds {path!r}, a {type(path).__qualname__}; it takes key paths of the batch as "
                f"strings, as jax.tree_util.keystr writes them: {example}, \"['image']\" for batch['image']"
            )
        if not path.startswith(("[", ".")):
            raise ValueError(
                f"autocast_inputs holds {path!r}, which is not a key path of the batch as jax.tree_util.keystr writes "
                "it: '[0]' for batch[0], \"['image']\" for batch['image'], \"[0]['image']\" for batch[0]['image']"
            )
    return tuple(autocast_inputs)


class MixedPrecision(FullPrecision):
    """bfloat16 forward pass, float32 variables and loss (see the module docstring); the optimizers step as in full
    precision.

    Args:
        autocast_dtype: ``"bfloat16"``.
        autocast_inputs: Key paths of the batch parts to cast to bfloat16 (a list of strings), or None for the
            batch's first part (module docstring).

    Raises:
        ValueError: ``autocast_dtype`` is ``"float16"`` (it needs loss scaling; use ``"bfloat16"``) or unknown; a
            string of ``autocast_inputs`` is not a key path.
        TypeError: ``autocast_inputs`` is neither None nor a list of strings (``[0]`` included).
    """

    def __init__(self, autocast_dtype: AutocastDtype, autocast_inputs: Optional[Sequence[str]] = None):
        if autocast_dtype == "float16":
            raise ValueError(
                "autocast_dtype='float16' is not supported on JAX: float16 training needs loss scaling, which the JAX "
                "backend does not implement; use autocast_dtype='bfloat16' (the exponent range of float32, no loss "
                "scaling needed)"
            )
        dtype = validate_mixed_precision(True, autocast_dtype)
        assert dtype is not None
        self.autocast_dtype: Optional[AutocastDtype] = dtype
        self.autocast_inputs = validate_autocast_inputs(autocast_inputs)
        self._dtype = jnp.dtype(dtype)

    def cast_parameters(self, values: Sequence[Any]) -> list:
        """Floating-point parameter values cast to bfloat16 (inside the step; gradients flow back as float32)."""
        return [_cast_floating(value, self._dtype) for value in values]

    def cast_batch(self, batch: Any) -> Any:
        """The floating-point arrays of the model's inputs (``autocast_inputs``, by default the batch's first part)
        cast to bfloat16; every other leaf as it is; dicts in their order.

        Raises:
            ValueError: A path of ``autocast_inputs`` names no part of the batch (the batch's key paths are listed).
        """
        ordered = ordered_dicts(batch)  # jax.tree_util would rebuild plain dicts with sorted keys
        leaves, treedef = jax.tree_util.tree_flatten_with_path(ordered)
        paths = [jax.tree_util.keystr(path) for path, _ in leaves]
        parts = self.autocast_inputs
        if parts is None:
            first = jax.tree_util.tree_flatten_with_path(ordered, is_leaf=lambda node: node is not ordered)[0]
            parts = (jax.tree_util.keystr(first[0][0]),) if first else ()
        for part in parts:
            if not any(_within(path, part) for path in paths):
                raise ValueError(
                    f"autocast_inputs names {part!r}, which is no part of the batch; the batch's arrays are at "
                    f"{paths[:12]}{' ...' if len(paths) > 12 else ''}"
                )
        cast = [
            _cast_floating(leaf, self._dtype) if any(_within(path, part) for part in parts) else leaf
            for path, (_, leaf) in zip(paths, leaves)
        ]
        return from_traceable(jax.tree_util.tree_unflatten(treedef, cast))

    def cast_loss(self, loss: Any) -> Any:
        """The model's loss in float32: what is differentiated, returned and logged."""
        return loss.astype(jnp.float32)

    def scale_loss(self, loss: Any, optimizer: Any = None) -> Any:
        """The loss in float32 for the gradient (no scaling: bfloat16 needs none)."""
        return loss.astype(jnp.float32)
