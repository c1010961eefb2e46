"""JAX ``CheckpointManager``: the neutral one with the JAX saver (safetensors files, no pickle).

The states of the ``nnx.Rngs`` streams of the training model are saved with the random states of the run (see
:mod:`mlpug.jax.random_state`).
"""

from __future__ import annotations

from typing import Any, Optional

from mlpug.callbacks.checkpoint_manager import CheckpointManager as _NeutralCheckpointManager
from mlpug.checkpointing import CheckpointSaver as _Saver
from mlpug.jax.checkpointing import CheckpointSaver


class CheckpointManager(_NeutralCheckpointManager):
    __doc__ = (_NeutralCheckpointManager.__doc__ or "") + (
        "\n    JAX: ``saver`` defaults to :class:`mlpug.jax.checkpointing.CheckpointSaver`.\n"
    )

    def __init__(self, *args: Any, saver: Optional[_Saver] = None, **kwargs: Any):
        super().__init__(saver or CheckpointSaver(), *args, **kwargs)
