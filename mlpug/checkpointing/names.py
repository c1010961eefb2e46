"""The stable file names of a run's checkpoints (:class:`CheckpointFileNames`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal


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
