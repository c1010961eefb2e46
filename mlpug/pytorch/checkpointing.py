"""PyTorch checkpoint files: safetensors files written with ``safetensors.torch``, memory-mapped when loaded.

Checkpoints hold only tensors and plain containers (whatever ``trainer.get_state()`` returns: module and
optimizer ``state_dict``s, an AMP ``GradScaler`` state, ...); tensors keep their dtype (bfloat16 and float8
included) and loading never unpickles anything. The structure codec, checksum and header checks are the
neutral ones of :class:`mlpug.checkpointing.CheckpointSaver`; this module supplies the tensor hooks.
See :mod:`mlpug.checkpointing` for file names, contents, format and the write protocol.
"""

from __future__ import annotations

import collections
import copy
import logging
from typing import Any, Optional

import numpy as np
import safetensors
import safetensors.torch
import torch

from mlpug.checkpointing import CheckpointSaver as _NeutralCheckpointSaver

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


def snapshot_tensors(state: Any, buffers: Optional[dict] = None, path: tuple = ()) -> Any:
    """Copy of nested containers with every tensor detached and copied to CPU memory.

    The copy is what a background thread writes while training changes the live tensors. ``OrderedDict``
    state dicts stay ``OrderedDict`` with their ``_metadata`` (module versions that ``load_state_dict`` reads).
    For CUDA tensors this is a device-to-host copy (a synchronisation point).

    Args:
        state: Nested dicts / lists / tuples with tensors and plain values.
        buffers: When given, host tensors from earlier snapshots, keyed by their path in ``state``; a tensor of
            the same shape and dtype is copied into its buffer instead of new memory (no allocation and page
            faults for every checkpoint). The previous snapshot's tensors are then overwritten.
        path: Path of ``state`` inside the root (for the buffer keys).
    """
    if isinstance(state, torch.Tensor):
        if buffers is None:
            return state.detach().to("cpu", copy=True)
        buffer = buffers.get(path)
        if buffer is None or buffer.shape != state.shape or buffer.dtype != state.dtype:
            buffer = buffers[path] = torch.empty(state.shape, dtype=state.dtype, device="cpu")
        return buffer.copy_(state.detach())
    if isinstance(state, collections.OrderedDict):
        copied = collections.OrderedDict(
            (key, snapshot_tensors(value, buffers, (*path, key))) for key, value in state.items()
        )
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            copied._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(state, dict):
        return {key: snapshot_tensors(value, buffers, (*path, key)) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot_tensors(value, buffers, (*path, index)) for index, value in enumerate(state))
    return state


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
        return snapshot_tensors(state, self._buffers if self.reuse_buffers else None)

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

    Pass the result to ``manager.set_state(...)`` or ``TrainingManager(..., resume_from=...)``.

    Args:
        path: The training checkpoint file (``<base>-training-checkpoint.safetensors``).

    Returns:
        The training state (``TrainingManager.get_state()`` plus the ``"mlpug"`` header, whose ``"path"`` is set).

    Raises:
        mlpug.checkpointing.CheckpointError: Missing, truncated, corrupt, of another backend or a model checkpoint.
    """
    return CheckpointSaver().load(path, kind="training")


def load_model_checkpoint(path: str) -> dict:
    """Load a model checkpoint (best / latest / archived): ``model_components``, ``hyper_parameters``, ``progress``.

    Raises:
        mlpug.checkpointing.CheckpointError: Missing, truncated, corrupt, of another backend or a training checkpoint.
    """
    return CheckpointSaver().load(path, kind="model")
