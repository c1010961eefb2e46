"""``CheckpointManager``: best / latest / archived model checkpoints and crash-safe training checkpoints.

File names and contents are documented in :mod:`mlpug.checkpointing`. The manager writes through a backend
:class:`~mlpug.checkpointing.CheckpointSaver` (``mlp.callbacks.CheckpointManager`` of a backend injects it).
Only the primary rank writes files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

from mlpug.callbacks.best_model import BestModel
from mlpug.callbacks.checkpoint_files import CheckpointFiles, position_of
from mlpug.callbacks.checkpoint_loader import TrainingCheckpointLoader
from mlpug.callbacks.improvement import ImprovementRule
from mlpug.checkpointing import (
    CheckpointFileNames,
    CheckpointSaver,
    encode_plain,
)
from mlpug.trainers.callback import Callback, check_log_path
from mlpug.trainers.evaluation_result import EvaluationResult
from mlpug.trainers.non_finite import (
    NonFiniteLossError,
    NonFiniteMetricPolicy,
    NonFiniteWeightsError,
    validate_non_finite_metric_policy,
)
from mlpug.trainers.resume import TrainingStateLoader
from mlpug.trainers.run_context import RunContext


def _check_period(value: Any, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


def _nearest_existing(path: str) -> tuple[str, bool]:
    """``path`` or the nearest of its parents that exists, and whether that is ``path`` itself."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return existing, existing == os.path.abspath(path)


def _check_directory_path(path: str) -> None:
    """Raise when ``path`` cannot be the checkpoint directory: it, or the nearest of its parents that exists, is not
    a directory."""
    existing, is_path = _nearest_existing(path)
    if not os.path.isdir(existing):
        where = "is an existing file" if is_path else f"is inside the file {existing}"
        raise ValueError(
            f"checkpoints_path {path!r} {where}, not a directory; give the directory for the checkpoint files "
            "(it is created when missing)"
        )


def _check_writable_directory(path: str) -> None:
    """Raise when this process cannot write into the directory ``path``, or into the nearest of its parents that
    exists, where it would be created (no permission, a read-only file system)."""
    existing, is_path = _nearest_existing(path)
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        where = "is a directory" if is_path else f"would be created in {existing}, a directory"
        raise ValueError(
            f"checkpoints_path {path!r} {where} that this process cannot write to (no write permission, or a "
            "read-only file system); give a directory for the checkpoint files that it can write to"
        )


class CheckpointManager(Callback, TrainingStateLoader):
    """Decides the best model, saves model checkpoints and training checkpoints, and loads them to resume.

    At every *period* (a batch when ``batch_level``, else an epoch; counted 1-based from the start of the run):

    * every ``metric_monitor_period`` periods, the value at ``metric_to_monitor`` (dotted path in
      ``logs["current"]``) is compared with the best so far, in the batch-end / epoch-end hook, by
      ``improvement`` (the shared :class:`~mlpug.callbacks.improvement.ImprovementRule` of
      ``metric_opt_mode`` and ``improvement_threshold``); on an improvement ``logs["current"]["is_best"]`` is set
      and ``logs["best"]`` becomes a plain copy of ``logs["current"]``. This callback is the one owner of "best"
      (a producer of ``"best"``): every other callback that reads ``is_best`` or ``logs["best"]`` gets its hooks
      after this decision, wherever it stands in the list
      (see :func:`~mlpug.trainers.callback.dispatch_order`).
    * in the checkpoint phase that follows (after the hooks of all callbacks): on an improvement the *best
      model checkpoint* is written; every ``create_checkpoint_every`` periods the *latest model checkpoint* and
      the *training checkpoint*; every ``archive_last_model_checkpoint_every`` periods the latest model
      checkpoint is also archived under a name with the epoch or batch count (``keep_last`` limits how many
      archives are kept).
    * a metric evaluated asynchronously (``TestMetricsLogger(..., run_async=True)``) is compared in
      ``on_evaluation_result``, once per result as it lands (at epoch ends, and at the end of training);
      ``logs["best"]`` then has the position of the evaluated weights (and ``landed_at``), and the best model
      checkpoint is written at once, in the background, from the evaluated snapshot's weights (not the live
      weights, which have trained on since).

    When training ends (``on_training_checkpoint``), a training checkpoint is written if the last one is older
    than the last batch; when it ends by SIGINT/SIGTERM (``interrupted``) this is the training checkpoint to
    resume from, and when it ends on an error an *emergency training checkpoint* is written to its own file
    (the regular one keeps the last consistent state; when it cannot be written either, one error line says so
    and the error that ended training stays the one raised). With ``write_in_background`` the state is copied
    (snapshot) in the training thread and the files are written by a background thread; training waits only
    for the copy, and for the previous write when it is still running. A background write that fails is logged
    at once and raised at the next batch boundary (the checkpoint-phase hook reads a flag the writer thread sets:
    no cost per batch). Every write is crash-safe (:func:`mlpug.checkpointing.atomic_write_path`).

    As a :class:`~mlpug.trainers.resume.TrainingStateLoader` it resolves ``TrainingManager(resume_from=...)``:
    ``"latest"`` is its training checkpoint file, or a fresh start (one info line) when there is none yet.

    Args:
        saver: Backend saver; ``mlp.callbacks.CheckpointManager`` of a backend passes its own.
        checkpoints_path: Directory of the checkpoint files (created when missing).
        base_checkpoint_filename: Common prefix of the file names.
        metric_to_monitor: Dotted path into ``logs["current"]``, e.g. ``"validation.dataset.loss"``; None writes
            no best model checkpoint. Checked when the ``TrainingManager`` is constructed: a callback must write it
            (see :func:`~mlpug.trainers.callback.check_log_path`).
        metric_opt_mode: ``"min"`` or ``"max"``: whether lower or higher values are better.
        improvement_threshold: Minimum absolute change over the best value that counts as an improvement (>= 0).
        batch_level: Periods are batches (True) or epochs (False).
        metric_monitor_period: Check the metric every this many periods.
        create_checkpoint_every: Write latest model + training checkpoints every this many periods.
        archive_last_model_checkpoint_every: Archive the latest model checkpoint every this many periods; None
            archives nothing.
        keep_last: Keep only this many most recent archived model checkpoints; None keeps all.
        model_hyper_parameters: Plain dict saved in every model checkpoint (e.g. layer sizes).
        write_in_background: Write files in a background thread after a snapshot copy. A background write that
            fails (a full disk, a read-only remount) is logged at once (ERROR, naming the file and the period) and
            its error is raised in the training loop at the next batch boundary, with a note naming that period.
        name: Unique callback name.
        non_finite_metric: What a NaN or infinite value of ``metric_to_monitor`` does (it can never be the best,
            so no best model checkpoint would be written for it): ``"raise"`` (default: training ends with a
            :class:`~mlpug.trainers.non_finite.NonFiniteMetricError` naming the metric and its epoch) or ``"warn"``
            (a warning at the first such value, at every epoch-level one, and a summary at the end; training goes
            on). A non-finite loss or non-finite weights found at that point are raised as such instead. A metric of
            the ``training`` set under ``TrainingManager(non_finite_loss="skip_step" / "warn")`` only warns (that
            policy decides about non-finite training batches).

    Raises:
        TypeError: ``saver`` is not a CheckpointSaver, a path is not a str, or the hyper-parameters are not
            plain containers.
        ValueError: A bad mode, period, threshold or ``keep_last``, or a ``checkpoints_path`` that is (or is
            inside) an existing file. When the ``TrainingManager`` is constructed, on the primary rank (the one that
            writes): a ``checkpoints_path`` that this process cannot write to (the directory, or the nearest existing
            parent it would be created in: no write permission, a read-only file system).
    """

    def __init__(
        self,
        saver: CheckpointSaver,
        checkpoints_path: str = "checkpoints",
        base_checkpoint_filename: str = "model",
        metric_to_monitor: Optional[str] = "validation.dataset.loss",
        metric_opt_mode: Literal["min", "max"] = "min",
        improvement_threshold: float = 0.0,
        batch_level: bool = False,
        metric_monitor_period: int = 1,
        create_checkpoint_every: int = 1,
        archive_last_model_checkpoint_every: Optional[int] = None,
        keep_last: Optional[int] = None,
        model_hyper_parameters: Optional[Mapping] = None,
        write_in_background: bool = True,
        name: Optional[str] = None,
        non_finite_metric: NonFiniteMetricPolicy = "raise",
    ):
        if not isinstance(saver, CheckpointSaver):
            raise TypeError(f"saver must be an mlpug.checkpointing.CheckpointSaver, got {saver!r:.200}")
        for arg_name, value in (
            ("checkpoints_path", checkpoints_path),
            ("base_checkpoint_filename", base_checkpoint_filename),
        ):
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise TypeError(f"{arg_name} must be a non-empty str, got {value!r}")
        _check_directory_path(str(checkpoints_path))
        if os.sep in str(base_checkpoint_filename):
            raise ValueError(
                f"base_checkpoint_filename must be a file name without directories, got "
                f"{base_checkpoint_filename!r}; put the directory in checkpoints_path"
            )
        if metric_to_monitor is not None and (not isinstance(metric_to_monitor, str) or not metric_to_monitor):
            raise TypeError(
                f"metric_to_monitor must be a dotted path str such as 'validation.dataset.loss' or "
                f"None, got {metric_to_monitor!r}"
            )
        improvement = ImprovementRule(
            metric_opt_mode,
            improvement_threshold,
            mode_argument="metric_opt_mode",
            min_delta_argument="improvement_threshold",
        )  # ValueError: a bad mode or threshold
        if not isinstance(batch_level, bool):
            raise TypeError(f"batch_level must be a bool, got {batch_level!r}")
        _check_period(metric_monitor_period, "metric_monitor_period")
        _check_period(create_checkpoint_every, "create_checkpoint_every")
        _check_period(archive_last_model_checkpoint_every, "archive_last_model_checkpoint_every", allow_none=True)
        _check_period(keep_last, "keep_last", allow_none=True)
        hyper_parameters = dict(model_hyper_parameters or {})
        encode_plain(hyper_parameters, [], "model_hyper_parameters", saver.stored_array)  # TypeError: not plain
        super().__init__(name)

        self.saver = saver
        self.file_names = CheckpointFileNames(str(checkpoints_path), base_checkpoint_filename, saver.extension)
        self.metric_to_monitor = metric_to_monitor
        self.batch_level = batch_level
        self.metric_monitor_period = metric_monitor_period
        self.create_checkpoint_every = create_checkpoint_every
        self.archive_last_model_checkpoint_every = archive_last_model_checkpoint_every
        self.keep_last = keep_last
        self.model_hyper_parameters = hyper_parameters
        self.write_in_background = write_in_background
        # writing the files, and loading them to resume: objects of their own
        self.files = CheckpointFiles(
            saver,
            self.file_names,
            hyper_parameters,
            write_in_background,
            keep_last,
            "batch" if batch_level else "epoch",
        )
        self.loader = TrainingCheckpointLoader(self.file_names, saver)
        self.non_finite_metric = validate_non_finite_metric_policy(non_finite_metric)
        # the decision of "best" (its state, best_logs, is saved in training checkpoints)
        self.best_model = BestModel(
            metric_to_monitor or "", improvement, self.non_finite_metric, self.name, warn_every_value=not batch_level
        )

        # state (saved in training checkpoints)
        self._improved = False  # decided in this period's batch-end / epoch-end hook, written in its checkpoint phase
        self._async_section: Optional[str] = None  # the monitored dataset, when its results land asynchronously

    # ----- properties -----
    @property
    def training_checkpoint_path(self) -> str:
        """Path of the training checkpoint (what ``resume_from="latest"`` loads)."""
        return self.file_names.training

    @property
    def produces(self) -> frozenset:
        """``{"best"}`` when a metric is monitored: this callback decides ``is_best`` and ``logs["best"]``."""
        return frozenset() if self.metric_to_monitor is None else frozenset({"best"})

    @property
    def consumes(self) -> frozenset:
        if self.metric_to_monitor is None:
            return frozenset()
        return frozenset({self.metric_to_monitor.split(".", 1)[0]})

    @property
    def log_paths(self) -> frozenset:
        """None under ``logs["current"]`` (it sets ``is_best``, which the manager writes; ``"best"`` is top level)."""
        return frozenset()

    @property
    def improvement(self) -> ImprovementRule:
        """The rule (``metric_opt_mode``, ``improvement_threshold``) that decides an improvement."""
        return self.best_model.improvement

    @improvement.setter
    def improvement(self, rule: ImprovementRule) -> None:
        self.best_model.improvement = rule

    @property
    def archived(self) -> list[str]:
        """File names of the archived model checkpoints that exist, oldest first (saved in training checkpoints)."""
        return self.files.archived

    @property
    def best_logs(self) -> dict:
        """A plain copy of ``logs["current"]`` at the best iteration so far (also ``logs["best"]``); ``{}``
        before the first improvement."""
        return self.best_model.best_logs

    @best_logs.setter
    def best_logs(self, best_logs: dict) -> None:
        self.best_model.best_logs = best_logs

    @property
    def metric_opt_mode(self) -> Literal["min", "max"]:
        """``"min"`` or ``"max"``: whether lower or higher values are better (of ``improvement``)."""
        return self.improvement.mode

    @property
    def improvement_threshold(self) -> float:
        """The minimum absolute change over the best that counts as an improvement (of ``improvement``)."""
        return self.improvement.min_delta

    @property
    def best_value(self) -> Optional[float]:
        """The monitored value at the best iteration so far (None before the first improvement)."""
        return None if self.metric_to_monitor is None else self.best_model.best_value

    @property
    def best_epoch(self) -> Optional[int]:
        """0-based epoch of the best iteration so far, or None."""
        return self.best_logs.get("epoch")

    @property
    def best_global_iter(self) -> Optional[int]:
        """0-based global iteration of the best iteration so far, or None."""
        return self.best_logs.get("global_iter")

    def _is_primary(self) -> bool:
        return self.training_manager is None or self.training_manager.distributed.is_primary

    # ----- hooks -----
    def set_training_manager(self, manager: RunContext) -> bool:
        """Keep the run context; check that a callback writes ``metric_to_monitor`` and, on the primary rank, that the
        checkpoint directory can be written (at the manager's construction, before training).

        Raises:
            ValueError: No callback writes ``metric_to_monitor`` (the paths that are written are listed), or the
                primary rank cannot write to ``checkpoints_path`` (other ranks write no file and do not check).
        """
        if manager.distributed.is_primary:
            _check_writable_directory(self.file_names.directory)
        if self.metric_to_monitor is not None:
            check_log_path(self.metric_to_monitor, manager.callbacks, f"{self.name}: metric_to_monitor")
        section = self.metric_to_monitor.split(".", 1)[0] if self.metric_to_monitor else None
        self._async_section = section if section is not None and manager.is_asynchronous(section) else None
        self.files.sharded = manager.trainer.sharded_checkpoints()
        self.files.is_primary = manager.distributed.is_primary
        super().set_training_manager(manager)
        return True

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        self.context.logs["best"] = self.best_logs
        if self._is_primary():
            self.files.prepare_directory()
        return True

    def batches_until_model_access(self, global_iter: int) -> Optional[int]:
        """Batch level: the batches up to the next period whose checkpoint phase may write the model (a latest
        checkpoint every ``create_checkpoint_every`` periods, a best model checkpoint at a check of the monitored
        metric every ``metric_monitor_period`` periods); epoch level: None (epoch ends end every call)."""
        if not self.batch_level:
            return None
        periods = [self.create_checkpoint_every]
        if self.metric_to_monitor is not None and not self.monitors_async_results:
            periods.append(self.metric_monitor_period)
        return min(period - global_iter % period for period in periods)  # period count global_iter + n

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """With several ranks, where it reads values reduced over the ranks (the monitored metric, the losses it
        checks and the states it writes): the periods at which it may write, as :meth:`batches_until_model_access`
        (epoch level: None, the epoch ends are read points anyway)."""
        return self.batches_until_model_access(global_iter)

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> bool:
        if self.batch_level and not self.monitors_async_results:
            self._decide_best(logs, logs["current"]["global_iter"] + 1)
        return True

    def on_batch_checkpoint(self, logs: dict) -> bool:
        """Batch level: this batch's period. Every batch: raises the error of a background write that failed (it
        was logged when it happened), so that no more than the batch in progress trains on top of it.

        Raises:
            Exception: What the failed background write raised, with a note naming the file and its period.
        """
        self._raise_failed_write()
        if self.batch_level:
            self._on_period(logs, logs["current"]["global_iter"] + 1)
        return True

    def _raise_failed_write(self) -> None:
        """Raise the error of a failed background write at once; with a sharded state not here (a rank alone would
        leave the others waiting in a collective) but at the next period, where the ranks agree on it."""
        if self.files.sharded is None:
            self.files.raise_failed_write()

    def _agree_on_writes(self) -> bool:
        """Sharded state, on every rank at the same point: wait for this rank's background write and raise when any
        rank's failed; then whether the weights are finite on every rank's shards (else an error is logged and no
        checkpoint is written from them, on any rank).

        Raises:
            Exception: This rank's failed write, or a RuntimeError when another rank's failed.
        """
        context = self.context
        error = self.files.wait_for_background_write()
        if context.distributed.any_rank(error is not None):
            if error is not None:
                raise error
            raise RuntimeError(
                "a checkpoint write of another rank failed (its log names the file); the training checkpoint on "
                f"disk is kept: {self.files.last_good_training_checkpoint()}"
            )
        bad = context.trainer.non_finite_weights()  # agreed over the shards
        if bad:
            self._log.error(
                f"Not writing checkpoints: the weights hold NaN or infinite values ({', '.join(bad[:5])}); "
                f"{self.files.last_good_training_checkpoint()}"
            )
        return not bad

    @property
    def monitors_async_results(self) -> bool:
        """Whether the monitored metric is evaluated asynchronously (best decided on each landed result)."""
        return self._async_section is not None

    def on_evaluation_result(self, result: EvaluationResult, logs: dict) -> bool:
        """An asynchronous result of the monitored dataset: compared with the best; on an improvement the best model
        checkpoint is written from the evaluated weights (primary rank). A non-finite value is handled by
        ``non_finite_metric``, naming the epoch of the evaluated weights."""
        if result.dataset_name != self._async_section:
            return True  # synchronous results are decided at their period, from logs (the live weights)
        if result.model_components is None:
            raise ValueError(
                f"{self.name}: an asynchronous result of {result.dataset_name!r} (epoch {result.epoch}) came without "
                "model_components, so the best model checkpoint cannot hold the evaluated weights; a producer that "
                "declares its results in asynchronous_results must publish them with model_components"
            )
        metric = self.metric_to_monitor
        assert metric is not None
        view = _result_view(logs["current"], result)
        if self.best_model.consider(result.value_of(metric), view, logs, self.context) and self._is_primary():
            self._write_best_of(result, view)
        return True

    def _write_best_of(self, result: EvaluationResult, view: dict) -> None:
        """Write the best model checkpoint of an asynchronous result from its evaluated snapshot's weights."""
        assert result.model_components is not None
        self.files.writer.wait()  # the saver's buffers are free
        trainer_state = self.files.snapshot_model_components(result.model_components())
        checkpoint = self.files.model_checkpoint(trainer_state, view, self.context.num_batches_per_epoch)
        # A failure is reported like every background write: logged at once, and noted with the file and the period
        # of the evaluated weights (not the one at which their result landed).
        self.files.write_best(checkpoint, self._period_name({"current": view}))

    def on_epoch_completed(self, logs: dict) -> bool:
        if not self.monitors_async_results and not self.batch_level:
            self._decide_best(logs, logs["current"]["epoch"] + 1)
        return True

    def on_epoch_checkpoint(self, logs: dict) -> bool:
        self._raise_failed_write()  # (see on_batch_checkpoint)
        if not self.batch_level:
            self._on_period(logs, logs["current"]["epoch"] + 1)
        return True

    def on_training_checkpoint(self, stopped_early: bool, stopped_on_error: bool, interrupted: bool) -> bool:
        manager = self.context
        # A failed background write must not stop the checkpoint written now: note it, write, then report it.
        # (Results that land at the end reached on_evaluation_result in the producer's part of this hook.)
        files = self.files
        sharded = files.sharded is not None
        if sharded and stopped_on_error:  # another rank may have failed: no collective may be waited for now
            write_error = files.wait_for_background_write()
            self._log.error(
                "Training failed: with a sharded state no emergency training checkpoint is written (every rank would "
                f"have to take part); {files.last_good_training_checkpoint()}"
            )
        elif sharded:  # every rank: agree on failed writes and finite weights, then on whether to write
            write_error = None
            if self._agree_on_writes():
                self._final_sharded_checkpoint(interrupted)
        else:
            write_error = files.wait_for_background_write()
        if self._is_primary() and not sharded:
            if self._improved:  # decided in a hook of this period, whose checkpoint phase never came (an error)
                self._improved = False
                best_checkpoint = files.model_checkpoint(
                    {"model_components": self._snapshot_model_components()},
                    manager.logs["current"],
                    manager.num_batches_per_epoch,
                )
                files.write_best(best_checkpoint, self._period_name(manager.logs), background=False)
            state = manager.get_state()
            training_error = manager.training_error
            if isinstance(training_error, (NonFiniteLossError, NonFiniteWeightsError)):
                what = "a non-finite loss" if isinstance(training_error, NonFiniteLossError) else "non-finite weights"
                self._log.error(
                    f"Training stopped on {what}: no emergency training checkpoint is written from this state; "
                    f"{files.last_good_training_checkpoint()}"
                )
            elif stopped_on_error:
                self._log.error(
                    f"Training failed; writing emergency training checkpoint {self.file_names.emergency_training}"
                )
                try:
                    files.save_training_checkpoint(self.file_names.emergency_training, state)
                except Exception as error:  # one line: the error that ended training is the one to read
                    self._log.error(
                        f"The emergency training checkpoint could not be written either: {type(error).__name__}: "
                        f"{error}"
                    )
            elif files.last_saved_position != position_of(state):
                if interrupted:
                    self._log.warning(f"Interrupted; writing training checkpoint {self.file_names.training}")
                files.save_training_checkpoint(self.file_names.training, state)
        if write_error is not None and not stopped_on_error:  # after an error it was logged; that error is raised
            raise write_error
        return True

    def _final_sharded_checkpoint(self, interrupted: bool) -> None:
        """The best model checkpoint decided in a period whose checkpoint phase never came, and the training
        checkpoint when the last one is older than the last batch; every rank, sharded state."""
        manager, files = self.context, self.files
        if self._improved:
            self._improved = False
            components = self._snapshot_model_components()  # a collective: every rank
            if self._is_primary():
                checkpoint = files.model_checkpoint(
                    {"model_components": components}, manager.logs["current"], manager.num_batches_per_epoch
                )
                files.write_best(checkpoint, self._period_name(manager.logs), background=False)
        state = manager.get_state()
        if manager.distributed.any_rank(files.last_saved_position != position_of(state)):
            if interrupted:
                self._log.warning(f"Interrupted; writing training checkpoint {self.file_names.training}")
            files.save_training_checkpoint(self.file_names.training, state)

    def _period_name(self, logs: dict) -> str:
        """The period whose checkpoint phase runs now, for messages."""
        current = logs["current"]
        if self.batch_level:
            where = f"epoch {current['epoch']}, batch step {current['batch_step']}"
        else:
            where = f"the end of epoch {current['epoch']}"
        return f"{where} (global iteration {current['global_iter']})"

    # ----- periods -----
    def _decide_best(self, logs: dict, period_count: int) -> None:
        self._improved = (
            self.metric_to_monitor is not None
            and period_count % self.metric_monitor_period == 0
            and self.best_model.consider(self.best_model.value_in(logs["current"]), logs["current"], logs, self.context)
        )

    def _on_period(self, logs: dict, period_count: int) -> None:
        improved, self._improved = self._improved, False
        save_latest = period_count % self.create_checkpoint_every == 0
        if not (improved or save_latest):
            return
        # The values and weights are read now anyway: never save from a non-finite state. On every rank, so that
        # every rank stops at the same period. The weights are checked even when the loop checked them at this step:
        # a hook since (EMA / SWA style) may have set others (one more device wait at most, where the write waits).
        self.context.check_finite(recheck_weights=True)
        files, context = self.files, self.context
        if files.sharded is not None:  # every rank writes (collectives): the ranks agree first
            if not self._agree_on_writes():
                return
        elif not self._is_primary():
            return
        # One snapshot per period, taken after the previous write finished (a saver may reuse its buffers);
        # then one background job writes every file of this period. Sharded state: on every rank (collectives).
        files.writer.wait()
        archive_path = None
        if (
            save_latest
            and self.archive_last_model_checkpoint_every is not None
            and period_count % self.archive_last_model_checkpoint_every == 0
        ):
            archive_path = files.register_archive(period_count)
        shards = None
        training_state: Optional[dict] = None
        if save_latest:
            training_state, model_components, shards = files.snapshot_training_state(
                context.get_state(), files.write_in_background
            )
        else:
            model_components = self._snapshot_model_components()
        current, num_batches = logs["current"], context.num_batches_per_epoch
        best_checkpoint = None
        if improved:
            best_checkpoint = files.model_checkpoint({"model_components": model_components}, current, num_batches)
        files.write_period(
            best_checkpoint, training_state, current, num_batches, archive_path, self._period_name(logs),
            model_components, shards,
        )  # fmt: skip

    def _snapshot_model_components(self) -> dict:
        """A snapshot of only the model components (what a best model checkpoint holds), in the buffers that a
        full training-state snapshot uses for them (the same paths); sharded state: gathered (every rank)."""
        return self.files.gather_model_components(self.context.trainer.get_state()["model_components"])

    def wait_for_writes(self) -> None:
        """Block until background writes are done (raising their error, if any)."""
        self.files.writer.wait()

    # ----- state -----
    def get_state(self) -> dict:
        """The best iteration's logs (``logs["best"]``, the one record of "best") and the archive list."""
        return {
            "best_logs": self.best_logs,
            "archived": list(self.archived),
            "metric_to_monitor": self.metric_to_monitor,
            "metric_opt_mode": self.metric_opt_mode,
        }

    def set_state(self, state: dict) -> None:
        """Restore the best value and the archive list; archives listed but missing are dropped with a warning.

        Raises:
            ValueError: The saved state monitored another metric or mode than this manager.
        """
        for key in ("metric_to_monitor", "metric_opt_mode"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"{self.name}: the checkpoint's {key} is {state[key]!r}, this CheckpointManager's is "
                    f"{getattr(self, key)!r}; the best value would be compared with another metric"
                )
        self.best_logs = dict(state.get("best_logs") or {})
        if self.training_manager is not None:
            self.training_manager.logs["best"] = self.best_logs
        missing = self.files.restore_archived(list(state.get("archived", [])))
        if missing:
            self._log.warning(
                f"{self.name}: the training checkpoint lists archived model checkpoints that do not exist in "
                f"{self.file_names.directory}: {missing}; they are forgotten"
            )

    def on_training_ended(self, stopped_early, stopped_on_error, interrupted, callback_calls_success) -> bool:
        """Removes this run's own temporary files (left by a write that failed); every write has finished. Warns
        once more when the monitored metric was not finite (``non_finite_metric="warn"``)."""
        if self._is_primary():
            self.files.remove_own_temporary_files()
        if self.files.sharded is not None and not stopped_on_error:
            self.files.sharded.close()
        self.best_model.warn_at_end()
        return True

    # ----- resuming (TrainingStateLoader, delegated to the loader) -----
    def resolve_training_checkpoint(self, resume_from: Union[str, os.PathLike[str]]) -> Optional[str]:
        """``"latest"``: this manager's training checkpoint file, or None (logged) when there is none yet; else
        ``resume_from`` as a path (see :class:`~mlpug.callbacks.checkpoint_loader.TrainingCheckpointLoader`).

        Raises:
            ValueError: The file does not exist, or ``resume_from`` is a directory.
        """
        return self.loader.resolve_training_checkpoint(resume_from)

    def load_training_checkpoint(self, path: str) -> dict:
        """The training state in ``path``, read with this manager's saver (header checked).

        Raises:
            mlpug.checkpointing.CheckpointError: Truncated, corrupt, of another backend or kind.
        """
        return self.loader.load_training_checkpoint(path)


def _result_view(current: dict, result: EvaluationResult) -> dict:
    """``logs.current`` as of the weights ``result`` evaluated: their position and the result's section; the
    position at which it landed under ``landed_at``."""
    view = dict(current)
    view["landed_at"] = {key: current[key] for key in ("epoch", "batch_step", "global_iter")}
    view.update(result.evaluated_at)
    view[result.dataset_name] = {"dataset": result.values, "evaluated_at": result.evaluated_at}
    return view
