"""PyTorch checkpoint files: ``torch.save`` written crash-safely, loaded with ``torch.load(weights_only=True)``.

Checkpoints hold only tensors and plain containers (whatever ``trainer.get_state()`` returns: module and
optimizer ``state_dict``s, an AMP ``GradScaler`` state, ...), so loading never unpickles arbitrary objects.
Importing this module registers the torch random state (CPU generator, and every CUDA device's generator
when CUDA is initialised) with :func:`mlpug.checkpointing.register_random_state`.
See :mod:`mlpug.checkpointing` for file names, contents and the write protocol.
"""

from __future__ import annotations

import collections
import copy
import logging
import pickle
from typing import Any, BinaryIO, Optional

import torch

from mlpug.checkpointing import CheckpointError, register_random_state, sniff_format, verify_zip_checksums
from mlpug.checkpointing import CheckpointSaver as _NeutralCheckpointSaver

_log = logging.getLogger("mlpug.pytorch.checkpointing")


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
    """Writes checkpoints with ``torch.save`` (zip format, ``.pt``) and reads them with ``weights_only=True``.

    Args:
        map_location: Where loaded tensors are placed; default CPU (``load_state_dict`` then copies them to the
            parameters' devices).
        reuse_buffers: :meth:`snapshot` copies into the host buffers of the previous snapshot (same structure,
            shapes and dtypes), so a snapshot is valid until the next one; the ``CheckpointManager`` waits for
            the previous write before it snapshots again. Costs one host copy of the state; saves allocating
            (and page-faulting) it at every checkpoint.
        verify_checksums: Before loading, check the CRC-32 of every member of the zip archive (one extra read
            of the file), so that corrupted bytes give an error instead of silently wrong tensors.
    """

    backend = "pytorch"
    extension = "pt"

    def __init__(self, map_location: Any = "cpu", reuse_buffers: bool = True, verify_checksums: bool = True):
        self.map_location = map_location
        self.reuse_buffers = reuse_buffers
        self.verify_checksums = verify_checksums
        self._buffers: dict = {}

    def snapshot(self, state: Any) -> Any:
        return snapshot_tensors(state, self._buffers if self.reuse_buffers else None)

    def write(self, checkpoint: dict, file: BinaryIO) -> None:
        torch.save(checkpoint, file)

    def read(self, path: str) -> dict:
        file_format = sniff_format(path)
        if file_format == "numpy":
            raise CheckpointError(
                f"{path} is a NumPy-format (.npz) checkpoint, written by another backend (e.g. tensorflow), but is "
                "loaded with the 'pytorch' backend; load it with that backend (import mlpug.tensorflow as mlp)"
            )
        if self.verify_checksums:
            verify_zip_checksums(path)
        try:
            return torch.load(path, map_location=self.map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{path} holds pickled objects that weights_only loading refuses (checkpoints may hold only tensors "
                f"and plain containers): {error}"
            ) from error
        except Exception as error:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or corrupt: {type(error).__name__}: {error}"
            ) from error


def load_training_checkpoint(path: str) -> dict:
    """Load a training checkpoint written by a PyTorch ``CheckpointManager``.

    Pass the result to ``manager.set_state(...)`` or ``TrainingManager(..., resume_from=...)``.

    Args:
        path: The training checkpoint file (``<base>-training-checkpoint.pt``).

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


def _get_torch_random_state() -> dict:
    """Plain lists of byte values (not tensors), so that every backend's saver can store them."""
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state().tolist(), "cuda": [state.tolist() for state in cuda_states]}


def _set_torch_random_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    cuda_states: Optional[list] = state.get("cuda")
    if not cuda_states:
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda_states):
        _log.warning(
            f"The checkpoint holds the random states of {len(cuda_states)} CUDA devices, but "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are available here; not restored."
        )
        return
    torch.cuda.set_rng_state_all([torch.tensor(values, dtype=torch.uint8) for values in cuda_states])


register_random_state("torch", _get_torch_random_state, _set_torch_random_state)
