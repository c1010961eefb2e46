"""The ``"mlpug"`` header of a checkpoint: format constants, :class:`CheckpointError`, making and checking it."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

import mlpug

FORMAT_NAME = "mlpug-checkpoint"
FORMAT_VERSION = 1
CheckpointKind = Literal["training", "model"]


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, truncated, corrupt, of another backend, kind or format."""


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
