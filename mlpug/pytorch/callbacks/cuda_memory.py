"""PyTorch CUDA memory tools: ``LogCudaMemory`` (``torch.cuda`` memory statistics into ``logs``) and
``EmptyCudaCache`` (return cached blocks to the driver at chosen moments).

Both need CUDA and say so at construction. The statistics are host-side counters of PyTorch's caching allocator
(``torch.cuda.memory_allocated`` and friends): reading them does not wait for the device.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from mlpug.trainers.callback import Callback

__all__ = ["EmptyCudaCache", "LogCudaMemory"]


def _require_cuda(name: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{name} needs a CUDA device, but torch.cuda.is_available() is False (a CPU-only torch build, or no GPU "
            "visible: check CUDA_VISIBLE_DEVICES); leave it out of the callbacks when training on the CPU"
        )


def _check_period(value: Any, argument: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


class LogCudaMemory(Callback):
    """Writes the CUDA memory of this rank's device into ``logs.current.cuda_memory.batch`` every ``log_period``
    batches and into ``logs.current.cuda_memory.epoch`` at every epoch end: ``allocated_bytes``,
    ``reserved_bytes``, ``max_allocated_bytes`` and ``max_reserved_bytes`` (bytes, ints; the peaks since the start
    of the current epoch: they are reset with ``torch.cuda.reset_peak_memory_stats`` at the start of training and
    after every epoch-level write).
    ``Tensorboard("cuda_memory.batch.allocated_bytes")`` or ``LogProgress`` can then show them.

    Args:
        device: The CUDA device (default: the current one, ``torch.cuda.current_device()``).
        log_period: Batches between two batch-level writes (int >= 1; default 1).
        name: The callback's name.

    Raises:
        RuntimeError: No CUDA device (``torch.cuda.is_available()`` is False).
        ValueError: A bad ``log_period``.
    """

    def __init__(self, device: Optional[Any] = None, log_period: int = 1, name: Optional[str] = None):
        super().__init__(name)
        _require_cuda(type(self).__name__)
        _check_period(log_period, "log_period")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.log_period = log_period

    @property
    def produces(self) -> frozenset:
        return frozenset({"cuda_memory"})

    @property
    def log_paths(self) -> frozenset:
        return frozenset(
            f"cuda_memory.{level}.{key}"
            for level in ("batch", "epoch")
            for key in ("allocated_bytes", "reserved_bytes", "max_allocated_bytes", "max_reserved_bytes")
        )

    def statistics(self) -> dict[str, int]:
        """The four counters of the device now (bytes)."""
        device = self.device
        return {
            "allocated_bytes": int(torch.cuda.memory_allocated(device)),
            "reserved_bytes": int(torch.cuda.memory_reserved(device)),
            "max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
            "max_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        }

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        torch.cuda.reset_peak_memory_stats(self.device)
        return True

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """None: it reads this device's counters, never a value reduced over the ranks."""
        return None

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> bool:
        current = logs["current"]
        if (current["global_iter"] + 1) % self.log_period == 0:
            current.setdefault("cuda_memory", {})["batch"] = self.statistics()
        return True

    def on_epoch_completed(self, logs: dict) -> bool:
        logs["current"].setdefault("cuda_memory", {})["epoch"] = self.statistics()
        torch.cuda.reset_peak_memory_stats(self.device)
        return True


class EmptyCudaCache(Callback):
    """Calls ``torch.cuda.empty_cache()`` at every epoch end (after the validation of the metric loggers, which are
    producers and run first), and every ``every_n_batches`` batches when given: it returns the allocator's unused
    cached blocks to the driver, e.g. for other processes on the GPU or before a memory-hungry evaluation. It
    does not free memory that tensors still use, and it makes later allocations slower.

    Args:
        every_n_batches: Also empty the cache every this many batches (int >= 1), default None (epoch ends only).
        name: The callback's name.

    Raises:
        RuntimeError: No CUDA device.
        ValueError: A bad ``every_n_batches``.
    """

    def __init__(self, every_n_batches: Optional[int] = None, name: Optional[str] = None):
        super().__init__(name)
        _require_cuda(type(self).__name__)
        _check_period(every_n_batches, "every_n_batches", allow_none=True)
        self.every_n_batches = every_n_batches

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """None: it reads no value."""
        return None

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> bool:
        if self.every_n_batches is not None and (logs["current"]["global_iter"] + 1) % self.every_n_batches == 0:
            torch.cuda.empty_cache()
        return True

    def on_epoch_completed(self, logs: dict) -> bool:
        torch.cuda.empty_cache()
        return True
