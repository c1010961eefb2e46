"""PyTorch ``CheckpointManager``: the neutral one with the PyTorch saver (safetensors files, no pickle)."""

from __future__ import annotations

from typing import Any, Optional

from mlpug.callbacks.checkpoint_manager import CheckpointManager as _NeutralCheckpointManager
from mlpug.checkpointing import CheckpointSaver as _Saver
from mlpug.pytorch.checkpointing import CheckpointSaver


class CheckpointManager(_NeutralCheckpointManager):
    __doc__ = (_NeutralCheckpointManager.__doc__ or "") + (
        "\n    PyTorch: ``saver`` defaults to :class:`mlpug.pytorch.checkpointing.CheckpointSaver`.\n"
    )

    def __init__(self, *args: Any, saver: Optional[_Saver] = None, **kwargs: Any):
        super().__init__(saver or CheckpointSaver(), *args, **kwargs)
