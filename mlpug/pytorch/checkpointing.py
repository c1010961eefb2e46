"""PyTorch checkpoint files: safetensors files written with ``safetensors.torch``, memory-mapped when loaded.

Checkpoints hold only tensors and plain containers (whatever ``trainer.get_state()`` returns: module and
optimizer ``state_dict``s, an AMP ``GradScaler`` state, ...); tensors keep their dtype (bfloat16 and float8
included) and loading never unpickles anything. The structure codec, checksum and header checks are the
neutral ones of :class:`mlpug.checkpointing.CheckpointSaver`; this module supplies the tensor hooks.
See :mod:`mlpug.checkpointing` for file names, contents, format and the write protocol.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import safetensors
import safetensors.torch
import torch

from mlpug.checkpointing import CheckpointSaver as _NeutralCheckpointSaver
from mlpug.checkpointing import snapshot_tree
from mlpug.checkpointing.sharded import resolve_reference

_log = logging.getLogger("mlpug.pytorch.checkpointing")

# torch dtypes that safetensors both writes and reads back
_DTYPES = frozenset(
    getattr(torch, name)
    for name in (
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex64",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
    )
    if hasattr(torch, name)
)  # fmt: skip


def _copy_tensor(tensor: torch.Tensor, buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """``tensor`` detached and copied into ``buffer`` (host memory) when it fits, else into new host memory. For
    CUDA tensors this is a device-to-host copy (a synchronisation point)."""
    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    return buffer.copy_(tensor.detach())


class CheckpointSaver(_NeutralCheckpointSaver):
    """Writes checkpoints with ``safetensors.torch.save_file`` and memory-maps them with ``safetensors.safe_open``.

    Tensors are stored as they are (dtype, shape; non-contiguous ones are made contiguous, tensors of other
    devices copied to CPU, and tensors sharing memory with an earlier one of the same checkpoint copied, which
    safetensors requires). Loaded tensors are new tensors on ``map_location``; sharing between tensors is not
    restored (``load_state_dict`` copies values anyway).

    Args:
        map_location: The device loaded tensors are placed on: ``"cpu"`` (default; ``load_state_dict`` then
            copies them to the parameters' devices), ``"cuda:0"``, a device index or a ``torch.device``. Unlike
            ``torch.load``, a dict or a function is not accepted.
        reuse_buffers: :meth:`snapshot` copies into the host buffers of the previous snapshot (same structure,
            shapes and dtypes), so a snapshot is valid until the next one; the ``CheckpointManager`` waits for
            the previous write before it snapshots again. Costs one host copy of the state; saves allocating
            (and page-faulting) it at every checkpoint.

    Raises:
        RuntimeError: ``map_location`` is not a device torch knows.
    """

    backend = "pytorch"

    def __init__(self, map_location: Any = "cpu", reuse_buffers: bool = True):
        self.map_location = map_location
        self.reuse_buffers = reuse_buffers
        self._device = str(torch.device(map_location))
        self._buffers: dict = {}

    def snapshot(self, state: Any) -> Any:
        buffers = self._buffers if self.reuse_buffers else None
        return snapshot_tree(state, lambda value: isinstance(value, torch.Tensor), _copy_tensor, buffers)

    def stored_array(self, value: Any, where: str) -> Optional[torch.Tensor]:
        if not isinstance(value, torch.Tensor):
            return None
        if value.dtype not in _DTYPES or value.layout != torch.strided:
            raise TypeError(
                f"{where} is a {value.layout} tensor of dtype {value.dtype}; checkpoint files hold dense tensors "
                f"of the dtypes {', '.join(sorted(str(dtype) for dtype in _DTYPES))}"
            )
        return value.detach().to("cpu").contiguous()

    def array_bytes(self, array: torch.Tensor) -> np.ndarray:
        return array.reshape(-1).view(torch.uint8).cpu().numpy()  # a view for contiguous CPU tensors

    def is_finite_array(self, array: torch.Tensor) -> bool:
        return not (array.is_floating_point() or array.is_complex()) or bool(torch.isfinite(array).all())

    def save_arrays(self, arrays: dict[str, Any], metadata: dict[str, str], path: str) -> None:
        storages: set = set()
        unshared = {}
        for name, tensor in arrays.items():
            storage = tensor.untyped_storage().data_ptr()
            unshared[name] = tensor.clone() if storage in storages else tensor
            storages.add(storage)
        safetensors.torch.save_file(unshared, path, metadata=metadata)

    def open_file(self, path: str) -> Any:
        return safetensors.safe_open(path, framework="pt", device=self._device)


def load_training_checkpoint(path: str) -> dict:
    """Load a training checkpoint written by a PyTorch ``CheckpointManager``.

    Pass the result as ``TrainingManager(..., resume_from=...)``.

    Args:
        path: The training checkpoint file (``<base>-training-checkpoint.safetensors``).

    Returns:
        The training state (``TrainingManager.get_state()`` plus the ``"mlpug"`` header, whose ``"path"`` is set). Of
        a sharded checkpoint (FSDP, see :mod:`mlpug.pytorch.sharded_checkpoint`) the trainer state is a reference to
        its shard directory, which ``DefaultTrainer.set_state`` reads, on any number of ranks.

    Raises:
        mlpug.checkpointing.CheckpointError: Missing, truncated, corrupt, of another backend or a model checkpoint.
    """
    checkpoint = CheckpointSaver().load(path, kind="training")
    resolve_reference(checkpoint, path)  # a sharded training checkpoint: its shard directory, next to the file
    return checkpoint


def load_model_checkpoint(path: str) -> dict:
    """Load a model checkpoint (best / latest / archived): ``model_components``, ``hyper_parameters``, ``progress``.

    Raises:
        mlpug.checkpointing.CheckpointError: Missing, truncated, corrupt, of another backend or a training checkpoint.
    """
    return CheckpointSaver().load(path, kind="model")
