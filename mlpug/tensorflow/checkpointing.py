"""TensorFlow checkpoint files: NumPy arrays in plain containers, as safetensors files (``safetensors.numpy``).

``trainer.get_state()`` of the TensorFlow ``DefaultTrainer`` returns NumPy arrays in plain containers; tensors
and variables found anywhere in a state are converted to NumPy when the state is snapshotted. The saver is
:class:`mlpug.checkpointing.NumpyCheckpointSaver` (the format of every backend, see :mod:`mlpug.checkpointing`;
loading memory-maps the file and never unpickles).

Random state: importing this module registers TensorFlow's *global generator*
(``tf.random.get_global_generator()``: its state and algorithm). The states of the Keras ``SeedGenerator``
variables of the model (dropout etc.; ``get_weights()`` omits them) are part of the TensorFlow
``DefaultTrainer.get_state()``.
What public APIs cannot capture is not saved: the hidden counters of stateful random ops seeded by
``tf.random.set_seed`` (e.g. ``tf.random.normal`` / ``tf.random.shuffle`` without a generator) and Keras'
global ``SeedGenerator`` used by ``keras.random`` functions called without a seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from mlpug.checkpointing import NumpyCheckpointSaver, register_random_state


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

    Pass the result to ``manager.set_state(...)`` or ``TrainingManager(..., resume_from=...)``.

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


def _get_tf_random_state() -> dict:
    generator = tf.random.get_global_generator()
    # plain ints (not arrays), so that every backend's saver can store them
    return {"global_generator": {"state": generator.state.numpy().tolist(), "algorithm": int(generator.algorithm)}}


def _set_tf_random_state(state: dict) -> None:
    saved = state["global_generator"]
    values = np.asarray(saved["state"], dtype=np.int64)
    generator = tf.random.get_global_generator()
    if int(generator.algorithm) != int(saved["algorithm"]):
        tf.random.set_global_generator(tf.random.Generator.from_state(values, saved["algorithm"]))
    else:
        generator.reset(values)


register_random_state("tensorflow", _get_tf_random_state, _set_tf_random_state)
