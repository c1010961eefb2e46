"""``DDPStrategy``: data-parallel training with ``torch.nn.parallel.DistributedDataParallel``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from mlpug.distributed import DistributedContext
from mlpug.pytorch.distributed import (
    DDPGradientSync,
    TorchDistributedContext,
    join_launch,
    shard_evaluation_dataset,
    shard_training_dataset,
    warn_if_random_states_differ,
)
from mlpug.trainers.gradient_sync import GradientSync
from mlpug.trainers.strategy import Strategy


class DDPStrategy(Strategy):
    """Every rank holds the whole model; gradients are all-reduced by DDP once per batch (in the last chunk's
    backward pass); each rank trains and evaluates its shard of the data (see :mod:`mlpug.pytorch.distributed`).

    The process group is joined at construction (:func:`~mlpug.pytorch.distributed.init_distributed`, from the
    environment ``torchrun`` or :func:`~mlpug.pytorch.distributed.launch` sets).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: Seconds a collective waits for the other ranks (default ``MLPUG_DISTRIBUTED_TIMEOUT_S`` or 300).

    When the process group exists already (the script initialised it, or an earlier trainer of this process did),
    it is used as it is: ``backend`` and ``timeout_s`` are then those of that group.

    Raises:
        ValueError: No data-parallel launch: ``WORLD_SIZE`` is unset or 1 (and no process group of several ranks
            exists); or ``WORLD_SIZE`` / the timeout is invalid.
        RuntimeError: ``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT`` is missing (a launcher other than torchrun).
    """

    name = "ddp"

    def __init__(self, backend: Optional[str] = None, timeout_s: Optional[float] = None):
        self._context: TorchDistributedContext = join_launch("ddp", backend, timeout_s)
        self._gradient_sync: GradientSync = GradientSync()

    def distributed_context(self) -> DistributedContext:
        return self._context

    def prepare_training_model(self, training_model: Any, device: Any = None) -> Any:
        """``DistributedDataParallel(training_model)`` (its parameters broadcast from rank 0 here); warns when the
        ranks' random states differ (their data order or dropout would)."""
        ddp = torch.nn.parallel.DistributedDataParallel(
            training_model, device_ids=[device] if device is not None and device.type == "cuda" else None
        )
        self._gradient_sync = DDPGradientSync(ddp)
        warn_if_random_states_differ(self._context)
        return ddp

    def gradient_sync(self) -> GradientSync:
        """DDP's: ``no_sync()`` for every chunk of a batch but the last."""
        return self._gradient_sync

    def training_dataset(self, dataset: Any) -> Any:
        """This rank's shard (see :func:`mlpug.pytorch.distributed.shard_training_dataset`)."""
        return shard_training_dataset(dataset, self._context)

    def evaluation_dataset(self, dataset: Any) -> Any:
        """This rank's unpadded shard (see :func:`mlpug.pytorch.distributed.shard_evaluation_dataset`)."""
        return shard_evaluation_dataset(dataset, self._context)
