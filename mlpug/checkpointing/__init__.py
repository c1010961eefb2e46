"""Checkpoint files: crash-safe writing, stable names, the saver interface, safe loading and random states.

Crash safety (the write protocol of every saver): the bytes go to a temporary file in the target's directory
(``.<name>.tmp-<pid>``), are flushed and ``fsync``'ed, the file is renamed over the target with
``os.replace`` (atomic on POSIX) and the directory is ``fsync``'ed, so a process killed at any moment leaves
either the previous complete file or the new complete file, never a partial one.

File names (``<base>`` is ``base_checkpoint_filename``, ``<ext>`` the saver's extension, ``pt`` or ``npz``)::

    <base>-best-model-checkpoint.<ext>               model components at the best monitored value
    <base>-latest-model-checkpoint.<ext>             model components at the last checkpoint period
    <base>-model-checkpoint-<unit>-<index:06d>.<ext> archived model checkpoints (unit: epoch | batch)
    <base>-training-checkpoint.<ext>                 everything needed to continue training
    <base>-emergency-training-checkpoint.<ext>       training checkpoint written when training failed

Contents: every checkpoint is a dict of plain containers (dict, list, tuple, str, int, float, bool, None) and
the backend's arrays (torch tensors, NumPy arrays), with a header under ``"mlpug"``::

    {"format": "mlpug-checkpoint", "format_version": 1, "kind": "training" | "model",
     "backend": "pytorch" | "tensorflow" | ..., "mlpug_version": str, "created_at": float (Unix seconds)}

A training checkpoint is ``TrainingManager.get_state()`` plus the header (trainer state, counters, best logs,
callback states, data order and random states); a model checkpoint holds ``model_components``,
``hyper_parameters``, ``progress`` (epoch, batch_step, global_iter) and the resolved ``logs`` (current values).

Loading never unpickles objects: PyTorch files load with ``torch.load(weights_only=True)``, NumPy-format files
(:class:`NumpyCheckpointSaver`, used by TensorFlow) with ``numpy.load(allow_pickle=False)``.
"""

from mlpug.checkpointing.codec import decode_plain, encode_plain
from mlpug.checkpointing.files import (
    atomic_link_or_copy,
    atomic_write,
    fsync_directory,
    remove_stale_temporary_files,
    temporary_path,
)
from mlpug.checkpointing.header import (
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointKind,
    check_header,
    make_header,
)
from mlpug.checkpointing.names import CheckpointFileNames
from mlpug.checkpointing.random_state import get_random_state, register_random_state, set_random_state
from mlpug.checkpointing.savers import CheckpointSaver, NumpyCheckpointSaver, snapshot_numpy
from mlpug.checkpointing.writer import BackgroundWriter
from mlpug.checkpointing.zipformat import sniff_format, verify_zip_checksums

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BackgroundWriter",
    "CheckpointError",
    "CheckpointFileNames",
    "CheckpointKind",
    "CheckpointSaver",
    "NumpyCheckpointSaver",
    "atomic_link_or_copy",
    "atomic_write",
    "check_header",
    "decode_plain",
    "encode_plain",
    "fsync_directory",
    "get_random_state",
    "make_header",
    "register_random_state",
    "remove_stale_temporary_files",
    "set_random_state",
    "snapshot_numpy",
    "sniff_format",
    "temporary_path",
    "verify_zip_checksums",
]
