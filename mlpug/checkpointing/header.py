"""What a checkpoint file is: the ``"mlpug"`` header (format constants, making and checking it),
:class:`CheckpointError`, and recognising files that are not mlpug checkpoints (old zip formats, pickles)."""

from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Mapping
from typing import Any, Literal, Optional

import mlpug

FORMAT_NAME = "mlpug-checkpoint"
FORMAT_VERSION = 2  # 1: torch.save zip / NumPy .npz files; 2: safetensors files
HEADER_KEY = "mlpug"  # the header's key in a checkpoint dict and in a file's safetensors metadata
CheckpointKind = Literal["training", "model"]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, truncated, corrupt, of another backend, kind or format."""


def make_header(kind: CheckpointKind, backend: str) -> dict:
    """The ``"mlpug"`` header of a checkpoint (see :mod:`mlpug.checkpointing`).

    Args:
        kind: ``"training"`` or ``"model"``.
        backend: The name of the backend whose saver writes the file (``"pytorch"``, ``"tensorflow"``, ...).

    Returns:
        The header dict: format, format_version, kind, backend, mlpug_version, created_at (Unix seconds).
    """
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "backend": backend,
        "mlpug_version": mlpug.__version__,
        "created_at": time.time(),
    }


def check_header(metadata: Mapping[str, str], path: str, backend: str, kind: Optional[CheckpointKind]) -> dict:
    """Parse and validate the header in a file's safetensors metadata; return it.

    Args:
        metadata: The file's safetensors metadata (``__metadata__``); the header is its ``"mlpug"`` entry (JSON).
        path: The file, for error messages.
        backend: The backend that loads the file.
        kind: ``"training"`` or ``"model"`` to require that kind; None accepts both.

    Returns:
        The header dict.

    Raises:
        CheckpointError: Not an mlpug checkpoint, a header that is not JSON (corrupt), a ``format_version`` that is
            not an int, an older or newer format, an unknown kind, another backend or another kind.
    """
    if HEADER_KEY not in metadata:
        raise CheckpointError(f"{path} is not an mlpug checkpoint (no 'mlpug' header)")
    try:
        header: Any = json.loads(metadata[HEADER_KEY])
    except ValueError as error:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its 'mlpug' header is not JSON: {error}") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an mlpug checkpoint (no 'mlpug' header)")
    if "format_version" not in header:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its 'mlpug' header has no 'format_version'")
    version = header["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its header's format_version is {version!r} "
            f"({type(version).__name__}), not an int such as {FORMAT_VERSION}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this mlpug ({mlpug.__version__}) "
            f"reads ({FORMAT_VERSION}); upgrade mlpug"
        )
    if version < FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this mlpug ({mlpug.__version__}) reads only version "
            f"{FORMAT_VERSION}: load it with the mlpug version that wrote it"
        )
    if header.get("kind") not in ("training", "model"):
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its header's kind is {header.get('kind')!r}, not 'training' or 'model'"
        )
    if header.get("backend") != backend:
        raise CheckpointError(
            f"{path} was written by the {header.get('backend')!r} backend, but is loaded with the {backend!r} "
            f"backend; load it with import mlpug.{header.get('backend')} as mlp"
        )
    if kind is not None and header.get("kind") != kind:
        raise CheckpointError(f"{path} is a {header.get('kind')} checkpoint, expected a {kind} checkpoint")
    return header


_COUNTERS = ("epoch", "batch_step", "global_iter")


def check_training_state(state: Mapping, source: str) -> None:
    """Check that ``state`` has what resuming reads, so that a bad file fails when loaded, not later.

    Required: ``epoch``, ``batch_step``, ``global_iter`` (ints >= 0) and ``callbacks`` (a dict per callback name);
    ``num_epochs`` and ``num_batches_per_epoch`` (ints >= 1) and ``trainer``, ``data``, ``random`` (dicts) when
    present.

    Args:
        state: A training state (``TrainingManager.get_state()``, e.g. loaded from a file).
        source: The file (or what else ``state`` is) for the message.

    Raises:
        CheckpointError: A field is missing or of the wrong type (naming ``source`` and the field).
    """
    missing = [key for key in (*_COUNTERS, "callbacks") if key not in state]
    if missing:
        raise CheckpointError(
            f"{source} is not a complete training checkpoint: it has no {', '.join(map(repr, missing))} "
            f"(it has {sorted(map(str, state))}); a training checkpoint is what TrainingManager.get_state() returns"
        )
    for key, minimum in (*((key, 0) for key in _COUNTERS), ("num_epochs", 1), ("num_batches_per_epoch", 1)):
        value = state.get(key, minimum)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise CheckpointError(f"{source}: the training state's {key} is {value!r:.100}, not an int >= {minimum}")
    for key in ("callbacks", "trainer", "data", "random"):
        if key in state and not isinstance(state[key], Mapping):
            raise CheckpointError(
                f"{source}: the training state's {key} is a {type(state[key]).__qualname__}, not a dict"
            )


def unreadable_file_error(path: str, backend: str, error: Exception) -> CheckpointError:
    """The error for a file that safetensors cannot open: a foreign format, or a truncated or corrupt file.

    Only the first bytes are looked at; nothing is unpickled or unzipped.

    Args:
        path: The file.
        backend: The backend that loads it.
        error: What safetensors (or the operating system) raised.

    Returns:
        A :class:`CheckpointError` naming the file, its size in bytes and what it is.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            start = file.read(4)
    except OSError as os_error:
        return CheckpointError(f"checkpoint file {path} cannot be read: {os_error}")
    if start[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        foreign = "a zip archive (a torch.save .pt or NumPy .npz file, as mlpug wrote before format version 2)"
    elif len(start) >= 2 and start[0] == 0x80 and 2 <= start[1] <= 5:
        foreign = "a pickle (never loaded: unpickling can run code)"
    else:
        return CheckpointError(f"checkpoint file {path} ({size} bytes) is truncated or corrupt: {error}")
    return CheckpointError(
        f"{path} is not an mlpug {backend} checkpoint: it is {foreign}; mlpug checkpoints are safetensors files "
        f"(format version {FORMAT_VERSION})"
    )
