"""Checkpoint files: crash-safe writing, stable names, one safetensors format for every backend, safe loading.

Modules: :mod:`~mlpug.checkpointing.files` (crash-safe writes), :mod:`~mlpug.checkpointing.names` (file names),
:mod:`~mlpug.checkpointing.header` (the header, :class:`CheckpointError`, foreign files),
:mod:`~mlpug.checkpointing.codec` (structure <-> arrays + metadata, checksum), :mod:`~mlpug.checkpointing.savers`
(the saver protocol, :class:`NumpyCheckpointSaver`), :mod:`~mlpug.checkpointing.writer` (background writing).
Random states are not here: the trainer lists its providers (:mod:`mlpug.random_state`). Backends:
:mod:`mlpug.pytorch.checkpointing`, :mod:`mlpug.tensorflow.checkpointing`.

Crash safety (the write protocol of every saver): the file is written to a temporary file in the target's
directory (``.mlpug.tmp-<pid>/<name>``), closed, ``fsync``'ed, renamed over the target with ``os.replace`` (atomic
on POSIX) and the directory is ``fsync``'ed, so a process killed at any moment leaves either the previous
complete file or the new complete file, never a partial one. A write that fails (a full disk, an I/O error,
whatever the safetensors writer raises) raises :class:`CheckpointWriteError` naming the file, with "no space left
on device" for ``ENOSPC``; the previous file stays.

File names (``<base>`` is ``base_checkpoint_filename``; the extension is ``safetensors`` for every backend)::

    <base>-best-model-checkpoint.safetensors               model components at the best monitored value
    <base>-latest-model-checkpoint.safetensors             model components at the last checkpoint period
    <base>-model-checkpoint-<unit>-<index:06d>.safetensors archived model checkpoints (unit: epoch | batch)
    <base>-training-checkpoint.safetensors                 everything needed to continue training
    <base>-emergency-training-checkpoint.safetensors       training checkpoint written when training failed

Contents: every checkpoint is a dict of plain containers (dict with str / int / float / bool / None / tuple
keys, ``OrderedDict`` with its ``_metadata``, list, tuple, str, int, float, bool, None) and the backend's
arrays (torch tensors of any dtype safetensors stores, bfloat16 included; NumPy arrays and scalars), with a
header under ``"mlpug"``::

    {"format": "mlpug-checkpoint", "format_version": 2, "kind": "training" | "model",
     "backend": "pytorch" | "tensorflow" | ..., "mlpug_version": str, "created_at": float (Unix seconds)}

A training checkpoint is ``TrainingManager.get_state()`` plus the header (trainer state, counters, best logs,
callback states, data order and random states); a model checkpoint holds ``model_components``,
``hyper_parameters``, ``progress`` (epoch, batch_step, global_iter) and the resolved ``logs`` (current values).

File format (version 2): a `safetensors <https://github.com/huggingface/safetensors>`_ file. Its tensors are
the checkpoint's arrays, named ``a0``, ``a1``, ... in the order they occur; its ``__metadata__`` (``Dict[str,
str]``) holds ``"mlpug"`` (the header as JSON), ``"structure"`` (the JSON skeleton of the rest, arrays replaced
by references) and ``"checksum"`` (``crc32:<hex>``: one CRC-32 over header, skeleton, and every array's name,
dtype, shape and raw bytes; safetensors has no checksum of its own). See :mod:`mlpug.checkpointing.codec`.

Guarantees of loading (:meth:`CheckpointSaver.load`): nothing is ever unpickled (safetensors cannot); the
header is checked before any array is read, so a file of another backend or kind gives a clear
:class:`CheckpointError`; the arrays are memory-mapped (``safetensors.safe_open``), then the checksum is
verified, so one flipped byte anywhere in the arrays or the skeleton, a truncated or empty file, or a foreign
file (an old ``.pt`` / ``.npz`` zip archive of format version 1, a pickle, random bytes) gives a
:class:`CheckpointError` naming the file. Version 1 files cannot be loaded by this version.
"""

from mlpug.checkpointing.codec import decode_plain, encode_plain
from mlpug.checkpointing.files import (
    CheckpointWriteError,
    atomic_link_or_copy,
    atomic_write,
    atomic_write_path,
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
    check_training_state,
    make_header,
)
from mlpug.checkpointing.names import CheckpointFileNames, directory_hint
from mlpug.checkpointing.savers import CheckpointSaver, NumpyCheckpointSaver, snapshot_tree
from mlpug.checkpointing.writer import BackgroundWriter

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BackgroundWriter",
    "CheckpointError",
    "CheckpointFileNames",
    "CheckpointKind",
    "CheckpointSaver",
    "CheckpointWriteError",
    "NumpyCheckpointSaver",
    "atomic_link_or_copy",
    "atomic_write",
    "atomic_write_path",
    "check_header",
    "check_training_state",
    "decode_plain",
    "directory_hint",
    "encode_plain",
    "fsync_directory",
    "make_header",
    "remove_stale_temporary_files",
    "snapshot_tree",
    "temporary_path",
]
