"""Resuming: how ``TrainingManager(resume_from=...)`` finds and reads a training checkpoint, without knowing files.

The manager knows only this protocol. A callback that can read training checkpoints implements
:class:`TrainingStateLoader` (every backend's ``CheckpointManager`` does: it knows its directory, file names and
saver); the manager asks the one loader among its callbacks to resolve ``resume_from`` (a path, or ``"latest"``)
and to load it, then applies the state with ``TrainingManager.set_state`` before any hook runs. A training state
that is already loaded (a dict) needs no loader.

Modes: an explicit path is strict (a missing file is an error at construction); ``"latest"`` resumes from the
newest training checkpoint when there is one and otherwise starts fresh (the loader logs one info line), so one
command works for the first start and every restart of a preempted machine.

Before any of a state is applied, ``TrainingManager.set_state`` checks that its counters are one position of the run
(:func:`check_counters`), so that an edited or foreign file cannot resume to the end after 0 batches.
"""

from __future__ import annotations

import numbers
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from mlpug.checkpointing.header import check_training_state

ResumeFrom = Union[str, "os.PathLike[str]", Mapping[str, Any], None]
"""A training checkpoint path, ``"latest"``, a loaded training state, or None (start fresh)."""


class TrainingStateLoader(ABC):
    """Finds and reads training checkpoints for ``TrainingManager(resume_from=...)``."""

    @abstractmethod
    def resolve_training_checkpoint(self, resume_from: Union[str, "os.PathLike[str]"]) -> Optional[str]:
        """The training checkpoint file ``resume_from`` means (``"latest"``: this loader's newest one).

        Returns:
            The file; None for ``"latest"`` when there is no training checkpoint yet (training starts fresh; the
            loader logs that).

        Raises:
            ValueError: A path that names no file (or a directory).
        """

    @abstractmethod
    def load_training_checkpoint(self, path: str) -> dict:
        """The training state stored at ``path`` (what ``TrainingManager.get_state`` returned, plus a header).

        Raises:
            mlpug.checkpointing.CheckpointError: Missing, truncated, corrupt, another backend or kind.
        """


def find_state_loader(callbacks: Sequence[Any]) -> Optional[TrainingStateLoader]:
    """The one :class:`TrainingStateLoader` among ``callbacks``, or None.

    Raises:
        ValueError: More than one callback can load training checkpoints (which one to resume from is unclear).
    """
    loaders = [callback for callback in callbacks if isinstance(callback, TrainingStateLoader)]
    if len(loaders) > 1:
        raise ValueError(
            "resume_from with a path or 'latest' is ambiguous: callbacks "
            f"{[getattr(loader, 'name', type(loader).__name__) for loader in loaders]} can all load training "
            "checkpoints; pass a loaded state instead: resume_from=mlp.load_training_checkpoint(path)"
        )
    return loaders[0] if loaders else None


def check_resume_from(resume_from: ResumeFrom, callbacks: Sequence[Any]) -> None:
    """Validate ``resume_from`` at manager construction, so a bad value fails before training starts.

    A path must name an existing file; ``"latest"`` needs only the loader (no checkpoint yet means a fresh start).

    Raises:
        TypeError: Not a path, ``"latest"`` or a loaded training state.
        ValueError: A path or ``"latest"`` without a loader among the callbacks, a file that does not exist, or a
            dict that is not a training state (a ``mlpug.checkpointing.CheckpointError`` naming the missing or bad
            field).
    """
    if resume_from is None:
        return
    if isinstance(resume_from, Mapping):
        check_training_state(resume_from, "the resume_from dict (load one with mlp.load_training_checkpoint(path))")
        return
    if not isinstance(resume_from, (str, os.PathLike)):
        raise TypeError(
            f"resume_from must be a checkpoint path, 'latest' or a loaded training checkpoint, got {resume_from!r:.200}"
        )
    loader = _require_loader(resume_from, callbacks)
    if resume_from != "latest":
        loader.resolve_training_checkpoint(resume_from)


def check_counters(state: Mapping[str, Any], num_epochs: int, num_batches_per_epoch: int, source: str) -> None:
    """Check that the counters of a training state are one position of this run, before any of the state is applied.

    ``epoch``, ``batch_step`` and ``global_iter`` must be ints >= 0 with ``epoch <= num_epochs``,
    ``batch_step <= num_batches_per_epoch`` (a checkpoint written after an epoch's last batch, before its end hooks,
    has ``batch_step == num_batches_per_epoch``), ``batch_step == 0`` at ``epoch == num_epochs`` (a finished run), and
    ``global_iter == epoch * num_batches_per_epoch + batch_step`` (the batches trained so far; the state's
    ``num_batches_per_epoch`` is this run's, checked before). A resume from anything else would train another
    number of batches than the run had left, or none, and overwrite the good training checkpoint.

    Args:
        state: A training state (``TrainingManager.get_state()``, e.g. loaded from a file).
        num_epochs: The resuming manager's ``num_epochs``.
        num_batches_per_epoch: The resuming manager's ``num_batches_per_epoch``.
        source: The file (or what else ``state`` is) for the message.

    Raises:
        ValueError: Naming ``source``, the counters and what they should be.
    """
    counters: dict[str, Any] = {key: state.get(key) for key in ("epoch", "batch_step", "global_iter")}
    values = ", ".join(f"{key}={value!r:.40}" for key, value in counters.items())
    for key, value in counters.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{source}: the training state's {key} is {value!r:.100}, not an int >= 0 ({values})")
    epoch, batch_step, global_iter = (int(counters[key]) for key in ("epoch", "batch_step", "global_iter"))
    run = f"num_epochs={num_epochs}, num_batches_per_epoch={num_batches_per_epoch}"
    problem = None
    if epoch > num_epochs:
        problem = f"epoch {epoch} is past the last epoch of this run ({run})"
    elif batch_step > num_batches_per_epoch:
        problem = f"batch_step {batch_step} is past the end of an epoch ({run})"
    elif epoch == num_epochs and batch_step != 0:
        problem = f"epoch {epoch} is the end of this run ({run}), where batch_step is 0"
    elif global_iter != epoch * num_batches_per_epoch + batch_step:
        problem = (
            f"global_iter should be epoch * num_batches_per_epoch + batch_step = "
            f"{epoch * num_batches_per_epoch + batch_step} ({run})"
        )
    if problem is not None:
        raise ValueError(
            f"{source}: the training state's counters do not fit together: {values}: {problem}; the file is not a "
            "training checkpoint of this run (or was edited); resume from another one"
        )


def load_resume_state(resume_from: ResumeFrom, callbacks: Sequence[Any]) -> Optional[dict]:
    """The training state ``resume_from`` refers to, or None when it is None or ``"latest"`` finds no checkpoint.

    Raises:
        ValueError / mlpug.checkpointing.CheckpointError: See :func:`check_resume_from` and the loader.
    """
    if resume_from is None:
        return None
    if isinstance(resume_from, Mapping):
        return dict(resume_from)
    loader = _require_loader(resume_from, callbacks)
    path = loader.resolve_training_checkpoint(resume_from)
    return None if path is None else loader.load_training_checkpoint(path)


def _require_loader(resume_from: Any, callbacks: Sequence[Any]) -> TrainingStateLoader:
    loader = find_state_loader(callbacks)
    if loader is None:
        raise ValueError(
            f"resume_from={str(resume_from)!r} needs a CheckpointManager in the callbacks (it reads the backend's "
            "files); or pass a loaded checkpoint: resume_from=mlp.load_training_checkpoint(path)"
        )
    return loader
