"""The storage reader of DCP checkpoint directories whose ``.metadata`` is not trusted.

:class:`SafeFileSystemReader` reads ``.metadata`` with :class:`~mlpug.pytorch.dcp.metadata_unpickler.MetadataUnpickler`
(no code of the file runs, no object of the process is changed), then checks every storage entry (where DCP reads a
chunk: a file of the directory, an offset, a length, stream transforms) against what ``FileSystemWriter`` writes,
before DCP reads any: an entry naming a path outside the directory (absolute, ``..``), a device, a FIFO or a
symbolic link, bytes beyond the end of its file, or stream transforms (decompression) is refused.
"""

from __future__ import annotations

import os
import re
import stat
from typing import IO, Any, Optional, cast

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

from mlpug.checkpointing import CheckpointError
from mlpug.pytorch.dcp.metadata_unpickler import MetadataUnpickler

SHARD_FILE_NAME = re.compile(r"__[0-9]+_[0-9]+\.distcp")
"""The names ``FileSystemWriter`` gives the shard files (``__<rank>_<number>.distcp``); a storage entry's file must
have one (a bare name: no directory part)."""

_MAX_SHOWN = 100  # characters of a value of the file shown in a message

_FILE_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _shown(value: Any) -> str:
    """The repr of a value of the file, cut to :data:`_MAX_SHOWN` characters."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _entry_name(index: MetadataIndex) -> str:
    """``'fqn'``, with ``(offset (0, 4))`` for a chunk of a tensor."""
    offset = "" if index.offset is None else f" (offset {tuple(index.offset)})"
    return f"{_shown(index.fqn)}{offset}"


class SafeFileSystemReader(dcp.FileSystemReader):
    """A ``FileSystemReader`` whose ``read_metadata`` runs no code of the file and refuses storage entries outside
    the checkpoint's shard files (see the module docstring).

    Args:
        path: The checkpoint directory (``str`` or ``os.PathLike``).

    Everything else is ``torch.distributed.checkpoint.FileSystemReader``'s (shard files read with
    ``torch.load(weights_only=True)``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata_errors: list[CheckpointError] = []

    @property
    def metadata_errors(self) -> list[CheckpointError]:
        """The errors :meth:`read_metadata` raised, oldest first (DCP replaces them by its own exception)."""
        return list(self._metadata_errors)

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
                is not allowed or sets state it may not (see
                :class:`~mlpug.pytorch.dcp.metadata_unpickler.MetadataUnpickler`), is truncated or not a pickle,
                holds something other than DCP ``Metadata``, or (naming the entry and why) has a storage entry
                that is not a chunk of a shard file of the directory: its file not a bare name
                ``__<rank>_<number>.distcp`` (:data:`SHARD_FILE_NAME`) of a regular file in the directory, its
                offset or length not an ``int`` >= 0, its bytes beyond the end of the file, or stream transforms.
                Also kept for :attr:`metadata_errors`.
        """
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            metadata = self._unpickle_metadata(path)
            self._check_storage(metadata, str(path))
        except CheckpointError as error:
            self._metadata_errors.append(error)
            raise

        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id

        return metadata

    def _unpickle_metadata(self, path: str | os.PathLike) -> Metadata:
        try:
            with self.fs.create_stream(path, "rb") as metadata_file:
                metadata = MetadataUnpickler(cast(IO[bytes], metadata_file), str(path)).load()
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

    def _check_storage(self, metadata: Metadata, path: str) -> None:
        """Raises :class:`CheckpointError` naming ``path`` for the first storage entry of ``metadata`` that is not
        a chunk of a shard file of this reader's directory (see :meth:`read_metadata`)."""
        storage_data = metadata.storage_data
        if not isinstance(storage_data, dict):
            raise CheckpointError(
                f"The DCP metadata file {path} is refused: its storage data is a {type(storage_data).__name__}, not "
                "a dict of storage entries (MetadataIndex -> _StorageInfo) as FileSystemWriter writes"
            )
        directory = str(self.path)
        file_sizes: dict[str, int] = {}  # of the files checked, by name
        for index, info in storage_data.items():
            if not isinstance(index, MetadataIndex):
                raise CheckpointError(
                    f"The DCP metadata file {path} is refused: a key of its storage data is a "
                    f"{type(index).__name__}, not a MetadataIndex"
                )
            problem = self._storage_problem(info, directory, file_sizes)
            if problem is not None:
                raise CheckpointError(
                    f"The DCP metadata file {path} is refused: its storage entry {_entry_name(index)} {problem}"
                )

    @staticmethod
    def _storage_problem(info: Any, directory: str, file_sizes: dict[str, int]) -> Optional[str]:
        """Why ``info`` is not a chunk of a shard file of ``directory`` (``None`` if it is); ``file_sizes`` caches
        the sizes of the files found regular."""
        if type(info) is not _StorageInfo:
            return f"is a {type(info).__name__}, not FileSystemWriter's _StorageInfo"
        name = info.relative_path
        if not isinstance(name, str):
            return f"names its file by a {type(name).__name__}, not a str"
        if SHARD_FILE_NAME.fullmatch(name) is None:
            return (
                f"names the file {_shown(name)}, which is not a shard file name of the form "
                "__<rank>_<number>.distcp (a file of the checkpoint directory)"
            )
        for field, value in (("offset", info.offset), ("length", info.length)):
            if type(value) is not int:
                return f"has the {field} {_shown(value)}, which is not an int"
            if value < 0:
                return f"has the {field} {value}, which is negative"
        if info.transform_descriptors is not None and (
            not isinstance(info.transform_descriptors, (list, tuple)) or len(info.transform_descriptors) > 0
        ):
            return (
                f"has the transform descriptors {_shown(info.transform_descriptors)}: stream transforms "
                "(decompression, ...), which FileSystemWriter does not write without extensions"
            )
        if name not in file_sizes:
            file_path = os.path.join(directory, name)
            try:
                file_stat = os.lstat(file_path)
            except FileNotFoundError:
                return f"names the file {name}, which does not exist in {directory}"
            except OSError as error:
                return f"names the file {name}, which cannot be read: {error}"
            if not stat.S_ISREG(file_stat.st_mode):
                kind = next((kind for is_kind, kind in _FILE_KINDS if is_kind(file_stat.st_mode)), "something else")
                return f"names {file_path}, which is not a regular file but {kind}"
            file_sizes[name] = file_stat.st_size
        if info.offset + info.length > file_sizes[name]:
            return (
                f"has the bytes {info.offset} to {info.offset + info.length}, beyond the end of {name} "
                f"({file_sizes[name]} bytes)"
            )
        return None
