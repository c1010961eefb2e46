"""PyTorch precision policies (the protocol of :mod:`mlpug.trainers.precision`): full and mixed precision.

:class:`FullPrecision` is the null object: no autocast, the loss as it is for ``loss.backward()``, and
``optimizer.step()``. :class:`MixedPrecision` runs the forward pass under ``torch.autocast`` and, for float16,
scales the loss and steps through a ``torch.amp.GradScaler``. Gradients live on the parameters, so ``step``
receives no gradients (``None``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch

from mlpug.trainers.precision import AutocastDtype, PrecisionPolicy, validate_mixed_precision


class FullPrecision(PrecisionPolicy):
    """Null precision policy: no autocast, no loss scaling, every optimizer steps."""

    grad_scaler: Optional[torch.amp.GradScaler] = None

    def step(self, optimizers: Mapping[str, Any], gradients: Optional[Mapping[str, list]] = None) -> Any:
        """``optimizer.step()`` for every optimizer; returns False (no step is ever skipped)."""
        for optimizer in optimizers.values():
            optimizer.step()
        return False


class MixedPrecision(FullPrecision):
    """Mixed precision: forward pass under ``torch.autocast``; loss scaling with a ``GradScaler`` for float16.

    bfloat16 has the exponent range of float32, so gradients do not underflow and no scaler is used. For
    float16 a ``torch.amp.GradScaler`` multiplies the loss by a scale before backward, unscales the
    gradients in ``step`` and skips the optimizer step when a gradient is inf/nan; it then lowers the scale
    (by ``backoff_factor``, 0.5) and raises it again after ``growth_interval`` (2000) good steps.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ... (the device type of the model's parameters).
        autocast_dtype: ``"bfloat16"`` or ``"float16"``.
        grad_scaler: The scaler for float16; default ``torch.amp.GradScaler(device_type)``. Ignored for bfloat16.

    Raises:
        ValueError: ``autocast_dtype`` is not ``"bfloat16"`` or ``"float16"``.
    """

    def __init__(
        self, device_type: str, autocast_dtype: AutocastDtype, grad_scaler: Optional[torch.amp.GradScaler] = None
    ):
        dtype = validate_mixed_precision(True, autocast_dtype)
        assert dtype is not None
        self.autocast_dtype: Optional[AutocastDtype] = dtype
        self.device_type = device_type
        self._dtype = getattr(torch, dtype)
        if self.autocast_dtype == "float16":
            self.grad_scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler(device_type)
        self._stepped: set = set()
        self._found_inf: list = []
        self._hooked: set = set()

    @property
    def uses_loss_scaling(self) -> bool:
        return self.grad_scaler is not None

    def autocast(self) -> AbstractContextManager:
        """``torch.autocast(device_type, dtype)``."""
        return torch.autocast(self.device_type, dtype=self._dtype)

    def scale_loss(self, loss: Any, optimizer: Any = None) -> Any:
        """``grad_scaler.scale(loss)`` for float16 (one scale for every optimizer), else the loss itself."""
        return loss if self.grad_scaler is None else self.grad_scaler.scale(loss)

    def step(self, optimizers: Mapping[str, Any], gradients: Optional[Mapping[str, list]] = None) -> Any:
        """Step every optimizer through the scaler (float16) and update the scale.

        Returns:
            Whether the scaler skipped the step of at least one optimizer (inf/nan gradients): a bool, or, when an
            optimizer has a fused implementation that skips inside its kernel (``fused=True``: the scaler always
            calls its ``step`` and hands it the ``found_inf`` tensor), a 0-d bool tensor read lazily. The scaler
            itself synchronises with the device to decide for the other optimizers; no extra synchronisation is
            added.
        """
        scaler = self.grad_scaler
        if scaler is None:
            return super().step(optimizers)
        self._stepped.clear()
        self._found_inf.clear()
        for optimizer in optimizers.values():
            self._watch(optimizer)
            scaler.step(optimizer)
        scaler.update()
        skipped = len(self._stepped) < len(optimizers)
        if skipped or not self._found_inf:
            return skipped
        return torch.stack([found.reshape(()) for found in self._found_inf]).sum() > 0

    def _watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Record, with public step hooks, that ``optimizer.step()`` really ran (the scaler may skip it) and the
        ``found_inf`` tensor the scaler hands to an optimizer that skips in its own kernel (a fused one)."""
        if id(optimizer) not in self._hooked:
            optimizer.register_step_pre_hook(self._record_found_inf)
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._stepped.add(id(opt)))
            self._hooked.add(id(optimizer))

    def _record_found_inf(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler.step for the length of the step
        if isinstance(found_inf, torch.Tensor):
            self._found_inf.append(found_inf)

    def get_state(self) -> dict:
        """``{"grad_scaler": scaler.state_dict()}`` for float16, else ``{}``."""
        if self.grad_scaler is None:
            return {}
        return {"grad_scaler": self.grad_scaler.state_dict()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore the scaler state saved by :meth:`get_state`; a state without one keeps the current scaler.

        Args:
            state: The trainer state that holds what :meth:`get_state` returned (key ``"grad_scaler"``).
        """
        scaler_state = state.get("grad_scaler")
        if self.grad_scaler is not None and scaler_state:
            self.grad_scaler.load_state_dict(scaler_state)


def precision_policy(
    use_mixed_precision: bool, autocast_dtype: Optional[AutocastDtype], device_type: str
) -> FullPrecision:
    """The precision policy for the trainer arguments: :class:`FullPrecision` or :class:`MixedPrecision`.

    Raises:
        TypeError / ValueError: Bad arguments (see :func:`mlpug.trainers.precision.validate_mixed_precision`).
    """
    dtype = validate_mixed_precision(use_mixed_precision, autocast_dtype)
    return FullPrecision() if dtype is None else MixedPrecision(device_type, dtype)
