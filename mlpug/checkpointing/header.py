"""What a checkpoint file is: the ``"mlpug"`` header (format constants, making and checking it),
:class:`CheckpointError`, and recognising files that are not mlpug checkpoints (old zip formats, pickles)."""

from __future__ import annotations

import json
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
        CheckpointError: Not an mlpug checkpoint, a header that is not JSON (corrupt), a newer format, another
            backend or another kind.
    """
    if HEADER_KEY not in metadata:
        raise CheckpointError(f"{path} is not an mlpug checkpoint (no 'mlpug' header)")
    try:
        header: Any = json.loads(metadata[HEADER_KEY])
    except ValueError as error:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its 'mlpug' header is not JSON: {error}") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an mlpug checkpoint (no 'mlpug' header)")
    version = header.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}, newer than this mlpug ({mlpug.__version__}) "
            f"reads ({FORMAT_VERSION}); upgrade mlpug"
        )
    if header.get("backend") != backend:
        raise CheckpointError(
            f"{path} was written by the {header.get('backend')!r} backend, but is loaded with the {backend!r} "
            f"backend; load it with import mlpug.{header.get('backend')} as mlp"
        )
    if kind is not None and header.get("kind") != kind:
        raise CheckpointError(f"{path} is a {header.get('kind')} checkpoint, expected a {kind} checkpoint")
    return header


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
