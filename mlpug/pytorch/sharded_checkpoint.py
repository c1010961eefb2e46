"""Sharded training checkpoints on ``torch.distributed.checkpoint`` (DCP); see :mod:`mlpug.checkpointing.sharded`.

Writing (:class:`DCPShardedCheckpoints`, a collective): the tensors of the trainer state (``DTensor`` shards and plain
tensors) go to DCP's ``FileSystemWriter`` (every rank its shards, files fsync'ed, the metadata written last by rank
0); everything else of the training checkpoint is written by mlpug after that, as the commit. In the background, the
save runs on a gloo process group of its own (``dcp.async_save``; sharing the training group would interleave its
collectives with training's).

Reading (:func:`load_sharded_trainer_state`): into the trainer's live state, whatever its sharding (resharding from
any number of ranks to any other, or into one process without a process group), through
:mod:`mlpug.pytorch.dcp_reading`, which never unpickles untrusted bytes.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import Future
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from mlpug.checkpointing.files import fsync_directory
from mlpug.checkpointing.header import CheckpointError
from mlpug.checkpointing.sharded import (
    SHARDED_KEY,
    ShardedCheckpoints,
    Wait,
    join_arrays,
    same_mapping,
    split_arrays,
)
from mlpug.pytorch.distributed import TorchDistributedContext

FORMAT = "torch-dcp"
"""The ``format`` of the reference in training checkpoints written here."""


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


class DCPShardedCheckpoints(ShardedCheckpoints):
    """Writes the trainer state of sharded training checkpoints with DCP, and gathers the model for model checkpoints.

    Args:
        context: The strategy's distributed context (rank 0 is the primary).
    """

    def __init__(self, context: TorchDistributedContext):
        self.context = context
        self._group: Optional[Any] = None  # the process group of background saves, created at the first one
        self.run_token = -1  # agreed by the ranks at the first save (see shard_directory)
        self.saves = 0

    def next_directory_suffix(self) -> tuple[int, int]:
        """``(run token, count)`` of the next save's shard directory (a collective at the first call)."""
        if self.run_token < 0:
            self.run_token = self.context.broadcast_int(random.SystemRandom().getrandbits(31))
        self.saves += 1
        return self.run_token, self.saves

    def gather_model_components(self, model_components: dict) -> dict:
        """One all-gather per sharded tensor (``DTensor.full_tensor()``), copied to host memory on rank 0."""
        plain, arrays = split_arrays(model_components, _is_tensor)
        primary = self.context.is_primary
        gathered = {}
        with torch.no_grad():
            for key, tensor in arrays.items():
                full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                if primary:
                    gathered[key] = full.detach().to("cpu", copy=True)
        return join_arrays(plain, gathered, "model components") if primary else {}

    def save(self, trainer_state: dict, directory: str, background: bool) -> tuple[dict, Wait]:
        plain, arrays = split_arrays(trainer_state, _is_tensor)
        reference = {
            "format": FORMAT,
            "directory": os.path.basename(directory),
            "world_size": self.context.world_size,
            "keys": sorted(arrays),
        }
        writer = dcp.FileSystemWriter(directory, sync_files=True)
        stored = {SHARDED_KEY: reference, "plain": plain}
        # Tensors every rank holds whole (buffers, optimizer step counts) are written once, by the lowest rank.
        planner = dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True)
        if not background:
            dcp.save(arrays, storage_writer=writer, planner=planner)
            fsync_directory(directory)
            return stored, _nothing
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        future = dcp.async_save(arrays, storage_writer=writer, planner=planner, process_group=self._group)
        # a Future, or (a stager that stages in the background) an AsyncSaveResponse
        upload: Future = future if isinstance(future, Future) else future.upload_completion

        def wait() -> None:
            upload.result()
            fsync_directory(directory)

        return stored, wait

    def close(self) -> None:
        """Destroy the process group of background saves (every rank; after the last save finished)."""
        group, self._group = self._group, None
        if group is not None and dist.is_initialized():
            dist.destroy_process_group(group)


def _nothing() -> None:
    pass


def initialize_optimizer_states(optimizers: list[torch.optim.Optimizer]) -> None:
    """Give every optimizer without state its state tensors (one step on zero gradients at learning rate 0, as
    ``torch.distributed.checkpoint.state_dict`` does), so that a checkpoint can be loaded into them in place. The
    parameters do not change for optimizers whose update scales with the learning rate (SGD, Adam, AdamW, ...);
    their gradients are cleared. Optimizers whose ``step`` needs a closure (LBFGS) raise here."""
    for optimizer in optimizers:
        if optimizer.state:
            continue
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if any(p.grad is not None for p in parameters):
            continue
        for parameter in parameters:
            parameter.grad = torch.zeros_like(parameter)
        learning_rates = [group.get("lr") for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            if "lr" in group:
                group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        optimizer.step()
        for group, lr in zip(optimizer.param_groups, learning_rates):
            if lr is not None:
                group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)


def load_sharded_trainer_state(stored: dict, live_state: dict, where: str) -> dict:
    """The trainer state of a sharded training checkpoint, its tensors read into ``live_state``'s tensors in place.

    Args:
        stored: The trainer state in the training checkpoint (the reference with an absolute directory, see
            :func:`mlpug.checkpointing.sharded.resolve_reference`, and the plain part).
        live_state: ``trainer.get_state()`` with every tensor the checkpoint holds (optimizer states initialised,
            see :func:`initialize_optimizer_states`); sharded like the trainer's (any number of ranks).
        where: The checkpoint, for messages.

    Returns:
        The plain part with every placeholder replaced by the live tensor, now holding the checkpoint's values.

    Raises:
        mlpug.checkpointing.CheckpointError: Another format, tensors the trainer does not have or model tensors the
            checkpoint lacks (both listed), or what reading the shards raised (see :mod:`mlpug.pytorch.dcp_reading`).
    """
    from mlpug.pytorch.dcp_reading import load_sharded_tensors

    reference = stored[SHARDED_KEY]
    if reference.get("format") != FORMAT:
        raise CheckpointError(f"{where}: shards of format {reference.get('format')!r}; this version reads {FORMAT!r}")
    _, live = split_arrays(live_state, _is_tensor)
    saved = set(reference["keys"])
    # Optimizer states the checkpoint lacks (a parameter that never had a gradient, or no step taken yet) were made
    # by initialize_optimizer_states; load_state_dict of the plain part drops them again.
    missing = sorted(key for key in set(live) - saved if not key.startswith("optimizers."))
    if saved - set(live) or missing:
        raise CheckpointError(
            f"{where}: the checkpoint's tensors do not match the trainer's: only in the checkpoint "
            f"{sorted(saved - set(live))[:10]}, only in the trainer {missing[:10]}"
        )
    targets = {key: live[key] for key in reference["keys"]}
    load_sharded_tensors(targets, reference["directory"])
    return join_arrays(stored["plain"], targets, where)


def shard_like_live(state: Any, live: Any) -> Any:
    """``state`` (whole tensors, e.g. of a single-file checkpoint) with every tensor whose counterpart in ``live`` (the
    same path) is a ``DTensor`` replaced by this rank's shard of it, placed like the counterpart (no communication:
    every rank holds the whole tensor)."""
    if isinstance(state, torch.Tensor) and isinstance(live, DTensor) and not isinstance(state, DTensor):
        return _distribute_local(state, live)
    if isinstance(state, dict) and isinstance(live, dict):
        return same_mapping(state, {key: shard_like_live(value, live.get(key)) for key, value in state.items()})
    if isinstance(state, (list, tuple)) and isinstance(live, (list, tuple)) and len(state) == len(live):
        return type(state)(shard_like_live(value, other) for value, other in zip(state, live))
    return state


def _distribute_local(tensor: torch.Tensor, like: DTensor) -> DTensor:
    from torch.distributed.tensor import distribute_tensor

    source = tensor.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(source, like.device_mesh, like.placements, src_data_rank=None)
