"""``TrainingCheckpointLoader``: where ``TrainingManager(resume_from=...)`` finds a training checkpoint of a
``CheckpointManager``'s files, and how it reads it."""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

from mlpug.checkpointing import CheckpointFileNames, CheckpointSaver, directory_hint
from mlpug.checkpointing.sharded import resolve_reference
from mlpug.trainers.resume import TrainingStateLoader


class TrainingCheckpointLoader(TrainingStateLoader):
    """Resolves ``resume_from`` against the files of one ``CheckpointManager`` and loads training checkpoints.

    Args:
        file_names: The manager's file names (the training and emergency training checkpoints).
        saver: The backend's saver (``load`` checks the header: backend and kind).
    """

    def __init__(self, file_names: CheckpointFileNames, saver: CheckpointSaver):
        self.file_names = file_names
        self.saver = saver
        self._log = logging.getLogger("mlpug.CheckpointManager")

    def resolve_training_checkpoint(self, resume_from: Union[str, os.PathLike[str]]) -> Optional[str]:
        """``"latest"``: the training checkpoint file, or None (logged) when there is none yet; else
        ``resume_from`` as a path.

        Raises:
            ValueError: The file does not exist, or ``resume_from`` is a directory.
        """
        path = self.file_names.training if resume_from == "latest" else os.fspath(resume_from)
        if resume_from == "latest" and not os.path.exists(path):
            emergency = self.file_names.emergency_training
            message = f"resume_from='latest': no training checkpoint {path} yet; training starts from the beginning"
            if os.path.exists(emergency):  # a failed run left only its emergency checkpoint: say it loudly
                self._log.warning(f"{message}, although an emergency training checkpoint exists: "
                                  f"resume_from={emergency!r} continues from it")  # fmt: skip
            else:
                self._log.info(message)
            return None
        if os.path.isdir(path):
            raise ValueError(f"resume_from={path!r} is a directory, not a training checkpoint; {directory_hint(path)}")
        if not os.path.exists(path):
            raise ValueError(f"resume_from: training checkpoint file {path} does not exist")
        return path

    def load_training_checkpoint(self, path: str) -> dict:
        """The training state in ``path``, read with the saver (header checked).

        Raises:
            mlpug.checkpointing.CheckpointError: Truncated, corrupt, of another backend or kind; a sharded checkpoint
                whose shard directory is missing.
        """
        checkpoint = self.saver.load(path, kind="training")
        resolve_reference(checkpoint, path)  # a sharded trainer state: its shard directory, next to the file
        return checkpoint
