"""Reading sharded checkpoints written with ``torch.distributed.checkpoint`` (DCP) without unpickling untrusted bytes.

mlpug's sharded checkpoints hold only tensors in DCP (every non-tensor value is stored elsewhere by mlpug). Torch
reads a checkpoint directory's ``.metadata`` file with ``pickle.load`` and unpickles non-tensor ("bytes") entries
with ``torch.load(weights_only=False)``; this module replaces both:

* :class:`SafeFileSystemReader` reads ``.metadata`` with an unpickler that resolves only the globals of
  :data:`ALLOWED_GLOBALS` (DCP's metadata classes, ``torch.Size``, torch dtypes and layouts, ``pathlib`` paths);
  any other global is refused before it is looked up, so no code of the file runs;
* :class:`TensorOnlyLoadPlanner` refuses bytes entries instead of unpickling them;
* :func:`load_sharded_tensors` loads a flat dict of tensors (DTensors included) in place with both.

The shard files (``*.distcp``) are read by torch with ``torch.load(weights_only=True)``, unchanged.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import warnings
from typing import IO, Any, Optional, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from mlpug.checkpointing import CheckpointError

METADATA_FILE_NAME = ".metadata"

# The warning torch.distributed.checkpoint.load gives whenever it loads without a process group
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"

# torch's dtypes by the name they are pickled with ("float32" of torch.float32), its layouts by str ("torch.strided")
_DTYPES = {str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)}
_LAYOUTS = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}


def _layout(name: str) -> torch.layout:
    """The torch layout named ``name`` (``"torch.strided"``, ...): how torch pickles a layout (the reduce function
    ``torch.serialization._get_layout`` is registered with ``copyreg``); the stand-in of that function."""
    if not isinstance(name, str) or name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"not a torch layout: {name!r}")
    return _LAYOUTS[name]


def _global_name(value: Any) -> tuple[str, str]:
    return value.__module__, value.__qualname__


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        _global_name(cls): cls
        for cls in (
            Metadata,
            StorageMeta,
            MetadataIndex,
            TensorStorageMetadata,
            BytesStorageMetadata,
            ChunkStorageMetadata,
            TensorProperties,
            _MEM_FORMAT_ENCODING,
            _StorageInfo,
            torch.Size,
            pathlib.PurePosixPath,
            pathlib.PureWindowsPath,
            pathlib.PosixPath,
            pathlib.WindowsPath,
        )
    },
    _global_name(torch.serialization._get_layout): _layout,
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}
"""The globals a ``.metadata`` file may name, as (module, name) -> the object the unpickler returns. Each is a
class or function whose call only builds a value: DCP's metadata classes, the storage info of
``FileSystemWriter``, ``torch.Size``, torch dtypes (pickled by name: ``torch.float32``), torch layouts (through
:func:`_layout`) and the ``pathlib`` path classes (``StorageMeta.checkpoint_id``)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; any other global raises :class:`CheckpointError` before it is
    imported or looked up."""

    def __init__(self, file: IO[bytes], path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise CheckpointError(
                f"The DCP metadata file {self._path} names the global {module}.{name}, which DCP metadata of "
                "tensors never holds: it is not a DCP metadata file mlpug wrote, and it is not unpickled"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("DCP metadata holds no persistent ids")


class SafeFileSystemReader(dcp.FileSystemReader):
    """A ``FileSystemReader`` whose ``read_metadata`` resolves only :data:`ALLOWED_GLOBALS`.

    Args:
        path: The checkpoint directory (``str`` or ``os.PathLike``).

    Everything else is ``torch.distributed.checkpoint.FileSystemReader``'s (shard files read with
    ``torch.load(weights_only=True)``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata_errors: list[CheckpointError] = []

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, read from ``.metadata`` (or ``__<rank>.metadata`` with ``rank=``).

        Args:
            rank: Keyword only, ``int`` or ``None`` (default): read the rank-local metadata file of that rank, as
                the base reader does (``torch.distributed.checkpoint.load`` asks for it when ``.metadata`` cannot
                be read).

        Returns:
            The ``Metadata``, with ``storage_meta.load_id`` set to this reader's load id (a ``StorageMeta`` is
            added when the file has none).

        Raises:
            mlpug.checkpointing.CheckpointError: Naming the file: it is missing or unreadable, names a global that
                is not allowed, is truncated or not a pickle, or holds something other than DCP ``Metadata``.
        """
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            metadata = self._unpickle_metadata(path)
        except CheckpointError as error:
            self._metadata_errors.append(error)
            raise

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id

        return metadata

    def _unpickle_metadata(self, path: str | os.PathLike) -> Metadata:
        try:
            with self.fs.create_stream(path, "rb") as metadata_file:
                metadata = _MetadataUnpickler(cast(IO[bytes], metadata_file), str(path)).load()
        except CheckpointError:
            raise
        except FileNotFoundError as error:
            raise CheckpointError(f"The DCP metadata file {path} does not exist") from error
        except OSError as error:
            raise CheckpointError(f"The DCP metadata file {path} cannot be read: {error}") from error
        except Exception as error:  # truncated, not a pickle, or values the allowed classes refuse
            raise CheckpointError(
                f"The DCP metadata file {path} is truncated, corrupt or not a DCP metadata file "
                f"({type(error).__name__}: {error})"
            ) from error
        if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
            raise CheckpointError(
                f"The DCP metadata file {path} holds a {type(metadata).__name__}, not DCP Metadata: it is not a DCP "
                "metadata file mlpug wrote"
            )
        if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
            raise CheckpointError(
                f"The DCP metadata file {path} holds a storage_meta of type {type(metadata.storage_meta).__name__}, "
                "not StorageMeta: it is not a DCP metadata file mlpug wrote"
            )
        return metadata


class TensorOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """A ``DefaultLoadPlanner`` that refuses bytes entries (pickled non-tensor values) instead of unpickling them.

    DCP asks the planner for a bytes entry only for a key of the state dict being loaded whose checkpoint metadata
    says "bytes"; entries of keys not being loaded are never read. Tensor entries load as with
    ``DefaultLoadPlanner``.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Refuses the entry.

        Raises:
            mlpug.checkpointing.CheckpointError: Always, naming the entry's fully qualified name.
        """
        raise CheckpointError(
            f"The sharded checkpoint entry {read_item.dest_index.fqn!r} is a bytes entry (a pickled non-tensor "
            "value): mlpug's sharded checkpoints hold only tensors, and bytes entries are not unpickled"
        )


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
            read safely (see :meth:`SafeFileSystemReader.read_metadata`), or a key to load is a bytes entry in
            the checkpoint (see :class:`TensorOnlyLoadPlanner`).
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
    return reader._metadata_errors[0] if reader._metadata_errors else None
