"""TensorFlow checkpoint files: NumPy arrays in plain containers, as safetensors files (``safetensors.numpy``).

``trainer.get_state()`` of the TensorFlow ``DefaultTrainer`` returns NumPy arrays in plain containers; tensors
and variables found anywhere in a state are converted to NumPy when the state is snapshotted. The saver is
:class:`mlpug.checkpointing.NumpyCheckpointSaver` (the format of every backend, see :mod:`mlpug.checkpointing`;
loading memory-maps the file and never unpickles).

Random states are saved through the trainer's providers (:mod:`mlpug.tensorflow.random_state`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from mlpug.checkpointing import NumpyCheckpointSaver


def to_numpy(state: Any) -> Any:
    """Nested containers with every ``tf.Tensor`` / ``tf.Variable`` replaced by a NumPy array."""
    if isinstance(state, (tf.Tensor, tf.Variable)):
        return np.array(state.numpy())
    if isinstance(state, dict):
        return {key: to_numpy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_numpy(value) for value in state)
    return state


class CheckpointSaver(NumpyCheckpointSaver):
    """Writes TensorFlow checkpoints as safetensors files (see :class:`mlpug.checkpointing.NumpyCheckpointSaver`)."""

    def __init__(self):
        super().__init__(backend="tensorflow", to_numpy=to_numpy)


def load_training_checkpoint(path: str) -> dict:
    """Load a training checkpoint written by a TensorFlow ``CheckpointManager``.

    Pass the result as ``TrainingManager(..., resume_from=...)``.

    Args:
        path: The training checkpoint file (``<base>-training-checkpoint.safetensors``).

    Returns:
        The training state (``TrainingManager.get_state()`` plus the ``"mlpug"`` header, whose ``"path"`` is set).

    Raises:
        mlpug.checkpointing.CheckpointError: Missing, truncated, corrupt, of another backend or a model checkpoint.
    """
    return CheckpointSaver().load(path, kind="training")


def load_model_checkpoint(path: str) -> dict:
    """Load a model checkpoint (best / latest / archived): ``model_components``, ``hyper_parameters``, ``progress``.

    Raises:
        mlpug.checkpointing.CheckpointError: Missing, truncated, corrupt, of another backend or a training checkpoint.
    """
    return CheckpointSaver().load(path, kind="model")
