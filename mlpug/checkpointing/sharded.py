"""Sharded training checkpoints: the protocol a sharding strategy implements, and the neutral parts of the format.

A strategy whose state is sharded over the ranks (PyTorch FSDP) writes the arrays of the trainer state (model and
optimizer state) as shards, every rank its own, into a directory of their own next to the training checkpoint file::

    <base>-training-checkpoint.safetensors          the training checkpoint: everything but the trainer's arrays,
                                                    and a reference to the shard directory (written last: commit)
    <base>-training-checkpoint-shards-<global_iter:09d>-<run>-<count>/   the shards and their metadata (DCP's files)

The training checkpoint file is written (crash-safely, :func:`~mlpug.checkpointing.atomic_write_path`) only after
every rank's shards and the metadata are durable; it is the commit: a process killed at any moment leaves the
previous training checkpoint file, naming a shard directory that is complete. Shard directories that no training
checkpoint file names any more are removed after the commit (and at the start of a run).

In the file, the trainer state is ``{SHARDED_KEY: reference, "plain": the state with every array replaced by
{ARRAY_KEY: key}}``; the reference is ``{"format": str, "directory": name, "world_size": int, "keys": [key, ...]}``
(the directory relative to the file; made absolute when loaded, see :func:`resolve_reference`).
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Optional

SHARDED_KEY = "mlpug_sharded"
"""The key of the reference in a trainer state whose arrays are in a shard directory."""

ARRAY_KEY = "mlpug_sharded_array"
"""The key of an array's placeholder in the plain part of a sharded trainer state."""

SHARD_DIRECTORY_MARKER = "-shards-"
"""Between the training checkpoint's name (without extension) and the global iteration in a shard directory's
name."""

Wait = Callable[[], None]
"""Blocks until this rank's part of a sharded write is durable (every rank's, on the primary); raises its error."""


class ShardedCheckpoints(ABC):
    """How a strategy with sharded state writes and reads the trainer state of training checkpoints, and gathers
    the model for model checkpoints. Every rank calls every method at the same point (:meth:`save`,
    :meth:`gather_model_components` and the first :meth:`next_directory_suffix` are collectives)."""

    @abstractmethod
    def gather_model_components(self, model_components: dict) -> dict:
        """The whole (unsharded) state of ``model_components`` (``trainer.get_state()["model_components"]``) in host
        memory on the primary rank (what model checkpoints hold); an empty dict on the other ranks."""

    @abstractmethod
    def save(self, trainer_state: dict, directory: str, background: bool) -> tuple[dict, Wait]:
        """Start writing this rank's shards of every array of ``trainer_state`` into ``directory`` (created).

        Args:
            trainer_state: ``trainer.get_state()`` (live arrays).
            directory: The shard directory (see the module docstring).
            background: Write in the background (the arrays are copied first, so training may go on).

        Returns:
            The trainer state to store in the training checkpoint file (the reference and the plain part), and
            the function that waits until the shards are durable (see :data:`Wait`).
        """

    @abstractmethod
    def next_directory_suffix(self) -> tuple[int, int]:
        """``(run token, count)`` of the next save's shard directory (see :func:`shard_directory`): the token agreed
        by the ranks (a collective at the first call), the count of this run's saves."""

    def close(self) -> None:
        """Release what :meth:`save` holds (e.g. a process group of its own); default nothing."""
        return None


def same_mapping(original: dict, items: dict) -> dict:
    """A dict of ``original``'s type holding ``items``: an ``OrderedDict`` (a module ``state_dict``) keeps its
    ``_metadata`` (the module versions ``load_state_dict`` reads); a plain dict is ``items`` itself."""
    if type(original) is dict:
        return items
    rebuilt = type(original)(items)
    metadata = getattr(original, "_metadata", None)
    if metadata is not None:
        rebuilt._metadata = metadata  # type: ignore[attr-defined]
    return rebuilt


def split_arrays(state: Any, is_array: Callable[[Any], bool]) -> tuple[Any, dict[str, Any]]:
    """``state`` with every array replaced by ``{ARRAY_KEY: key}``, and the arrays by key (their path in ``state``,
    dotted, e.g. ``"optimizers.optimizer.state.0.exp_avg"``)."""
    arrays: dict[str, Any] = {}

    def visit(value: Any, path: str) -> Any:
        if is_array(value):
            arrays[path] = value
            return {ARRAY_KEY: path}
        if isinstance(value, dict):
            return same_mapping(
                value, {key: visit(item, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
            )
        if isinstance(value, (list, tuple)):
            items = enumerate(value)
            return type(value)(visit(item, f"{path}.{index}" if path else str(index)) for index, item in items)
        return value

    return visit(state, ""), arrays


def join_arrays(plain: Any, arrays: dict[str, Any], where: str) -> Any:
    """The inverse of :func:`split_arrays`: every placeholder of ``plain`` replaced by its array.

    Raises:
        mlpug.checkpointing.CheckpointError: A placeholder names an array not in ``arrays`` (naming ``where``).
    """
    from mlpug.checkpointing.header import CheckpointError

    def visit(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {ARRAY_KEY}:
                key = value[ARRAY_KEY]
                if key not in arrays:
                    raise CheckpointError(f"{where}: the array {key!r} is missing from the shards")
                return arrays[key]
            return same_mapping(value, {key: visit(item) for key, item in value.items()})
        if isinstance(value, (list, tuple)):
            return type(value)(visit(item) for item in value)
        return value

    return visit(plain)


def is_sharded(trainer_state: Any) -> bool:
    """Whether a trainer state read from a training checkpoint holds a reference to shards."""
    return isinstance(trainer_state, dict) and SHARDED_KEY in trainer_state


def shard_directory(training_checkpoint: str, global_iter: int, run_token: int, count: int) -> str:
    """The shard directory of the training checkpoint file ``training_checkpoint``, written at ``global_iter`` as the
    ``count``-th sharded save of the run ``run_token`` (agreed by the ranks): a new name for every save, so that a
    save never writes into the directory a committed checkpoint names."""
    stem = os.path.splitext(training_checkpoint)[0]
    return f"{stem}{SHARD_DIRECTORY_MARKER}{global_iter:09d}-{run_token:08x}-{count:04d}"


def _order(name: str, prefix: str) -> Optional[tuple[int, str, int]]:
    """``(global_iter, run token, count)`` of a shard directory's name, or None for another name."""
    parts = name[len(prefix) :].split("-")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[2].isdigit()):
        return None
    return int(parts[0]), parts[1], int(parts[2])


def resolve_reference(checkpoint: dict, path: str) -> None:
    """Make the shard directory of a loaded training checkpoint (read from ``path``) absolute, in place.

    Raises:
        mlpug.checkpointing.CheckpointError: The directory does not exist (naming both).
    """
    from mlpug.checkpointing.header import CheckpointError

    trainer_state = checkpoint.get("trainer")
    if trainer_state is None or not is_sharded(trainer_state):
        return
    reference = trainer_state[SHARDED_KEY]
    directory = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(reference["directory"]))
    if not os.path.isdir(directory):
        raise CheckpointError(f"training checkpoint {path} names the shard directory {directory}, which does not exist")
    reference["directory"] = directory


def remove_shard_directories(training_checkpoint: str, keep: str) -> list[str]:
    """Remove the shard directories of ``training_checkpoint`` older than ``keep`` (the directory just committed):
    those of an earlier global iteration, of another run at the same one, and of this run's earlier saves. Newer
    ones (a save that other ranks may have started already) stay.

    Returns:
        The names of the removed directories.
    """
    directory, name = os.path.split(os.path.abspath(training_checkpoint))
    prefix = os.path.splitext(name)[0] + SHARD_DIRECTORY_MARKER
    kept = _order(os.path.basename(keep), prefix)
    removed: list[str] = []
    if kept is None or not os.path.isdir(directory):
        return removed
    for entry in os.listdir(directory):
        order = _order(entry, prefix) if entry.startswith(prefix) else None
        if order is None or entry == os.path.basename(keep):
            continue
        older = order[0] < kept[0] or (order[0] == kept[0] and (order[1] != kept[1] or order[2] < kept[2]))
        if older or (order[1] == kept[1] and order[2] < kept[2]):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def remove_uncommitted_shard_directories(training_checkpoint: str, committed: Optional[str]) -> list[str]:
    """At the start of a run (primary rank, before any save): remove the shard directories of ``training_checkpoint``
    other than ``committed`` (the one the file names; None: the file names none). ``committed == ""`` (the file
    could not be read) removes nothing.

    Returns:
        The names of the removed directories.
    """
    if committed == "":
        return []
    directory, name = os.path.split(os.path.abspath(training_checkpoint))
    prefix = os.path.splitext(name)[0] + SHARD_DIRECTORY_MARKER
    keep = os.path.basename(committed) if committed else None
    removed: list[str] = []
    if not os.path.isdir(directory):
        return removed
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and _order(entry, prefix) is not None and entry != keep:
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
            removed.append(entry)
    return removed
