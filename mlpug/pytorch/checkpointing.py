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

from mlpug.checkpointing import CheckpointError, register_random_state, sniff_format
from mlpug.checkpointing import CheckpointSaver as _NeutralCheckpointSaver

_log = logging.getLogger("mlpug.pytorch.checkpointing")


def snapshot_tensors(state: Any) -> Any:
    """Copy of nested containers with every tensor detached and copied to CPU memory.

    The copy is what a background thread writes while training changes the live tensors. ``OrderedDict``
    state dicts stay ``OrderedDict`` with their ``_metadata`` (module versions that ``load_state_dict`` reads).
    For CUDA tensors this is a device-to-host copy (a synchronisation point).
    """
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, collections.OrderedDict):
        copied = collections.OrderedDict((key, snapshot_tensors(value)) for key, value in state.items())
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            copied._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return copied
    if isinstance(state, dict):
        return {key: snapshot_tensors(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot_tensors(value) for value in state)
    return state


class CheckpointSaver(_NeutralCheckpointSaver):
    """Writes checkpoints with ``torch.save`` (zip format, ``.pt``) and reads them with ``weights_only=True``.

    Args:
        map_location: Where loaded tensors are placed; default CPU (``load_state_dict`` then copies them to the
            parameters' devices).
    """

    backend = "pytorch"
    extension = "pt"

    def __init__(self, map_location: Any = "cpu"):
        self.map_location = map_location

    def snapshot(self, state: Any) -> Any:
        return snapshot_tensors(state)

    def write(self, checkpoint: dict, file: BinaryIO) -> None:
        torch.save(checkpoint, file)

    def read(self, path: str) -> dict:
        file_format = sniff_format(path)
        if file_format == "numpy":
            raise CheckpointError(
                f"{path} is a NumPy-format (.npz) checkpoint, written by another backend (e.g. tensorflow), but is "
                "loaded with the 'pytorch' backend; load it with that backend (import mlpug.tensorflow as mlp)"
            )
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
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": list(cuda_states)}


def _set_torch_random_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    cuda_states: Optional[list] = state.get("cuda")
    if not cuda_states:
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda_states):
        _log.warning(
            f"The checkpoint holds the random states of {len(cuda_states)} CUDA devices, but "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are available here; not restored."
        )
        return
    torch.cuda.set_rng_state_all(cuda_states)


register_random_state("torch", _get_torch_random_state, _set_torch_random_state)
