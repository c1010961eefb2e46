"""PyTorch precision policies composed into the ``DefaultTrainer`` step: full precision and mixed precision.

A policy owns three parts of the step: the context of the forward pass (``autocast``), the backward pass
(``backward``, with loss scaling for float16) and the optimizer step (``step``, skipped on inf/nan gradients
under loss scaling). :class:`FullPrecision` is the null object: the plain ``loss.backward()`` and
``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch

from mlpug.trainers.precision import AutocastDtype, validate_mixed_precision


class FullPrecision:
    """Null precision policy: no autocast, no loss scaling, every optimizer steps."""

    autocast_dtype: Optional[str] = None
    grad_scaler: Optional[torch.amp.GradScaler] = None

    def autocast(self) -> AbstractContextManager:
        """A do-nothing context."""
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``."""
        loss.backward()

    def step(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """``optimizer.step()`` for every optimizer; returns False (no step is ever skipped)."""
        for optimizer in optimizers:
            optimizer.step()
        return False

    def get_state(self) -> dict:
        """Nothing to save: ``{}``."""
        return {}

    def set_state(self, state: dict) -> None:
        """Nothing to restore; a saved ``"grad_scaler"`` state (from a float16 run) is ignored.

        Args:
            state: The trainer state that holds what :meth:`get_state` returned.
        """


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
        self.autocast_dtype = validate_mixed_precision(True, autocast_dtype)
        self.device_type = device_type
        self._dtype = getattr(torch, self.autocast_dtype)
        if self.autocast_dtype == "float16":
            self.grad_scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler(device_type)
        self._stepped: set = set()
        self._hooked: set = set()

    def autocast(self) -> AbstractContextManager:
        """``torch.autocast(device_type, dtype)``."""
        return torch.autocast(self.device_type, dtype=self._dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the (scaled, for float16) loss."""
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()

    def step(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Step every optimizer through the scaler (float16) and update the scale.

        Returns:
            True when the scaler skipped the step of at least one optimizer (inf/nan gradients). The scaler
            itself synchronises with the device to decide; no extra synchronisation is added.
        """
        scaler = self.grad_scaler
        if scaler is None:
            return super().step(optimizers)
        self._stepped.clear()
        for optimizer in optimizers:
            self._watch(optimizer)
            scaler.step(optimizer)
        scaler.update()
        return len(self._stepped) < len(optimizers)

    def _watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Record, with a public step post-hook, that ``optimizer.step()`` really ran (the scaler may skip it)."""
        if id(optimizer) not in self._hooked:
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._stepped.add(id(opt)))
            self._hooked.add(id(optimizer))

    def get_state(self) -> dict:
        """``{"grad_scaler": scaler.state_dict()}`` for float16, else ``{}``."""
        if self.grad_scaler is None:
            return {}
        return {"grad_scaler": self.grad_scaler.state_dict()}

    def set_state(self, state: dict) -> None:
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
