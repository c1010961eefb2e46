"""JAX checkpoint files: NumPy arrays in plain containers, as safetensors files (``safetensors.numpy``).

``trainer.get_state()`` of the JAX ``DefaultTrainer`` returns NumPy arrays in plain containers; ``jax.Array`` s found
anywhere in a state are copied to NumPy when the state is snapshotted. The saver is
:class:`mlpug.checkpointing.NumpyCheckpointSaver` (the format of every backend, see :mod:`mlpug.checkpointing`;
loading memory-maps the file and never unpickles), with backend ``"jax"``.

``bfloat16`` arrays (parameters made with ``param_dtype=jnp.bfloat16``, optimizer states such as
``optax.adam(mu_dtype=jnp.bfloat16)``), which ``safetensors.numpy`` cannot read back, are stored as their bits: the
file holds ``{"__bfloat16_bits__": array.view(np.uint16)}`` in their place (:data:`BFLOAT16_BITS`), and
:meth:`CheckpointSaver.load` gives back the ``bfloat16`` array (``bits.view(bfloat16)``, the same values bit for
bit). What :meth:`~CheckpointSaver.snapshot` returns and :meth:`~CheckpointSaver.load` gives back hold the
``bfloat16`` arrays themselves.

Random states are saved through the trainer's providers (:mod:`mlpug.jax.random_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mlpug.checkpointing import CheckpointKind, NumpyCheckpointSaver

BFLOAT16 = np.dtype(jnp.bfloat16)
BFLOAT16_BITS = "__bfloat16_bits__"
"""The only key of the dict that stands for a ``bfloat16`` array (or NumPy scalar) in a JAX checkpoint file; its
value is the array viewed as ``uint16`` (module docstring)."""


def to_numpy(state: Any) -> Any:
    """Nested containers (dicts, lists, tuples) with every ``jax.Array`` replaced by a NumPy copy, with one host
    transfer for all of them; everything else as it is."""
    arrays: list = []
    _collect_arrays(state, arrays)
    if not arrays:
        return state
    host = iter(jax.device_get(arrays))
    # a copy: the buffer of a jax.Array on the CPU may be donated by the next step
    return _map_leaves(state, lambda value: isinstance(value, jax.Array), lambda _: np.array(next(host)))


def _collect_arrays(value: Any, arrays: list) -> None:
    if isinstance(value, jax.Array):
        arrays.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_arrays(item, arrays)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_arrays(item, arrays)


def _map_leaves(value: Any, is_target: Callable[[Any], bool], replace: Callable[[Any], Any]) -> Any:
    """Nested containers (dicts, lists, tuples, named tuples) with every value for which ``is_target`` is true
    replaced by ``replace(value)`` (containers rebuilt, in order; other values as they are)."""
    if is_target(value):
        return replace(value)
    if isinstance(value, dict):
        return type(value)((key, _map_leaves(item, is_target, replace)) for key, item in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_map_leaves(item, is_target, replace) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_leaves(item, is_target, replace) for item in value)
    return value


def _is_bfloat16(value: Any) -> bool:
    """True for a NumPy array or scalar of dtype ``bfloat16``."""
    return isinstance(value, (np.ndarray, np.generic)) and value.dtype == BFLOAT16


def _is_bfloat16_bits(value: Any) -> bool:
    """True for the dict that stands for a ``bfloat16`` array in a file (see :data:`BFLOAT16_BITS`)."""
    if not (isinstance(value, dict) and len(value) == 1 and BFLOAT16_BITS in value):
        return False
    bits = value[BFLOAT16_BITS]
    return isinstance(bits, (np.ndarray, np.generic)) and bits.dtype == np.uint16


def bfloat16_as_bits(checkpoint: Any) -> Any:
    """``checkpoint`` with every ``bfloat16`` NumPy array or scalar replaced by ``{BFLOAT16_BITS: its uint16
    view}`` (no copy of the data); the inverse is :func:`bits_as_bfloat16`."""
    return _map_leaves(checkpoint, _is_bfloat16, lambda array: {BFLOAT16_BITS: array.view(np.uint16)})


def bits_as_bfloat16(checkpoint: Any) -> Any:
    """The inverse of :func:`bfloat16_as_bits`: every ``{BFLOAT16_BITS: bits}`` replaced by ``bits.view(bfloat16)``."""
    return _map_leaves(checkpoint, _is_bfloat16_bits, lambda node: node[BFLOAT16_BITS].view(BFLOAT16))


class CheckpointSaver(NumpyCheckpointSaver):
    """Writes JAX checkpoints as safetensors files (see :class:`mlpug.checkpointing.NumpyCheckpointSaver`), with
    ``bfloat16`` arrays stored as their bits (module docstring)."""

    def __init__(self) -> None:
        super().__init__(backend="jax", to_numpy=to_numpy)

    def stored_array(self, value: Any, where: str) -> Optional[np.ndarray]:
        """As :meth:`NumpyCheckpointSaver.stored_array`, and a ``bfloat16`` array as it is (contiguous): what
        :meth:`~mlpug.checkpointing.CheckpointSaver.all_finite` checks; :meth:`save` stores its bits instead."""
        if _is_bfloat16(value):
            return np.ascontiguousarray(value)
        return super().stored_array(value, where)

    def is_finite_array(self, array: Any) -> bool:
        """As :meth:`NumpyCheckpointSaver.is_finite_array`, for ``bfloat16`` arrays too."""
        if _is_bfloat16(array):
            return bool(np.isfinite(array.astype(np.float32)).all())
        return super().is_finite_array(array)

    def save(self, checkpoint: dict, path: str) -> None:
        """As :meth:`mlpug.checkpointing.CheckpointSaver.save`, with the ``bfloat16`` arrays stored as their bits
        (:func:`bfloat16_as_bits`)."""
        super().save(bfloat16_as_bits(checkpoint), path)

    def load(self, path: str, kind: Optional[CheckpointKind] = None) -> dict:
        """As :meth:`mlpug.checkpointing.CheckpointSaver.load`, with the ``bfloat16`` arrays restored
        (:func:`bits_as_bfloat16`)."""
        return bits_as_bfloat16(super().load(path, kind))


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
