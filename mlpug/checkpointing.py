"""Checkpoint files: crash-safe writing, stable names, the saver interface, safe loading and random states.

Crash safety (the write protocol of every saver): the bytes go to a temporary file in the target's directory
(``.<name>.tmp-<pid>``), are flushed and ``fsync``'ed, the file is renamed over the target with
``os.replace`` (atomic on POSIX) and the directory is ``fsync``'ed, so a process killed at any moment leaves
either the previous complete file or the new complete file, never a partial one.

File names (``<base>`` is ``base_checkpoint_filename``, ``<ext>`` the saver's extension, ``pt`` or ``npz``)::

    <base>-best-model-checkpoint.<ext>               model components at the best monitored value
    <base>-latest-model-checkpoint.<ext>             model components at the last checkpoint period
    <base>-model-checkpoint-<unit>-<index:06d>.<ext> archived model checkpoints (unit: epoch | batch)
    <base>-training-checkpoint.<ext>                 everything needed to continue training
    <base>-emergency-training-checkpoint.<ext>       training checkpoint written when training failed

Contents: every checkpoint is a dict of plain containers (dict, list, tuple, str, int, float, bool, None) and
the backend's arrays (torch tensors, NumPy arrays), with a header under ``"mlpug"``::

    {"format": "mlpug-checkpoint", "format_version": 1, "kind": "training" | "model",
     "backend": "pytorch" | "tensorflow" | ..., "mlpug_version": str, "created_at": float (Unix seconds)}

A training checkpoint is ``TrainingManager.get_state()`` plus the header (trainer state, counters, best logs,
callback states, data order and random states); a model checkpoint holds ``model_components``,
``hyper_parameters``, ``progress`` (epoch, batch_step, global_iter) and the resolved ``logs`` (current values).

Loading never unpickles objects: PyTorch files load with ``torch.load(weights_only=True)``, NumPy-format files
(:class:`NumpyCheckpointSaver`, used by TensorFlow) with ``numpy.load(allow_pickle=False)``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Literal, Optional

import numpy as np

import mlpug

_log = logging.getLogger("mlpug.checkpointing")

FORMAT_NAME = "mlpug-checkpoint"
FORMAT_VERSION = 1
CheckpointKind = Literal["training", "model"]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, truncated, corrupt, of another backend, kind or format."""


# ----- crash-safe writing -----
def fsync_directory(directory: str) -> None:
    """``fsync`` a directory so that a rename inside it survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: str) -> str:
    """The temporary file ``path`` is written to before the atomic rename: ``<dir>/.<name>.tmp-<pid>``."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that a crash at any moment leaves the old or the new complete file at ``path``.

    ``write(file)`` writes the bytes to a temporary file, which is flushed, fsync'ed and renamed to ``path``;
    then the directory is fsync'ed. On an error the temporary file is removed and the error re-raised.

    Args:
        path: Target file path; its directory is created when missing.
        write: Function that writes the content to the binary file object it receives.
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(path))


def atomic_link_or_copy(source: str, target: str) -> None:
    """Make ``target`` a crash-safe copy of the complete file ``source`` (a hard link where possible)."""
    temporary = temporary_path(target)
    try:
        if os.path.exists(temporary):
            os.remove(temporary)
        try:
            os.link(source, temporary)
        except OSError:
            with open(source, "rb") as source_file, open(temporary, "wb") as file:
                while chunk := source_file.read(1 << 24):
                    file.write(chunk)
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        try:
            os.remove(temporary)
        except OSError:
            pass
        raise
    fsync_directory(os.path.dirname(os.path.abspath(target)))


def remove_stale_temporary_files(directory: str, prefix: str) -> list:
    """Remove ``.<prefix>*.tmp-<pid>`` files left by killed processes (pid no longer running); return them."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if not name.startswith(f".{prefix}") or ".tmp-" not in name:
            continue
        pid_text = name.rsplit(".tmp-", 1)[1]
        if not pid_text.isdigit() or _process_exists(int(pid_text)):
            continue
        try:
            os.remove(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----- names -----
@dataclass(frozen=True)
class CheckpointFileNames:
    """The stable file names of one run's checkpoints (see the module docstring).

    Args:
        directory: Directory of the checkpoint files.
        base_name: ``base_checkpoint_filename``, the common prefix.
        extension: File extension without the dot (``"pt"``, ``"npz"``).
    """

    directory: str
    base_name: str
    extension: str

    def _path(self, suffix: str) -> str:
        return os.path.join(self.directory, f"{self.base_name}-{suffix}.{self.extension}")

    @property
    def best_model(self) -> str:
        return self._path("best-model-checkpoint")

    @property
    def latest_model(self) -> str:
        return self._path("latest-model-checkpoint")

    @property
    def training(self) -> str:
        return self._path("training-checkpoint")

    @property
    def emergency_training(self) -> str:
        return self._path("emergency-training-checkpoint")

    def archived_model(self, unit: Literal["epoch", "batch"], index: int) -> str:
        """Archived model checkpoint after ``index`` completed epochs or batches (1-based count)."""
        return self._path(f"model-checkpoint-{unit}-{index:06d}")


# ----- header -----
def make_header(kind: CheckpointKind, backend: str) -> dict:
    """The ``"mlpug"`` header of a checkpoint (see the module docstring)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "backend": backend,
        "mlpug_version": mlpug.__version__,
        "created_at": time.time(),
    }


def check_header(checkpoint: Any, path: str, backend: str, kind: Optional[CheckpointKind]) -> dict:
    """Validate a loaded checkpoint's header; return it.

    Raises:
        CheckpointError: Not an mlpug checkpoint, a newer format, another backend or another kind.
    """
    header = checkpoint.get("mlpug") if isinstance(checkpoint, dict) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an mlpug checkpoint (no 'mlpug' header)")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {header.get('format_version')}, newer than this mlpug "
            f"({mlpug.__version__}) reads ({FORMAT_VERSION}); upgrade mlpug"
        )
    if header.get("backend") != backend:
        raise CheckpointError(
            f"{path} was written by the {header.get('backend')!r} backend, but is loaded with the {backend!r} "
            f"backend; load it with import mlpug.{header.get('backend')} as mlp"
        )
    if kind is not None and header.get("kind") != kind:
        raise CheckpointError(f"{path} is a {header.get('kind')} checkpoint, expected a {kind} checkpoint")
    return header


def sniff_format(path: str) -> str:
    """``"pytorch"``, ``"numpy"`` or ``"unknown"``, from the zip members of a checkpoint file.

    Raises:
        CheckpointError: The file does not exist, is empty, truncated or not a zip archive.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"checkpoint file {path} ({size} bytes) is truncated or corrupt: {error}") from error
    if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        return "pytorch"
    if f"{_STRUCTURE_KEY}.npy" in names:
        return "numpy"
    return "unknown"


def verify_zip_checksums(path: str) -> None:
    """Check the CRC-32 of every member of a zip-format checkpoint (reads the whole file once).

    Raises:
        CheckpointError: A member's bytes do not match its checksum (the file is corrupt), naming the member.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {error}") from error
    if bad_member is not None:
        raise CheckpointError(f"checkpoint file {path} is corrupt: the checksum of {bad_member!r} does not match")


# ----- random states -----
_RANDOM_STATE_SOURCES: dict = {}


def register_random_state(name: str, get: Callable[[], Any], set_: Callable[[Any], None]) -> None:
    """Register a random number generator whose state training checkpoints save and restore.

    Backends register theirs at import (``"torch"``, ``"tensorflow"``); the core registers ``"python"``
    (the ``random`` module) and ``"numpy"`` (NumPy's global generator). ``get`` must return plain containers
    of Python scalars only (no tensors or arrays): a process may import several backends, and every
    backend's saver must be able to store every registered state.
    """
    _RANDOM_STATE_SOURCES[name] = (get, set_)


def get_random_state() -> dict:
    """State of every registered random number generator, keyed by source name."""
    return {name: get() for name, (get, _) in _RANDOM_STATE_SOURCES.items()}


def set_random_state(state: dict) -> None:
    """Restore generator states from :func:`get_random_state`; sources not registered here are reported."""
    for name, value in state.items():
        if name not in _RANDOM_STATE_SOURCES:
            _log.warning(f"The checkpoint holds the random state of {name!r}, which is not in use here; ignored.")
            continue
        _RANDOM_STATE_SOURCES[name][1](value)


def _get_numpy_state() -> dict:
    state = np.random.get_state(legacy=False)
    return {
        "bit_generator": state["bit_generator"],
        "key": [int(k) for k in state["state"]["key"]],
        "pos": int(state["state"]["pos"]),
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def _set_numpy_state(state: dict) -> None:
    np.random.set_state(
        {
            "bit_generator": state["bit_generator"],
            "state": {"key": np.asarray(state["key"], dtype=np.uint32), "pos": state["pos"]},
            "has_gauss": state["has_gauss"],
            "gauss": state["gauss"],
        }
    )


register_random_state("python", random.getstate, random.setstate)
register_random_state("numpy", _get_numpy_state, _set_numpy_state)


# ----- savers -----
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


_STRUCTURE_KEY = "__mlpug_structure__"


def encode_plain(value: Any, arrays: list, where: str = "state") -> Any:
    """JSON-able skeleton of ``value``; NumPy arrays and scalars are appended to ``arrays`` and referenced.

    Raises:
        TypeError: A value is not a plain container, a Python scalar or a NumPy array (naming where it is).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"{where} is an object array; checkpoints hold only numeric/bool/string arrays")
        arrays.append(array)
        return {"__array__": len(arrays) - 1, "scalar": isinstance(value, np.generic)}
    if isinstance(value, dict):
        return {
            "__dict__": [
                [encode_plain(k, arrays, f"{where} key"), encode_plain(v, arrays, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [encode_plain(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_plain(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints hold only plain "
        "containers (dict, list, tuple), Python scalars, str and arrays, no pickled objects"
    )


def decode_plain(skeleton: Any, arrays: dict) -> Any:
    """Inverse of :func:`encode_plain`; ``arrays`` maps ``"a<index>"`` to the stored arrays."""
    if isinstance(skeleton, list):
        return [decode_plain(v, arrays) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__array__" in skeleton:
            array = arrays[f"a{skeleton['__array__']}"]
            return array[()] if skeleton.get("scalar") else array
        if "__tuple__" in skeleton:
            return tuple(decode_plain(v, arrays) for v in skeleton["__tuple__"])
        return {_hashable(decode_plain(k, arrays)): decode_plain(v, arrays) for k, v in skeleton["__dict__"]}
    return skeleton


def _hashable(key: Any) -> Any:
    return key.item() if isinstance(key, np.generic) else key


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


# ----- background writing -----
class BackgroundWriter:
    """Runs one write job at a time in a background thread; errors surface at the next :meth:`wait`.

    The caller snapshots the state before submitting, so training may go on while the file is written.
    """

    def __init__(self, name: str = "mlpug-checkpoint-writer"):
        self.name = name
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, job: Callable[[], None]) -> None:
        """Wait for the previous job (raising its error), then start ``job`` in a new thread."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as error:  # re-raised in the training thread by wait()
                self._error = error

        self._thread = threading.Thread(target=run, name=self.name, daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the running job is done.

        Raises:
            Exception: The error the last job raised (once).
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
