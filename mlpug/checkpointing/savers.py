"""Savers: the neutral :class:`CheckpointSaver` interface with the crash-safe save / checked load protocol, and
:class:`NumpyCheckpointSaver` (NumPy arrays in plain containers)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any, BinaryIO, Callable, Optional

import numpy as np

from mlpug.checkpointing.codec import _STRUCTURE_KEY, decode_plain, encode_plain
from mlpug.checkpointing.files import atomic_write
from mlpug.checkpointing.header import CheckpointError, CheckpointKind, check_header
from mlpug.checkpointing.zipformat import sniff_format


class CheckpointSaver(ABC):
    """Writes and reads checkpoint files of one backend; the neutral ``CheckpointManager`` uses it.

    Subclasses implement :meth:`write`, :meth:`read` and :meth:`snapshot`; :meth:`save` and :meth:`load` add
    the crash-safe write protocol and the header checks.

    Attributes:
        backend: Backend name written into headers (``"pytorch"``, ``"tensorflow"``, ...).
        extension: File extension without the dot.
    """

    backend: str = "unknown"
    extension: str = "ckpt"

    @abstractmethod
    def write(self, checkpoint: dict, file: BinaryIO) -> None:
        """Serialise ``checkpoint`` (plain containers and arrays) into the open binary ``file``."""

    @abstractmethod
    def read(self, path: str) -> dict:
        """Deserialise the file at ``path`` without unpickling objects.

        Raises:
            CheckpointError: Truncated, corrupt or of another format.
        """

    @abstractmethod
    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` that training can no longer change (arrays copied to host memory).

        A saver may reuse the memory of its previous snapshot, so a snapshot is valid until the next call.
        """

    def save(self, checkpoint: dict, path: str) -> None:
        """Write ``checkpoint`` to ``path`` crash-safely (temporary file, fsync, atomic rename)."""
        atomic_write(path, lambda file: self.write(checkpoint, file))

    def load(self, path: str, kind: Optional[CheckpointKind] = None) -> dict:
        """Read and validate a checkpoint.

        Args:
            path: Checkpoint file.
            kind: ``"training"`` or ``"model"`` to require that kind; None accepts both.

        Returns:
            The checkpoint dict; its header gets ``"path"`` (the file it was read from).

        Raises:
            CheckpointError: Missing, truncated, corrupt, another backend, another kind or not an mlpug file.
        """
        checkpoint = self.read(path)
        header = check_header(checkpoint, path, self.backend, kind)
        header["path"] = path
        return checkpoint


def snapshot_numpy(state: Any, buffers: Optional[dict] = None, path: tuple = ()) -> Any:
    """Copy of nested plain containers with every NumPy array copied.

    Args:
        state: Nested dicts / lists / tuples with arrays and plain values.
        buffers: When given, arrays of earlier snapshots keyed by their path in ``state``; an array of the same
            shape and dtype is copied into its buffer (no new allocation); the previous snapshot is overwritten.
        path: Path of ``state`` inside the root (for the buffer keys).
    """
    if isinstance(state, np.ndarray):
        if buffers is None:
            return state.copy()
        buffer = buffers.get(path)
        if buffer is None or buffer.shape != state.shape or buffer.dtype != state.dtype:
            buffer = buffers[path] = np.empty_like(state)
        np.copyto(buffer, state)
        return buffer
    if isinstance(state, dict):
        return {key: snapshot_numpy(value, buffers, (*path, key)) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot_numpy(value, buffers, (*path, index)) for index, value in enumerate(state))
    return state


class NumpyCheckpointSaver(CheckpointSaver):
    """Checkpoints of NumPy arrays in plain containers, as an uncompressed ``.npz`` archive.

    The nested structure is stored as JSON in the member ``__mlpug_structure__`` and every array as member
    ``a<index>``; loading uses ``numpy.load(allow_pickle=False)``, so no object is ever unpickled. Dict key
    types (str, int, ...) and tuples are preserved.

    Args:
        backend: Backend name written into headers.
        to_numpy: Converts a backend's arrays (e.g. TF tensors) to NumPy while snapshotting; default none.
        reuse_buffers: :meth:`snapshot` copies into the arrays of the previous snapshot (same structure, shapes
            and dtypes), so a snapshot is valid until the next one (the ``CheckpointManager`` waits for the
            previous write before it snapshots again).
    """

    extension = "npz"

    def __init__(
        self, backend: str = "numpy", to_numpy: Optional[Callable[[Any], Any]] = None, reuse_buffers: bool = True
    ):
        self.backend = backend
        self.to_numpy = to_numpy
        self.reuse_buffers = reuse_buffers
        self._buffers: dict = {}

    def snapshot(self, state: Any) -> Any:
        state = self.to_numpy(state) if self.to_numpy is not None else state
        return snapshot_numpy(state, self._buffers if self.reuse_buffers else None)

    def write(self, checkpoint: dict, file: BinaryIO) -> None:
        arrays: list = []
        skeleton = encode_plain(checkpoint, arrays, "checkpoint")
        structure = np.frombuffer(json.dumps(skeleton).encode("utf-8"), dtype=np.uint8)
        np.savez(file, **{_STRUCTURE_KEY: structure}, **{f"a{i}": array for i, array in enumerate(arrays)})

    def read(self, path: str) -> dict:
        file_format = sniff_format(path)
        if file_format == "pytorch":
            raise CheckpointError(
                f"{path} is a PyTorch checkpoint, but is loaded with the {self.backend!r} backend; "
                "load it with import mlpug.pytorch as mlp"
            )
        if file_format != "numpy":
            raise CheckpointError(f"{path} is not an mlpug {self.backend} checkpoint (unknown zip content)")
        try:
            with np.load(path, allow_pickle=False) as archive:
                skeleton = json.loads(bytes(archive[_STRUCTURE_KEY]).decode("utf-8"))
                arrays = {name: archive[name] for name in archive.files if name != _STRUCTURE_KEY}
            return decode_plain(skeleton, arrays)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {error!r}") from error
