"""TensorFlow ``CheckpointManager``: the neutral one with the TensorFlow saver (safetensors files, no pickle).

The states of the Keras seed generators (dropout etc.) are part of ``trainer.get_state()`` (see
:mod:`mlpug.tensorflow.trainers.seed_generators`), so they are saved and restored with the trainer state.
"""

from __future__ import annotations

from typing import Any, Optional

from mlpug.callbacks.checkpoint_manager import CheckpointManager as _NeutralCheckpointManager
from mlpug.checkpointing import CheckpointSaver as _Saver
from mlpug.tensorflow.checkpointing import CheckpointSaver


class CheckpointManager(_NeutralCheckpointManager):
    __doc__ = (_NeutralCheckpointManager.__doc__ or "") + (
        "\n    TensorFlow: ``saver`` defaults to :class:`mlpug.tensorflow.checkpointing.CheckpointSaver`.\n"
    )

    def __init__(self, *args: Any, saver: Optional[_Saver] = None, **kwargs: Any):
        super().__init__(saver or CheckpointSaver(), *args, **kwargs)
