"""JAX checkpoint files: NumPy arrays in plain containers, as safetensors files (``safetensors.numpy``).

``trainer.get_state()`` of the JAX ``DefaultTrainer`` returns NumPy arrays in plain containers; ``jax.Array`` s found
anywhere in a state are copied to NumPy when the state is snapshotted. The saver is
:class:`mlpug.checkpointing.NumpyCheckpointSaver` (the format of every backend, see :mod:`mlpug.checkpointing`;
loading memory-maps the file and never unpickles), with backend ``"jax"``.

Random states are saved through the trainer's providers (:mod:`mlpug.jax.random_state`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mlpug.checkpointing import NumpyCheckpointSaver


def to_numpy(state: Any) -> Any:
    """Nested containers (dicts, lists, tuples) with every ``jax.Array`` replaced by a NumPy copy, with one host
    transfer for all of them; everything else as it is."""
    arrays: list = []
    _collect_arrays(state, arrays)
    if not arrays:
        return state
    host = iter(jax.device_get(arrays))
    return _replace_arrays(state, host)


def _collect_arrays(value: Any, arrays: list) -> None:
    if isinstance(value, jax.Array):
        arrays.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_arrays(item, arrays)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_arrays(item, arrays)


def _replace_arrays(value: Any, host: Any) -> Any:
    if isinstance(value, jax.Array):
        return np.array(next(host))  # a copy: the buffer of a jax.Array on the CPU may be donated by the next step
    if isinstance(value, dict):
        return type(value)((key, _replace_arrays(item, host)) for key, item in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_replace_arrays(item, host) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_replace_arrays(item, host) for item in value)
    return value


class CheckpointSaver(NumpyCheckpointSaver):
    """Writes JAX checkpoints as safetensors files (see :class:`mlpug.checkpointing.NumpyCheckpointSaver`)."""

    def __init__(self) -> None:
        super().__init__(backend="jax", to_numpy=to_numpy)


def load_training_checkpoint(path: str) -> dict:
    """Load a training checkpoint written by a JAX ``CheckpointManager``.

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
