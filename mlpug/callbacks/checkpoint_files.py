"""``CheckpointFiles``: how a ``CheckpointManager`` writes its files, apart from deciding what to write.

It owns the file names, the backend saver, the background writer and what the written files are: the list of
archived model checkpoints and the position of the last training checkpoint written. Every write is crash-safe
(:func:`mlpug.checkpointing.atomic_write_path`); a model or training checkpoint whose weights are not finite is never
written (the last good file stays). Only the primary rank writes files; when the trainer's state is sharded
(:attr:`CheckpointFiles.sharded`, see :mod:`mlpug.checkpointing.sharded`) every rank calls the methods that snapshot
and write training checkpoints, and writes its shards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Literal, Optional

from mlpug.checkpointing import (
    BackgroundWriter,
    CheckpointFileNames,
    CheckpointSaver,
    atomic_link_or_copy,
    make_header,
    remove_stale_temporary_files,
)
from mlpug.checkpointing.saved_shards import SavedShards
from mlpug.checkpointing.sharded import (
    SHARDED_KEY,
    ShardedCheckpoints,
    is_sharded,
    remove_shard_directories,
    remove_uncommitted_shard_directories,
    shard_directory,
)
from mlpug.logs import resolve
from mlpug.trainers.hook_dispatcher import add_note

Job = Callable[[], None]
"""A write of one or more files, run in the background writer's thread or at once."""


def position_of(state: dict) -> tuple:
    """``(epoch, batch_step, global_iter)`` of a training state (``TrainingManager.get_state()``)."""
    return state["epoch"], state["batch_step"], state["global_iter"]


class CheckpointFiles:
    """Writes the model and training checkpoints of one ``CheckpointManager`` (see the module docstring).

    Args:
        saver: The backend's saver (``snapshot``, ``save``, ``all_finite``).
        file_names: The names of every file (:class:`~mlpug.checkpointing.CheckpointFileNames`).
        hyper_parameters: Plain dict saved in every model checkpoint.
        write_in_background: Write in the background writer's thread after a snapshot copy (else at once).
        keep_last: Keep only this many archived model checkpoints (None: all).
        period_unit: ``"batch"`` or ``"epoch"``: the unit of the archives' names.

    Attributes:
        writer: The :class:`~mlpug.checkpointing.BackgroundWriter` (``writer.failed``: a background write failed).
        archived: File names of the archived model checkpoints that exist, oldest first (saved in training
            checkpoints).
        last_saved_position: ``(epoch, batch_step, global_iter)`` of the last training checkpoint written in this
            run, or None (none yet, or the last one may not be on disk).
    """

    def __init__(
        self,
        saver: CheckpointSaver,
        file_names: CheckpointFileNames,
        hyper_parameters: dict,
        write_in_background: bool,
        keep_last: Optional[int],
        period_unit: Literal["batch", "epoch"],
    ):
        self.saver = saver
        self.file_names = file_names
        self.hyper_parameters = hyper_parameters
        self.write_in_background = write_in_background
        self.keep_last = keep_last
        self.period_unit = period_unit
        self.writer = BackgroundWriter()
        self.sharded: Optional[ShardedCheckpoints] = None  # the trainer's, when its state is sharded
        self.is_primary = True
        self.archived: list[str] = []
        self.last_saved_position: Optional[tuple] = None
        self._log = logging.getLogger("mlpug.CheckpointManager")

    # ----- the directory -----
    def prepare_directory(self) -> None:
        """Create the directory; remove temporary files that a killed run of this base name left, and (sharded
        state) the shard directories that the training checkpoint file does not name (of saves that never
        committed)."""
        os.makedirs(self.file_names.directory, exist_ok=True)
        remove_stale_temporary_files(self.file_names.directory, self.file_names.base_name)
        if self.sharded is not None:
            remove_uncommitted_shard_directories(self.file_names.training, self._committed_shard_directory())

    def _committed_shard_directory(self) -> Optional[str]:
        """The shard directory the training checkpoint file names; None when there is none (or it cannot be read:
        then nothing is removed)."""
        path = self.file_names.training
        if not os.path.exists(path):
            return None
        try:
            trainer_state = self.saver.load(path, kind="training").get("trainer")
        except Exception:
            return ""  # unreadable: keep every directory
        if trainer_state is None or not is_sharded(trainer_state):
            return None
        return str(trainer_state[SHARDED_KEY]["directory"])

    def remove_own_temporary_files(self) -> None:
        """Remove this run's own temporary files (left by a write that failed); call when every write finished."""
        remove_stale_temporary_files(self.file_names.directory, self.file_names.base_name, including_own=True)

    def restore_archived(self, listed: list[str]) -> list[str]:
        """Set :attr:`archived` to the files of ``listed`` that exist; return the names that do not."""
        directory = self.file_names.directory
        self.archived = [name for name in listed if os.path.exists(os.path.join(directory, name))]
        return sorted(set(listed) - set(self.archived))

    def register_archive(self, period_count: int) -> str:
        """The path of the archive of period ``period_count``, added to :attr:`archived` (and the oldest dropped
        beyond ``keep_last``) before the snapshot, so that the saved list names the files that exist after it."""
        path = self.file_names.archived_model(self.period_unit, period_count)
        self.archived = [*self.archived, os.path.basename(path)][-(self.keep_last or 0) :]
        return path

    # ----- contents -----
    def model_checkpoint(self, trainer_state: dict, current: dict, num_batches_per_epoch: int) -> dict:
        """A model checkpoint of ``trainer_state["model_components"]`` at the position of ``current``
        (``logs["current"]``, or a view of it as of evaluated weights), with its logs."""
        return {
            "mlpug": make_header("model", self.saver.backend),
            "model_components": trainer_state["model_components"],
            "hyper_parameters": self.hyper_parameters,
            "progress": {
                "epoch": current["epoch"],
                "batch_step": current["batch_step"],
                "global_iter": current["global_iter"],
                "num_batches_per_epoch": num_batches_per_epoch,
            },
            "logs": resolve({key: value for key, value in current.items()}),
        }

    def snapshot_model_components(self, model_components: dict) -> dict:
        """A snapshot of only ``model_components`` (what a best model checkpoint holds), in the buffers that a full
        training-state snapshot uses for them (the same paths): ``{"model_components": ...}``."""
        return self.saver.snapshot({"trainer": {"model_components": model_components}})["trainer"]

    # ----- writing -----
    # ----- sharded state (every rank takes part; see mlpug.checkpointing.sharded) -----
    def snapshot_training_state(self, state: dict, background: bool) -> tuple[dict, dict, Optional[SavedShards]]:
        """A snapshot of the training state ``state`` (``TrainingManager.get_state()``) to write, the model components
        for model checkpoints, and the shards being written (sharded state) or None.

        Whole state (primary rank): the saver's snapshot, whose model components are the model checkpoint's. Sharded
        state (every rank, collectives): the model components gathered (on the primary), the trainer state's shards
        written by every rank into a new shard directory (in the background when ``background``), and the rest of
        the state snapshotted (primary).
        """
        if self.sharded is None:
            snapshot = self.saver.snapshot(state)
            return snapshot, snapshot["trainer"]["model_components"], None
        trainer_state = state["trainer"]
        model_components = self.sharded.gather_model_components(trainer_state["model_components"])
        suffix = self.sharded.next_directory_suffix()
        directory = shard_directory(self.file_names.training, state["global_iter"], *suffix)
        stored, wait = self.sharded.save(trainer_state, directory, background)
        rest = {key: value for key, value in state.items() if key != "trainer"}
        # the primary writes the rest; the other ranks need only the position (last_saved_position)
        rest = (
            self.saver.snapshot(rest)
            if self.is_primary
            else {key: rest[key] for key in ("epoch", "batch_step", "global_iter")}
        )
        return {**rest, "trainer": stored}, model_components, SavedShards(directory, wait)

    def gather_model_components(self, model_components: dict) -> dict:
        """A snapshot of ``model_components`` for a model checkpoint (sharded state: gathered, a collective; the
        primary rank gets them)."""
        if self.sharded is not None:
            return self.sharded.gather_model_components(model_components)
        return self.snapshot_model_components(model_components)["model_components"]

    def write_period(
        self,
        best_checkpoint: Optional[dict],
        training_state: Optional[dict],
        current: dict,
        num_batches_per_epoch: int,
        archive_path: Optional[str],
        period: str,
        model_components: Optional[dict] = None,
        shards: Optional[SavedShards] = None,
    ) -> None:
        """One job for every file of a period: the best model checkpoint (``best_checkpoint``), and with
        ``training_state`` (a snapshot) the latest model checkpoint (of ``model_components``), its archive and the
        training checkpoint (after ``shards`` are durable). ``period`` names the period in messages. On the other
        ranks (sharded state) the job only waits for this rank's shards."""
        jobs: list[Job] = []
        files: list[str] = []
        names = self.file_names
        if best_checkpoint is not None and self.is_primary:
            jobs.append(lambda: self._save_best(best_checkpoint))
            files.append(names.best_model)
        if training_state is not None:
            assert model_components is not None
            jobs.append(self._latest_job(training_state, model_components, current, num_batches_per_epoch,
                                         archive_path, shards))  # fmt: skip
            files += [names.latest_model, *([archive_path] if archive_path else []), names.training]

        def write_all() -> None:
            for job in jobs:
                job()

        self.write(write_all, on_error=self.report_failed_write(period, files))

    def write_best(self, checkpoint: dict, period: str, background: Optional[bool] = None) -> None:
        """Write the best model checkpoint ``checkpoint``; a failure is reported naming ``period``."""
        self.write(
            lambda: self._save_best(checkpoint),
            background=background,
            on_error=self.report_failed_write(period, [self.file_names.best_model]),
        )

    def _save_best(self, checkpoint: dict) -> None:
        self.save_if_finite(checkpoint, self.file_names.best_model)

    def _latest_job(
        self,
        training_state: dict,
        model_components: dict,
        current: dict,
        num_batches_per_epoch: int,
        archive_path: Optional[str],
        shards: Optional[SavedShards],
    ) -> Job:
        """The job writing the latest model checkpoint, an archive of it, and the training checkpoint (after the
        shards, when sharded; then the older shard directories are removed)."""
        self.last_saved_position = position_of(training_state)
        model_checkpoint = self.model_checkpoint({"model_components": model_components}, current, num_batches_per_epoch)
        training_checkpoint = {"mlpug": make_header("training", self.saver.backend), **training_state}
        names, keep = self.file_names, set(self.archived)

        def job() -> None:
            if shards is not None:
                shards.wait()  # every rank's shards and the metadata are durable
            if not self.is_primary:
                return
            # The training checkpoint, which lists the archives, is the last file of the set: a process killed
            # between the files leaves the previous training checkpoint, whose listed files all exist.
            if not self.save_if_finite(model_checkpoint, names.latest_model):
                self.last_saved_position = None
                return
            if archive_path is not None:
                atomic_link_or_copy(names.latest_model, archive_path)
            self.saver.save(training_checkpoint, names.training)  # the commit
            if shards is not None:
                remove_shard_directories(names.training, keep=shards.directory)
            if archive_path is not None and self.keep_last is not None:
                self._remove_archives_except(keep)

        return job

    def _remove_archives_except(self, keep: set) -> None:
        """Remove archived model checkpoints of this base name not in ``keep`` (also those left by a killed run)."""
        prefix = os.path.basename(self.file_names.archived_model(self.period_unit, 0))
        prefix = prefix[: prefix.rindex("-") + 1]
        for name in os.listdir(self.file_names.directory):
            if name.startswith(prefix) and name.endswith(f".{self.file_names.extension}") and name not in keep:
                try:
                    os.remove(os.path.join(self.file_names.directory, name))
                except FileNotFoundError:
                    pass

    def save_training_checkpoint(self, path: str, state: dict) -> None:
        """Write ``state`` (``TrainingManager.get_state()``) to ``path`` and wait until it is written (sharded state:
        on every rank, which write their shards first; the primary writes ``path``)."""
        self.writer.wait()
        if self.sharded is None:
            training_state = self.saver.snapshot(state)
            checkpoint = {"mlpug": make_header("training", self.saver.backend), **training_state}
            if self.save_if_finite(checkpoint, path):
                self.last_saved_position = position_of(training_state)
            return
        directory = shard_directory(path, state["global_iter"], *self.sharded.next_directory_suffix())
        stored, wait = self.sharded.save(state["trainer"], directory, background=False)
        wait()
        if self.is_primary:
            rest = self.saver.snapshot({key: value for key, value in state.items() if key != "trainer"})
            self.saver.save({"mlpug": make_header("training", self.saver.backend), **rest, "trainer": stored}, path)
            remove_shard_directories(path, keep=directory)
        self.last_saved_position = position_of(state)

    def save_if_finite(self, checkpoint: dict, path: str) -> bool:
        """Write ``checkpoint`` unless its model weights hold NaN / inf (then log why and keep the old file)."""
        components = (checkpoint.get("trainer") or checkpoint).get("model_components")
        if not self.saver.all_finite(components):
            self._log.error(
                f"Not writing {path}: the model weights hold NaN or infinite values; the last good file stays"
            )
            return False
        self.saver.save(checkpoint, path)
        return True

    def write(
        self, job: Job, background: Optional[bool] = None, on_error: Optional[Callable[[BaseException], None]] = None
    ) -> None:
        """Run ``job`` in the background writer (``write_in_background``, or ``background``) or at once."""
        background = self.write_in_background if background is None else background
        if background:
            self.writer.submit(job, on_error)
        else:
            self.writer.wait()
            job()

    def report_failed_write(self, period: str, files: list[str]) -> Callable[[BaseException], None]:
        """The ``on_error`` of a background write of ``files`` in ``period``: logs the failure at once (ERROR, in the
        writer thread) and notes the file and the period on the error, which the training loop raises at the next
        batch boundary. When ``files`` hold the training checkpoint, its position is forgotten (it may not be on
        disk); a failed best model checkpoint alone leaves the last training checkpoint."""

        def report(error: BaseException) -> None:
            if self.file_names.training in files:
                self.last_saved_position = None  # that checkpoint may not be on disk
            file = getattr(error, "path", None) or ", ".join(files)
            self._log.error(
                f"Writing the checkpoint of {period} failed in the background ({file}): {type(error).__name__}: "
                f"{error}. Training stops with this error at the next batch boundary (or at its end)."
            )
            add_note(error, f"mlpug: raised by the background write of {file}, the checkpoint of {period}")

        return report

    def raise_failed_write(self) -> None:
        """Raise the error of a background write that failed (logged when it happened); one attribute read when
        none did.

        Raises:
            Exception: What the failed write raised, with a note naming the file and its period.
        """
        if self.writer.failed:  # a plain attribute the writer thread sets: nothing to wait for per batch
            self.writer.wait()

    def wait_for_background_write(self) -> Optional[BaseException]:
        """Wait for the background write; return its error (logged when it happened), forgetting the position it
        claimed."""
        try:
            self.writer.wait()
        except Exception as error:
            self.last_saved_position = None  # that checkpoint may not be on disk
            return error
        return None

    def last_good_training_checkpoint(self) -> str:
        """Which training checkpoint a restart would continue from, for messages."""
        path = self.file_names.training
        if self.last_saved_position is not None:
            epoch, batch_step, global_iter = self.last_saved_position
            return (
                f"the last good training checkpoint is {path} (written in this run, resuming at epoch {epoch}, "
                f"batch step {batch_step}, global iteration {global_iter})"
            )
        if os.path.exists(path):
            return f"the training checkpoint on disk, {path}, is kept (written before; resume_from='latest' loads it)"
        return f"no training checkpoint was written yet ({path} does not exist): a restart starts from the beginning"
