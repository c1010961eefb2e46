"""The stable file names of a run's checkpoints (:class:`CheckpointFileNames`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class CheckpointFileNames:
    """The stable file names of one run's checkpoints (see the module docstring).

    Args:
        directory: Directory of the checkpoint files.
        base_name: ``base_checkpoint_filename``, the common prefix.
        extension: File extension without the dot (``"safetensors"``, the saver's ``extension``).
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


_KIND_MARKERS = {"training": "-training-checkpoint.", "model": "-model-checkpoint", None: "checkpoint"}


def directory_hint(directory: str, kind: Optional[Literal["training", "model"]] = "training") -> str:
    """What to pass instead of ``directory`` where a checkpoint file was expected, for error messages.

    Args:
        directory: The directory that was given.
        kind: The kind of checkpoint expected (``"training"``, ``"model"`` or None for either).

    Returns:
        A sentence naming the checkpoint files of that kind in ``directory`` (or saying there are none) and,
        for training checkpoints, ``resume_from="latest"``.
    """
    try:
        names = sorted(name for name in os.listdir(directory) if _KIND_MARKERS[kind] in name and name[0] != ".")
    except OSError:
        names = []
    what = "checkpoint file" if kind is None else f"{kind} checkpoint file"
    latest = (
        f", or resume_from='latest' with the CheckpointManager whose checkpoints_path is {directory!r}"
        if kind == "training"
        else ""
    )
    if names:
        return f"pass a {what} in it: {', '.join(os.path.join(directory, name) for name in names)}{latest}"
    return f"it holds no {what}; pass the path of one{latest}"
