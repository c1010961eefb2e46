"""Savers: the neutral :class:`CheckpointSaver` (the crash-safe save and the checked, memory-mapped load of
safetensors checkpoint files, written once for every backend) and :class:`NumpyCheckpointSaver` (NumPy arrays
in plain containers; the fake backend of the tests and TensorFlow use it).

A backend's saver implements five hooks: :meth:`~CheckpointSaver.snapshot`, :meth:`~CheckpointSaver.stored_array`,
:meth:`~CheckpointSaver.array_bytes`, :meth:`~CheckpointSaver.save_arrays` and :meth:`~CheckpointSaver.open_file`;
the structure codec, the checksum and the header checks (:mod:`mlpug.checkpointing.codec`,
:mod:`mlpug.checkpointing.header`) are shared.
"""

from __future__ import annotations

import collections
import copy
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import safetensors
import safetensors.numpy

from mlpug.checkpointing.codec import decode_checkpoint, encode_checkpoint
from mlpug.checkpointing.files import atomic_write_path
from mlpug.checkpointing.header import (
    HEADER_KEY,
    CheckpointError,
    CheckpointKind,
    check_header,
    check_training_state,
    unreadable_file_error,
)
from mlpug.checkpointing.names import directory_hint

# NumPy dtypes that safetensors both writes and reads back as NumPy arrays
NUMPY_DTYPES = frozenset(
    ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
    + ["float16", "float32", "float64", "complex64"]
)


class CheckpointSaver(ABC):
    """Writes and reads the checkpoint files of one backend; the neutral ``CheckpointManager`` uses it.

    Every backend writes the same format, a safetensors file (see :mod:`mlpug.checkpointing`). :meth:`save`
    encodes the checkpoint (:func:`~mlpug.checkpointing.codec.encode_checkpoint`) and writes it with the
    crash-safe protocol (:func:`~mlpug.checkpointing.files.atomic_write_path`); :meth:`load` checks the header
    before any array is read, memory-maps the arrays, verifies the checksum and decodes the structure.
    Subclasses implement the hooks :meth:`snapshot`, :meth:`stored_array`, :meth:`array_bytes`,
    :meth:`save_arrays` and :meth:`open_file`.

    Attributes:
        backend: Backend name written into headers (``"pytorch"``, ``"tensorflow"``, ...).
        extension: File extension without the dot: ``"safetensors"`` for every backend.
    """

    backend: str = "unknown"
    extension: str = "safetensors"

    @abstractmethod
    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` that training can no longer change (arrays copied to host memory).

        A saver may reuse the memory of its previous snapshot, so a snapshot is valid until the next call.
        """

    @abstractmethod
    def stored_array(self, value: Any, where: str) -> Optional[Any]:
        """The array to store for ``value`` when it is one of the backend's arrays, else None.

        Args:
            value: Any value of a checkpoint.
            where: Its place in the checkpoint, for error messages (e.g. ``"checkpoint['trainer']"``).

        Returns:
            A contiguous array in host memory with the same dtype, shape and values (``value`` itself when it
            already is one), or None when ``value`` is not an array of this backend.

        Raises:
            TypeError: An array of a dtype or layout that safetensors cannot store (naming ``where``).
        """

    @abstractmethod
    def array_bytes(self, array: Any) -> Any:
        """The raw bytes of a stored or loaded array, as a contiguous buffer (for the checksum; no copy)."""

    @abstractmethod
    def save_arrays(self, arrays: dict[str, Any], metadata: dict[str, str], path: str) -> None:
        """Write a safetensors file of ``arrays`` (from :meth:`stored_array`) and ``metadata`` at ``path``.

        Args:
            arrays: The arrays by name.
            metadata: The string metadata (``__metadata__``).
            path: The file to create (the temporary file of the crash-safe protocol).
        """

    @abstractmethod
    def open_file(self, path: str) -> Any:
        """``safetensors.safe_open`` of ``path`` for this backend's framework (memory-mapped).

        Raises:
            Exception: Whatever safetensors raises for a file it cannot open (:meth:`load` reports it).
        """

    def is_finite_array(self, array: Any) -> bool:
        """True unless ``array`` (a stored array, see :meth:`stored_array`) holds NaN or infinite values.

        Default: NumPy arrays (non-float dtypes are always finite); backends with other array types override it.
        """
        array = np.asarray(array)
        return not np.issubdtype(array.dtype, np.inexact) or bool(np.isfinite(array).all())

    def all_finite(self, state: Any) -> bool:
        """True when no array in the nested ``state`` (e.g. model weights) holds NaN or infinite values."""
        pending = [state]
        while pending:
            value = pending.pop()
            if isinstance(value, dict):
                pending.extend(value.values())
            elif isinstance(value, (list, tuple)):
                pending.extend(value)
            else:
                array = self.stored_array(value, "state")
                if array is not None and not self.is_finite_array(array):
                    return False
        return True

    def save(self, checkpoint: dict, path: str) -> None:
        """Write ``checkpoint`` to ``path`` crash-safely (temporary file, fsync, atomic rename, directory fsync).

        The arrays are written from their memory by ``save_file`` of safetensors (no serialised copy of the
        checkpoint in memory); the file is then ``fsync``'ed through a new descriptor before the rename.

        Args:
            checkpoint: The header under ``"mlpug"`` (:func:`~mlpug.checkpointing.make_header`) and plain
                containers with the backend's arrays.
            path: The checkpoint file.

        Raises:
            TypeError: A value that checkpoints cannot hold (naming where it is); nothing is written.
            ValueError: No ``"mlpug"`` header.
            mlpug.checkpointing.CheckpointWriteError: Writing failed (naming ``path``; "no space left on device"
                for a full disk); the file at ``path`` is unchanged.
        """
        arrays, metadata = encode_checkpoint(checkpoint, self.stored_array, self.array_bytes)

        def write(temporary: str) -> None:
            try:
                self.save_arrays(arrays, metadata, temporary)
            except safetensors.SafetensorError as error:  # its I/O errors carry "(os error <errno>)" in the text
                code = re.search(r"os error (\d+)", str(error))
                raise (OSError(int(code.group(1)), str(error)) if code else OSError(str(error))) from error

        atomic_write_path(path, write)

    def load(self, path: str, kind: Optional[CheckpointKind] = None) -> dict:
        """Read and validate a checkpoint; nothing is ever unpickled.

        Args:
            path: Checkpoint file.
            kind: ``"training"`` or ``"model"`` to require that kind; None accepts both.

        Returns:
            The checkpoint dict; its header gets ``"path"`` (the file it was read from).

        Raises:
            CheckpointError: Missing, a directory, empty, truncated, corrupt (checksum), a bad header field, another
                format version, backend or kind, a training state without a counter or its callbacks (see
                :func:`~mlpug.checkpointing.check_training_state`), or not an mlpug checkpoint (e.g. a zip archive
                of format version 1, or a pickle).
        """
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint file {path} does not exist")
        if os.path.isdir(path):
            raise CheckpointError(f"{path} is a directory, not a checkpoint file; {directory_hint(path, kind)}")
        try:
            file = self.open_file(path)
        except Exception as error:  # safetensors' SafetensorError, OSError
            raise unreadable_file_error(path, self.backend, error) from error
        with file:
            metadata = file.metadata() or {}
            header = check_header(metadata, path, self.backend, kind)  # before any array of another backend is read
            try:
                arrays = {name: file.get_tensor(name) for name in file.keys()}
            except Exception as error:
                raise CheckpointError(
                    f"checkpoint file {path} is truncated or corrupt: {type(error).__name__}: {error}"
                ) from error
        content = decode_checkpoint(metadata, arrays, self.array_bytes, path)
        if header["kind"] == "training":
            check_training_state(content, f"checkpoint file {path}")
        header["path"] = path
        return {HEADER_KEY: header, **content}


CopyArray = Callable[[Any, Optional[Any]], Any]
"""``copy_array(array, buffer)``: ``array`` copied into ``buffer`` when it fits (same shape and dtype, in host
memory), else into new host memory; returns the copy."""


def snapshot_tree(
    state: Any, is_array: Callable[[Any], bool], copy_array: CopyArray, buffers: Optional[dict] = None, path: tuple = ()
) -> Any:
    """Copy of nested containers with every array copied to host memory (what a background thread writes while
    training changes the live arrays). ``OrderedDict`` s stay ``OrderedDict`` with their ``_metadata`` (module
    versions that PyTorch's ``load_state_dict`` reads).

    Args:
        state: Nested dicts / lists / tuples with arrays and plain values.
        is_array: True for the backend's arrays.
        copy_array: See :data:`CopyArray`.
        buffers: When given, the arrays of the previous snapshot keyed by their path in ``state``; an array is
            copied into its buffer when it fits (no allocation and page faults at every checkpoint), so the
            previous snapshot is overwritten.
        path: Path of ``state`` inside the root (for the buffer keys).
    """
    if is_array(state):
        if buffers is None:
            return copy_array(state, None)
        buffer = buffers[path] = copy_array(state, buffers.get(path))
        return buffer

    def copied(value: Any, key: Any) -> Any:
        return snapshot_tree(value, is_array, copy_array, buffers, (*path, key))

    if isinstance(state, dict):
        items = ((key, copied(value, key)) for key, value in state.items())
        if not isinstance(state, collections.OrderedDict):
            return dict(items)
        ordered = collections.OrderedDict(items)
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            ordered._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return ordered
    if isinstance(state, (list, tuple)):
        return type(state)(copied(value, index) for index, value in enumerate(state))
    return state


def _copy_numpy(array: np.ndarray, buffer: Optional[np.ndarray]) -> np.ndarray:
    if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
        buffer = np.empty_like(array)
    np.copyto(buffer, array)
    return buffer


class NumpyCheckpointSaver(CheckpointSaver):
    """Checkpoints of NumPy arrays and NumPy scalars in plain containers, written with ``safetensors.numpy``.

    Arrays of the dtypes in :data:`NUMPY_DTYPES` are stored (non-native byte orders are converted); loading
    returns NumPy arrays, and NumPy scalars as NumPy scalars.

    Args:
        backend: Backend name written into headers.
        to_numpy: Converts a backend's arrays (e.g. TF tensors) to NumPy while snapshotting; default none.
        reuse_buffers: :meth:`snapshot` copies into the arrays of the previous snapshot (same structure, shapes
            and dtypes), so a snapshot is valid until the next one (the ``CheckpointManager`` waits for the
            previous write before it snapshots again).
    """

    def __init__(
        self, backend: str = "numpy", to_numpy: Optional[Callable[[Any], Any]] = None, reuse_buffers: bool = True
    ):
        self.backend = backend
        self.to_numpy = to_numpy
        self.reuse_buffers = reuse_buffers
        self._buffers: dict = {}

    def snapshot(self, state: Any) -> Any:
        state = self.to_numpy(state) if self.to_numpy is not None else state
        buffers = self._buffers if self.reuse_buffers else None
        return snapshot_tree(state, lambda value: isinstance(value, np.ndarray), _copy_numpy, buffers)

    def stored_array(self, value: Any, where: str) -> Optional[np.ndarray]:
        if not isinstance(value, (np.ndarray, np.generic)):
            return None
        array = np.asarray(value)
        if array.dtype.name not in NUMPY_DTYPES:
            raise TypeError(
                f"{where} is a NumPy array of dtype {array.dtype}; checkpoint files hold arrays of the dtypes "
                f"{', '.join(sorted(NUMPY_DTYPES))} (convert it, e.g. with .astype(np.float32))"
            )
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d arrays 0-d

    def array_bytes(self, array: np.ndarray) -> np.ndarray:
        return array  # contiguous: its buffer is its raw bytes

    def save_arrays(self, arrays: dict[str, Any], metadata: dict[str, str], path: str) -> None:
        safetensors.numpy.save_file(arrays, path, metadata=metadata)

    def open_file(self, path: str) -> Any:
        return safetensors.safe_open(path, framework="np")
