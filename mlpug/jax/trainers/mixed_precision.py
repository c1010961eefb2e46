"""The bfloat16 JAX precision policy (:class:`MixedPrecision`; the protocol is :mod:`mlpug.jax.trainers.precision`).

The floating-point parameter values and the floating-point arrays of the batch are cast to ``bfloat16`` for the
forward pass, inside the step: the parameters stay float32, and their gradients, through the cast, are float32; the
loss is differentiated in float32. Other variables (batch statistics, random keys) keep their dtypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mlpug.jax.trainers.full_precision import FullPrecision
from mlpug.trainers.precision import AutocastDtype, validate_mixed_precision


def _cast_floating(value: Any, dtype: Any) -> Any:
    """``value`` in ``dtype`` when it is a floating-point array, else as it is."""
    if isinstance(value, jax.Array) or hasattr(value, "dtype"):
        if jnp.issubdtype(jnp.result_type(value), jnp.floating):
            return jnp.asarray(value).astype(dtype)
    return value


class MixedPrecision(FullPrecision):
    """bfloat16 forward pass (see the module docstring); the optimizers step as in full precision.

    Args:
        autocast_dtype: ``"bfloat16"``.

    Raises:
        ValueError: ``autocast_dtype`` is ``"float16"`` (it needs loss scaling; use ``"bfloat16"``) or unknown.
    """

    def __init__(self, autocast_dtype: AutocastDtype):
        if autocast_dtype == "float16":
            raise ValueError(
                "autocast_dtype='float16' is not supported on JAX: float16 training needs loss scaling, which the JAX "
                "backend does not implement; use autocast_dtype='bfloat16' (the exponent range of float32, no loss "
                "scaling needed)"
            )
        dtype = validate_mixed_precision(True, autocast_dtype)
        assert dtype is not None
        self.autocast_dtype: Optional[AutocastDtype] = dtype
        self._dtype = jnp.dtype(dtype)

    def cast_parameters(self, values: Sequence[Any]) -> list:
        """Floating-point parameter values cast to bfloat16 (inside the step; gradients flow back as float32)."""
        return [_cast_floating(value, self._dtype) for value in values]

    def cast_batch(self, batch: Any) -> Any:
        """Floating-point arrays of the batch cast to bfloat16; other leaves (labels, static values) as they are."""
        return jax.tree_util.tree_map(lambda leaf: _cast_floating(leaf, self._dtype), batch)

    def scale_loss(self, loss: Any, optimizer: Any = None) -> Any:
        """The loss in float32 for the gradient (no scaling: bfloat16 needs none)."""
        return loss.astype(jnp.float32)
