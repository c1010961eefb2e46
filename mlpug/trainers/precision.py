"""Mixed precision settings shared by the backends: the accepted autocast dtypes and their validation.

Backends implement the precision policies themselves (PyTorch: :mod:`mlpug.pytorch.trainers.precision`):
a full-precision null object and a mixed precision policy, composed into the one training step.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args

AutocastDtype = Literal["bfloat16", "float16"]
"""Low-precision dtype of the mixed precision forward pass. ``"bfloat16"`` has float32's exponent range (no
loss scaling needed; fast on recent CPUs and GPUs); ``"float16"`` needs loss scaling against gradient
underflow (Micikevicius et al. 2018, "Mixed Precision Training")."""

AUTOCAST_DTYPES = get_args(AutocastDtype)
DEFAULT_AUTOCAST_DTYPE: AutocastDtype = "bfloat16"


def validate_mixed_precision(use_mixed_precision: Any, autocast_dtype: Any) -> Optional[AutocastDtype]:
    """Check the mixed precision arguments of a trainer; return the autocast dtype to use, or None.

    Args:
        use_mixed_precision: bool; True to train with mixed precision.
        autocast_dtype: ``"bfloat16"``, ``"float16"`` or ``None`` (``"bfloat16"`` when mixed precision is used).

    Returns:
        The autocast dtype name when ``use_mixed_precision`` is True, else ``None`` (full precision).

    Raises:
        TypeError: ``use_mixed_precision`` is not a bool.
        ValueError: ``autocast_dtype`` is not one of the accepted names, or is given without
            ``use_mixed_precision=True`` (it would have no effect).
    """
    if not isinstance(use_mixed_precision, bool):
        raise TypeError(f"use_mixed_precision must be a bool, got {use_mixed_precision!r:.100}")
    if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be one of {list(AUTOCAST_DTYPES)} or None, got {autocast_dtype!r:.100}")
    if not use_mixed_precision:
        if autocast_dtype is not None:
            raise ValueError(
                f"autocast_dtype={autocast_dtype!r} has no effect without use_mixed_precision=True; "
                "set use_mixed_precision=True or leave autocast_dtype out"
            )
        return None
    return autocast_dtype or DEFAULT_AUTOCAST_DTYPE
