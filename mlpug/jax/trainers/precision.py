"""JAX precision policies (the protocol of :mod:`mlpug.trainers.precision`), used inside the compiled step.

:class:`FullPrecision` is the null object: the forward pass on the values as they are, the loss as it is for the
gradient, every optimizer steps. :class:`MixedPrecision` (bfloat16) casts the floating-point parameter values and the
floating-point arrays of the batch to ``bfloat16`` for the forward pass (inside the step: the parameters stay
float32, and their gradients, through the cast, are float32); the loss is differentiated in float32. Other
variables (batch statistics, random keys) keep their dtypes. float16 would need loss scaling, which the JAX backend
does not implement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mlpug.jax.trainers.traced_optimizer import TracedOptimizer
from mlpug.trainers.precision import AutocastDtype, PrecisionPolicy, validate_mixed_precision


class FullPrecision(PrecisionPolicy):
    """Null precision policy: nothing is cast, every optimizer steps."""

    def cast_parameters(self, values: Sequence[Any]) -> list:
        """The parameter values for the forward pass; here: as they are."""
        return list(values)

    def cast_batch(self, batch: Any) -> Any:
        """The batch for the forward pass; here: as it is."""
        return batch

    def step(self, optimizers: Mapping[str, Any], gradients: Optional[Mapping[str, list]] = None) -> Any:
        """``optimizer.apply(gradients[name])`` for every :class:`TracedOptimizer`; returns False (no step is ever
        skipped by a precision policy on JAX)."""
        assert gradients is not None
        for name, optimizer in optimizers.items():
            assert isinstance(optimizer, TracedOptimizer)
            optimizer.apply(gradients[name])
        return False


def _cast_floating(value: Any, dtype: Any) -> Any:
    if isinstance(value, jax.Array) or hasattr(value, "dtype"):
        if jnp.issubdtype(jnp.result_type(value), jnp.floating):
            return jnp.asarray(value).astype(dtype)
    return value


class MixedPrecision(FullPrecision):
    """bfloat16 forward pass (see the module docstring).

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


def precision_policy(use_mixed_precision: bool, autocast_dtype: Optional[str]) -> FullPrecision:
    """The precision policy for the trainer arguments: :class:`FullPrecision` or :class:`MixedPrecision`.

    Raises:
        TypeError / ValueError: Bad arguments (see :func:`mlpug.trainers.precision.validate_mixed_precision`), or
            ``autocast_dtype="float16"`` (not supported on JAX).
    """
    if use_mixed_precision is True and autocast_dtype == "float16":
        return MixedPrecision("float16")  # raises, saying why
    dtype = validate_mixed_precision(use_mixed_precision, autocast_dtype)
    return FullPrecision() if dtype is None else MixedPrecision(dtype)
