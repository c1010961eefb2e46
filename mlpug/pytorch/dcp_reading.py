"""Loading the tensors of sharded checkpoints written with ``torch.distributed.checkpoint`` (DCP) without unpickling
untrusted bytes.

mlpug's sharded checkpoints hold only tensors in DCP (every non-tensor value is stored elsewhere by mlpug). Torch
reads a checkpoint directory's ``.metadata`` file with ``pickle.load`` and unpickles non-tensor ("bytes") entries
with ``torch.load(weights_only=False)``; :func:`load_sharded_tensors` replaces both with the parts of
:mod:`mlpug.pytorch.dcp`:

* :class:`~mlpug.pytorch.dcp.safe_file_system_reader.SafeFileSystemReader` reads ``.metadata`` with
  :class:`~mlpug.pytorch.dcp.metadata_unpickler.MetadataUnpickler`, which resolves only the globals of
  :data:`~mlpug.pytorch.dcp.metadata_unpickler.ALLOWED_GLOBALS` (DCP's metadata classes, ``torch.Size``, torch
  dtypes and layouts, ``pathlib`` paths) and sets the state only of DCP metadata objects it created, so no code of
  the file runs and no object of the process changes; then it refuses storage entries that are not chunks of the
  directory's shard files;
* :class:`~mlpug.pytorch.dcp.tensor_only_load_planner.TensorOnlyLoadPlanner` refuses bytes entries instead of
  unpickling them.

The shard files (``*.distcp``) are read by torch with ``torch.load(weights_only=True)``, unchanged. The names of
the parts are importable from here too.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from mlpug.checkpointing import CheckpointError
from mlpug.pytorch.dcp.metadata_unpickler import ALLOWED_GLOBALS, MetadataUnpickler
from mlpug.pytorch.dcp.safe_file_system_reader import SafeFileSystemReader
from mlpug.pytorch.dcp.tensor_only_load_planner import TensorOnlyLoadPlanner

__all__ = [
    "ALLOWED_GLOBALS",
    "METADATA_FILE_NAME",
    "MetadataUnpickler",
    "SafeFileSystemReader",
    "TensorOnlyLoadPlanner",
    "load_sharded_tensors",
]

METADATA_FILE_NAME = ".metadata"

# The warning torch.distributed.checkpoint.load gives whenever it loads without a process group
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def load_sharded_tensors(
    state_dict: dict[str, torch.Tensor], directory: str, process_group: Optional[dist.ProcessGroup] = None
) -> None:
    """Loads the tensors of a DCP checkpoint directory into ``state_dict``, in place, without unpickling anything.

    Uses ``torch.distributed.checkpoint.load`` with :class:`SafeFileSystemReader` and :class:`TensorOnlyLoadPlanner`.
    With an initialised process group every rank of ``process_group`` calls this (a collective; each rank reads
    the chunks of its own shards: DTensors load their local shard); without one, this process loads alone (DCP's
    ``no_dist=True``, its warning about it suppressed).

    Args:
        state_dict: Key -> tensor (``torch.Tensor`` or ``DTensor``) to load into; every key must be in the checkpoint
            with the same global shape. The tensors are overwritten in place; the dict itself is not changed.
        directory: The checkpoint directory (holding ``.metadata`` and the ``*.distcp`` shard files).
        process_group: The group of the ranks loading (default: the default group). Ignored without an
            initialised process group.

    Raises:
        TypeError: A value of ``state_dict`` is not a tensor (names the keys and types).
        mlpug.checkpointing.CheckpointError: The directory or its ``.metadata`` is missing, ``.metadata`` cannot be
            read safely or has a storage entry that is not a chunk of a shard file of the directory (see
            :meth:`SafeFileSystemReader.read_metadata`), or a key to load is a bytes entry in the checkpoint (see
            :class:`TensorOnlyLoadPlanner`).
        torch.distributed.checkpoint.api.CheckpointException: Other failures of DCP's load (a key missing from the
            checkpoint, a shape mismatch, an unreadable shard file), as torch raises them.
    """
    not_tensors = {
        key: type(value).__name__ for key, value in state_dict.items() if not isinstance(value, torch.Tensor)
    }
    if not_tensors:
        raise TypeError(f"load_sharded_tensors loads tensors only; these values are not tensors: {not_tensors}")
    if not os.path.isdir(directory):
        raise CheckpointError(f"The sharded checkpoint directory {directory} does not exist")
    metadata_path = os.path.join(directory, METADATA_FILE_NAME)
    if not os.path.isfile(metadata_path):
        raise CheckpointError(f"The sharded checkpoint directory {directory} has no {METADATA_FILE_NAME} file")

    reader = SafeFileSystemReader(directory)
    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():
            if no_dist:
                warnings.filterwarnings("ignore", message=_NO_DIST_WARNING, category=UserWarning)
            dcp.load(
                state_dict,
                storage_reader=reader,
                planner=TensorOnlyLoadPlanner(),
                process_group=process_group,
                no_dist=no_dist,
            )
    except CheckpointException as exception:
        error = _checkpoint_error(exception, reader)
        if error is None:
            raise
        raise error from exception


def _checkpoint_error(exception: CheckpointException, reader: SafeFileSystemReader) -> Optional[CheckpointError]:
    """The ``CheckpointError`` behind DCP's ``CheckpointException``: one a rank raised (DCP gathers every rank's
    failure), else this rank's metadata error (DCP replaces a failed metadata read by an ``AssertionError``)."""
    for rank in sorted(exception.failures):
        failure, _ = exception.failures[rank]
        if isinstance(failure, CheckpointError):
            return failure
    errors = reader.metadata_errors
    return errors[0] if errors else None
