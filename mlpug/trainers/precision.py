"""The precision policy protocol of the training step, and the mixed precision settings shared by the backends.

A precision policy owns the parts of the step that numeric precision changes. Every backend implements the
same methods (``mlpug.pytorch.trainers.precision``, ``mlpug.tensorflow.trainers.precision``); the trainer calls
them unconditionally, so full precision (the null object) gives exactly the plain step::

    optimizers = precision.prepare_optimizers(optimizers)       # at construction (TF float16: LossScaleOptimizer)
    precision.prepare_model(layers)                             # model components and training model (TF dtype policy)
    with precision.autocast():                                  # forward pass (PyTorch: torch.autocast)
        loss = training_model(chunk, ...)
    target = precision.scale_loss(weighted_loss, optimizer)     # before backward (float16: loss scaling)
    skipped = precision.step(optimizers, gradients)             # optimizer step; may be skipped on inf/nan gradients

:class:`PrecisionPolicy` has one abstract method, :meth:`PrecisionPolicy.step` (how an optimizer applies its
gradients is the backend's); the rest are identity / no-op defaults that mixed precision overrides.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal, Optional, get_args

AutocastDtype = Literal["bfloat16", "float16"]
"""Low-precision dtype of the mixed precision forward pass. ``"bfloat16"`` has float32's exponent range (no
loss scaling needed; fast on recent CPUs and GPUs); ``"float16"`` needs loss scaling against gradient
underflow (Micikevicius et al. 2018, "Mixed Precision Training")."""

AUTOCAST_DTYPES = get_args(AutocastDtype)
DEFAULT_AUTOCAST_DTYPE: AutocastDtype = "bfloat16"


class PrecisionPolicy(ABC):
    """The precision protocol; the defaults are those of full precision (nothing changes the plain step).

    Attributes:
        autocast_dtype: ``None`` (full precision), ``"bfloat16"`` or ``"float16"``.
    """

    autocast_dtype: Optional[AutocastDtype] = None

    @property
    def uses_loss_scaling(self) -> bool:
        """True when losses are scaled before backward and a step may be skipped (float16)."""
        return False

    def prepare_model(self, layers: Iterable[Any]) -> None:  # noqa: B027 (a no-op default, on purpose)
        """Prepare model layers for this precision (e.g. set a dtype policy); default: nothing."""

    def prepare_optimizers(self, optimizers: Mapping[str, Any]) -> dict[str, Any]:
        """The optimizers to train with (e.g. wrapped for loss scaling); default: as given."""
        return dict(optimizers)

    def autocast(self) -> AbstractContextManager:
        """Context of the forward pass; default: a do-nothing context."""
        return nullcontext()

    def scale_loss(self, loss: Any, optimizer: Any = None) -> Any:
        """The backward target for ``loss`` and the gradients of ``optimizer``; default: the loss itself.

        Policies with one scale for all optimizers (PyTorch's ``GradScaler``) ignore ``optimizer``.
        """
        return loss

    @abstractmethod
    def step(self, optimizers: Mapping[str, Any], gradients: Optional[Mapping[str, list]] = None) -> Any:
        """Apply every optimizer's step to its gradients.

        Args:
            optimizers: The optimizers by name.
            gradients: Per optimizer name, its ``(gradient, variable)`` pairs (TensorFlow), or ``None`` when the
                gradients are on the parameters (PyTorch).

        Returns:
            Whether the step was skipped (inf/nan gradients under loss scaling): the Python ``False`` when it
            never is, else a bool or a backend boolean scalar (read without waiting for the device).
        """

    def get_state(self) -> dict:
        """State to save with the trainer (e.g. a loss scaler's scale); default ``{}``."""
        return {}

    def set_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (a no-op default, on purpose)
        """Restore what :meth:`get_state` returned (given the whole trainer state); default: nothing."""


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
