"""The one training loop: ``TrainingManager``. It never touches tensors; a ``BackendTrainer`` owns the step.

The manager owns epochs, batches, the stop flag, timing, ``logs``, signals and the failure path; it holds a
:class:`~mlpug.trainers.hook_dispatcher.HookDispatcher` that calls the hooks and, with several steps per call, a
:class:`~mlpug.trainers.steps_per_execution.StepsPerExecution` that sizes each call. Its contract with backends is
:class:`mlpug.trainers.trainer.BackendTrainer` (one ``train_on`` call per batch returning a ``StepResult``); with
callbacks it is the hook list of :mod:`mlpug.trainers.callback` and the :class:`~mlpug.trainers.run_context.RunContext`
that every callback receives (what a callback may read and do).

Life cycle (every hook goes to every callback, producers first: see ``dispatch_order``)::

    set_training_manager(context)                                # at manager construction: the RunContext
    [resume_from: the training state is loaded (through the callback that is a TrainingStateLoader) and applied]
    on_training_start(num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter)
    for epoch in range(start_epoch, num_epochs):
        [resumed run at an epoch start: random states restored here]
        logs["resumed_mid_epoch"] = batch_step > 0               # True only in an epoch continued mid-way
        on_epoch_start(logs)                                     # also for an epoch continued mid-way (see below)
        [random states saved; a resumed run mid-epoch sets those the original run had here]
        data_iterator = data_source.epoch_iterator(epoch, start_batch if first epoch else 0, num_batches_per_epoch)
        [resumed run mid-epoch: random states restored here]
        for batch_step in range(start_batch if first epoch else 0, num_batches_per_epoch):
            [stop requested or signal received -> leave both loops]
            batch = next(data_iterator)                          # data errors -> failure path
            on_batch_training_start(batch, logs)
            context.step_result = trainer.train_on(batch, logs["training_settings"])   # -> logs.current.training_params
            on_batch_training_failed(exception, logs)            # only when the step raised -> failure path
            [counters advance: global_iter + 1, batch_step + 1]
            on_batch_training_completed(batch, logs)             # metrics are produced and consumed here
                [several ranks: callbacks with reduces_batch_metrics first (they add to context.batch_reduction,
                 this step's pairs), then, at a read point only, the one collective of every step since the last
                 read point and the stop flag is issued, then the other callbacks]
            on_batch_checkpoint(logs)                            # checkpoint phase: savers write here
        [non-finite losses of the epoch checked (also when consumers read values, and at the end)]
        on_epoch_completed(logs)                                 # only for a completed epoch
            [a TestMetricsLogger evaluates here and publishes its result: on_evaluation_result(result, logs) on
             every callback, before the consumers' own on_epoch_completed; asynchronous results land here too]
        [counters advance: epoch + 1, batch_step 0]
        on_epoch_checkpoint(logs)                                # checkpoint phase of the epoch
    on_training_checkpoint(stopped_early, stopped_on_error, interrupted)                    # ALWAYS
        [pending asynchronous results land first: on_evaluation_result for each, then the savers write]
    on_training_ended(stopped_early, stopped_on_error, interrupted, callback_calls_success)  # ALWAYS

Several steps per call (``trainer.steps_per_execution`` > 1, TensorFlow's ``DefaultTrainer(steps_per_execution=K)``):
the batch loop takes up to K batches at a time (never past the epoch's end, nor past the batch at which a callback
needs the model: ``Callback.batches_until_model_access``, e.g. a batch-level checkpoint), calls
``on_batch_training_start`` for each, trains them with one ``trainer.train_on_batches(batches, ...)`` call, then
runs the rest of the loop body above (counters, ``on_batch_training_completed``, ``on_batch_checkpoint``) for each
batch in order with its own ``StepResult``. A stop request or a signal takes effect at the end of a call; a hook
that fails inside a call leaves the counters after the call (the model has trained all of its batches).

Resuming mid-epoch (``resume_from`` / :meth:`~TrainingManager.set_state` of a checkpoint written inside an epoch, or
``start_training`` again after a stop inside one): ``on_epoch_start`` runs for the continued epoch as for every other
epoch that this run trains in (so that per-epoch set-up such as a progress bar or a timer happens), with
``logs["resumed_mid_epoch"]`` True and ``logs["current"]["batch_step"]`` the first batch still to train; a callback
with a per-epoch accumulator that ``set_state`` restored skips its reset then. ``on_epoch_completed`` runs once
for every epoch, also for one continued mid-way.

The checkpoint phases follow the batch-end / epoch-end hooks of *all* callbacks, so what a checkpoint holds
never depends on where a callback stands in the list; ``get_state()`` there is the position of the next batch.

Several ranks (``docs/distributed.md``): a batch is a *read point* when a callback reads values reduced over the
ranks in its batch hooks (``Callback.batches_until_values_read``), when it ends an epoch, and at least every
``check_stop_every`` batches (:mod:`mlpug.trainers.read_points`); only there is a collective issued, reducing
every step since the last read point. A stop asked for on one rank (a stop request, a signal) takes effect on every
rank after the same batch: the one after the first read point that follows the request, so at most
``check_stop_every + 1`` batches after the batch during which it was asked for (plus the rest of a call with several
steps per call); at an epoch end at once. When training leaves the loop without an error, the steps since the last
read point are reduced before the end phases.

Failure path: an exception in the step, the data iterator or a hook ends the loops, the end phases run with
``stopped_on_error=True`` and the exception is re-raised with a note saying where it happened.
SIGINT / SIGTERM only set a flag; training ends at the next batch boundary with ``interrupted=True``
and the end phases run (a CheckpointManager saves a training checkpoint there); then ``KeyboardInterrupt``
(SIGINT) or ``SystemExit(128 + signal)`` (SIGTERM) is raised, so the process ends with the conventional status.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, Optional

from mlpug import data as data_module
from mlpug import logging as mlpug_logging
from mlpug import logs as logs_module
from mlpug.distributed import BatchReduction, DistributedContext, StepReductions
from mlpug.logs import Deferred, MetricValues
from mlpug.random_state import capture_random_states, get_random_states, plain_states, set_random_states
from mlpug.trainers.arguments import check_callbacks, check_num_batches_per_epoch, check_positive_int
from mlpug.trainers.callback import Callback
from mlpug.trainers.evaluation_result import EvaluationResult
from mlpug.trainers.hook_dispatcher import BatchHooks, HookDispatcher, add_note
from mlpug.trainers.non_finite import (
    DEFAULT_CHECK_WEIGHTS_EVERY,
    NonFiniteLossPolicy,
    NonFiniteLossTracker,
    NonFiniteWeightsCheck,
    NonFiniteWeightsPolicy,
)
from mlpug.trainers.read_points import ReadPoints
from mlpug.trainers.resume import ResumeFrom, check_counters, check_resume_from, load_resume_state
from mlpug.trainers.run_context import RunContext
from mlpug.trainers.signals import install_stop_handlers, restore_handlers
from mlpug.trainers.steps_per_execution import StepsPerExecution
from mlpug.trainers.trainer import BackendTrainer, StepResult

_log = logging.getLogger("mlpug.TrainingManager")

DEFAULT_CHECK_STOP_EVERY = 10
"""With several ranks: batches between two agreements on stopping at most (see ``check_stop_every``)."""


class TrainingManager:
    """Runs the training loop and dispatches the hooks of the callbacks (see the module docstring).

    Args:
        trainer: A backend ``DefaultTrainer`` (or any :class:`BackendTrainer`).
        training_dataset: Iterable of batches; it is iterated anew (a new ``iter()``) every epoch, unless the trainer
            chooses another :class:`~mlpug.data.DataSource` for it (TensorFlow: an infinite ``tf.data`` dataset is
            iterated once for the whole run). It must not be empty (``len() == 0`` is refused at construction).
        num_epochs: Number of epochs to train (>= 1).
        num_batches_per_epoch: Batches per epoch. Default ``len(training_dataset)``; required for iterables
            without a known length (generators; ``tf.data`` datasets after ``filter()``, ``repeat()`` or
            ``from_generator()``, whose ``len()`` raises ``TypeError``): the next this many batches of the epoch's
            iterator form the epoch; an iterable that yields fewer batches raises ``RuntimeError`` when it runs out.
        callbacks: A list (or tuple) of Callback instances. Every hook goes to the producers of logs first (metric
            loggers, the best-model decision), then to the others, each group in list order (see
            :func:`mlpug.trainers.callback.dispatch_order`).
        training_settings: Passed to the training model as ``evaluate_settings`` in each training step.
        evaluate_settings: Passed to the model when callbacks evaluate it.
        distributed: Distributed context; default the trainer's (``trainer.distributed_context()``: the
            single-process :class:`SerialContext`, or in data-parallel training the backend's). With several
            ranks, values are reduced over the ranks at read points only (see the module docstring), where also
            whether to stop (a stop request or a signal on any rank) is agreed, so that all ranks leave the loop
            after the same batch; side effects (console, checkpoint files) are the primary rank's.
        handle_signals: Install SIGINT/SIGTERM handlers during training (main thread only).
        name: Name used in log messages.
        resume_from: The one way to continue a run: a training checkpoint path, ``"latest"`` (the newest training
            checkpoint of the ``CheckpointManager`` in ``callbacks``) or a loaded checkpoint
            (``mlp.load_training_checkpoint(path)``). It is checked at construction, loaded (paths through the
            callback that is a :class:`~mlpug.trainers.resume.TrainingStateLoader`) and applied
            (:meth:`set_state`) when :meth:`start_training` begins, before any hook runs. A path must exist;
            ``"latest"`` without a training checkpoint yet starts fresh (one info line), so the same command serves
            the first start and every restart (e.g. of a preemptible machine).
        resume_strict: True (default): the callbacks must be those of the checkpoint (by name), else
            :meth:`set_state` raises. False: callbacks added since the checkpoint start fresh and the saved state
            of callbacks no longer present is ignored, with one warning listing both. Counters, trainer state and
            data order must match either way.

        non_finite_loss: What a NaN or infinite training loss does: ``"raise"`` (default: training ends with a
            :class:`~mlpug.trainers.non_finite.NonFiniteLossError` naming the first such iteration),
            ``"skip_step"`` (its optimizer step is skipped) or ``"warn"``. Checked without a device wait per step
            (see :mod:`mlpug.trainers.non_finite`); no checkpoint ever holds non-finite weights.
        non_finite_weights: What NaN or infinite trainable weights do (the loss may stay finite): ``"raise"``
            (default: training ends with a :class:`~mlpug.trainers.non_finite.NonFiniteWeightsError` naming the first
            check that found them and the weights) or ``"warn"`` (one warning; the end of training says so). Checked
            with one device wait per check before every checkpoint write, at every epoch end, at the end of training
            and after ``check_weights_every`` steps without a check, never per step.
        check_weights_every: Also check the weights when this many training steps passed since their last check
            (an int >= 1, default 1000), or None (only at checkpoint writes, epoch ends and the end).
        check_stop_every: With several ranks: a read point (one collective, which also agrees on stopping) at
            least every this many batches (an int >= 1, default 10), also where no callback reads values, so that a
            stop asked for on one rank (SIGTERM, ``stop_training()``) takes effect on every rank at most
            ``check_stop_every + 1`` batches later. Lower it when batches are slow and a preemption's grace period
            short; each check costs one small collective. Unused in one process.

    Attributes:
        training_error: The exception that ended training (None while it runs or when it ended without one).
        step_result: The :class:`~mlpug.trainers.trainer.StepResult` of the batch being completed (raw model
            outputs: loss, auxiliary results; read them in ``on_batch_training_completed``); never in ``logs``.
        batch_reduction: With several ranks, the :class:`~mlpug.distributed.BatchReduction` of the batch being
            completed (its pairs to reduce over the ranks at the next read point; callbacks with
            ``reduces_batch_metrics`` add to it); else None.
        context: The :class:`~mlpug.trainers.run_context.RunContext` given to every callback.
        result_datasets: The dataset names whose results are published as ``on_evaluation_result`` events (the
            union of the callbacks' ``publishes_results``); ``asynchronous_result_datasets`` those published late.

    Raises:
        TypeError / ValueError: At construction, for a bad trainer, dataset, epoch/batch count, callback or callback
            list (e.g. a single callback instead of a list), a ``resume_from`` that names no existing file or
            needs a ``CheckpointManager`` that is not there, or a callback's check in ``set_training_manager``
            (e.g. a ``metric_to_monitor`` that no callback writes).
    """

    def __init__(
        self,
        trainer: BackendTrainer,
        training_dataset: Iterable,
        num_epochs: int = 1,
        num_batches_per_epoch: Optional[int] = None,
        callbacks: Optional[Sequence[Callback]] = None,
        training_settings: Any = None,
        evaluate_settings: Any = None,
        distributed: Optional[DistributedContext] = None,
        handle_signals: bool = True,
        name: str = "TrainingManager",
        resume_from: ResumeFrom = None,
        non_finite_loss: NonFiniteLossPolicy = "raise",
        resume_strict: bool = True,
        non_finite_weights: NonFiniteWeightsPolicy = "raise",
        check_weights_every: Optional[int] = DEFAULT_CHECK_WEIGHTS_EVERY,
        check_stop_every: int = DEFAULT_CHECK_STOP_EVERY,
    ):
        if not isinstance(trainer, BackendTrainer):
            raise TypeError(
                f"trainer must be an mlpug BackendTrainer (e.g. mlp.trainers.DefaultTrainer), got {trainer!r:.200}"
            )
        if not hasattr(training_dataset, "__iter__"):
            raise TypeError(f"training_dataset must be iterable, got {type(training_dataset).__qualname__}")
        if not isinstance(resume_strict, bool):
            raise TypeError(f"resume_strict must be a bool, got {resume_strict!r:.100}")
        check_positive_int(num_epochs, "num_epochs")
        check_positive_int(check_stop_every, "check_stop_every")
        callbacks = check_callbacks(callbacks)
        # data-parallel: the trainer's source iterates this rank's shard, whose length is the epoch's
        self._data_source = trainer.training_data_source(training_dataset)
        training_dataset = self._data_source.dataset
        num_batches_per_epoch = check_num_batches_per_epoch(training_dataset, num_batches_per_epoch)

        self.trainer = trainer
        self.training_dataset = training_dataset
        self.num_epochs = num_epochs
        self.num_batches_per_epoch = num_batches_per_epoch
        self.callbacks = callbacks
        self.distributed = distributed or trainer.distributed_context()
        if self.distributed.world_size > 1:  # info lines on the primary only, warnings with the rank
            mlpug_logging.set_rank(self.distributed.rank, self.distributed.world_size)
        self.handle_signals = handle_signals
        self.name = name
        self.resume_strict = resume_strict

        self.epoch = 0  # next epoch to train
        self.batch_step = 0  # next batch step in that epoch
        self.global_iter = 0  # number of batches trained so far
        self.logs = logs_module.new_logs(
            num_epochs - 1, num_batches_per_epoch - 1, training_settings, evaluate_settings
        )

        self._stop_requested = False
        self.batch_reduction: Optional[BatchReduction] = None  # several ranks: this step's pairs to reduce
        self._step_reductions = StepReductions(self.distributed)  # several ranks: the read points' collectives
        self._read_points = ReadPoints(callbacks, check_stop_every)
        self._received_signal: Optional[int] = None
        self.step_result: Optional[StepResult] = None
        self.training_error: Optional[BaseException] = None
        self.non_finite = NonFiniteLossTracker(non_finite_loss, trainer.non_finite_indices)
        trainer.skip_non_finite_steps = non_finite_loss == "skip_step"
        self.weights_check = NonFiniteWeightsCheck(non_finite_weights, trainer.non_finite_weights, check_weights_every)
        self._next_weights_check = self.weights_check.next_check(0)  # steps after which the periodic check is due
        self._random_state_providers = trainer.random_state_providers()
        self._pending_random_state: Optional[dict] = None  # restored where it was captured (see _train)
        self._random_before_data: Any = None  # the states this epoch's data iterator was created with (Deferred)
        self._hooks = HookDispatcher(callbacks, self.logs)
        steps = trainer.steps_per_execution
        self._steps_per_execution = StepsPerExecution(steps, callbacks) if steps > 1 else None
        self.result_datasets = frozenset().union(*(c.publishes_results for c in callbacks))
        self.asynchronous_result_datasets = frozenset().union(*(c.asynchronous_results for c in callbacks))
        check_resume_from(resume_from, callbacks)
        self._resume_from = resume_from
        self.context = RunContext(self)
        for callback in self._hooks.ordered_callbacks:
            callback.set_training_manager(self.context)

    # ----- public API -----
    def stop_training(self) -> None:
        """Ask training to stop: the current batch finishes, then the normal end hooks run."""
        self._stop_requested = True

    def check_finite(self, weights: bool = False) -> None:
        """Check the training losses of the steps since the last check, with one device wait for all of them; with
        ``weights`` then the trainable weights as well (one more device wait; none when they were checked at this
        step already).

        Consumers call this where they read values anyway (``LogProgress`` at its log period, the
        ``CheckpointManager`` before it writes, with ``weights``); the manager calls it with ``weights`` at every
        epoch end, at the end of training and after ``check_weights_every`` steps without a check.

        Raises:
            NonFiniteLossError: A loss was NaN or infinite and the policy is ``"raise"``.
            NonFiniteWeightsError: ``weights`` and a trainable weight is NaN or infinite, with the policy ``"raise"``.
        """
        self.non_finite.check()
        if weights:
            self.weights_check.check(self.global_iter, *self._last_step_position())
            self._next_weights_check = self.weights_check.next_check(self.global_iter)

    def dispatch_result(self, result: EvaluationResult) -> None:
        """``on_evaluation_result(result, logs)`` on every callback that implements it, in dispatch order (what
        :meth:`RunContext.publish_result <mlpug.trainers.run_context.RunContext.publish_result>` does).

        Raises:
            ValueError: No callback declares ``result.dataset_name`` in ``publishes_results``.
        """
        if result.dataset_name not in self.result_datasets:
            raise ValueError(
                f"an EvaluationResult of {result.dataset_name!r} was published, but no callback declares it in "
                f"publishes_results (declared: {sorted(self.result_datasets)}); the producer must declare the "
                "datasets it publishes, so that consumers know where their metric comes from"
            )
        self._hooks.dispatch("on_evaluation_result", result, self.logs)

    def _last_step_position(self) -> tuple:
        """``(epoch, batch_step)`` of the last step trained (the counters point at the next one)."""
        if self.batch_step > 0:
            return self.epoch, self.batch_step - 1
        return self.epoch - 1, self.num_batches_per_epoch - 1

    def _check_finite_in_loop(self) -> None:
        """:meth:`check_finite` with the weights, called by the loop itself (not by a hook): a failure note then
        names the check."""
        try:
            self.check_finite(weights=True)
        except BaseException:
            self._hooks.failed_hook = "check_finite"
            raise

    def get_state(self) -> dict:
        """Everything needed to continue training: the content of a training checkpoint.

        Returns:
            Plain containers and the backend's arrays (live references, not copies): ``epoch`` and
            ``batch_step`` (the next batch to train: in the checkpoint phases, the batch after the one just
            completed; after an epoch, batch 0 of the next one), ``global_iter``, ``num_epochs``,
            ``num_batches_per_epoch``, ``callbacks`` (state per callback name), ``trainer``
            (``trainer.get_state()``: model components, optimizers and whatever else the trainer holds), ``data``
            (the order of a resumable training dataset, see :mod:`mlpug.data`), ``random`` (the states of the
            trainer's random-state providers, see :mod:`mlpug.random_state`) and ``random_before_data`` (their
            states when this epoch's data iterator was created, so a mid-epoch resume re-creates it alike).
        """
        return {
            "epoch": self.epoch,
            "batch_step": self.batch_step,
            "global_iter": self.global_iter,
            "num_epochs": self.num_epochs,
            "num_batches_per_epoch": self.num_batches_per_epoch,
            "callbacks": {callback.name: callback.get_state() for callback in self.callbacks},
            "trainer": self.trainer.get_state(),
            "data": data_module.get_data_state(self.training_dataset),
            "random": get_random_states(self._random_state_providers),
            "random_before_data": logs_module.resolve(self._random_before_data),
        }

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned, so that :meth:`start_training` continues exactly there.

        Counters, callback states and the trainer state are set at once; the random generator
        states are set when training resumes, at the point of the loop where they were captured. The parts
        ``trainer``, ``data`` and ``random`` are optional (older or partial states). With ``resume_strict=False``
        callbacks without a saved state keep theirs (start fresh) and saved states of absent callbacks are ignored
        (one warning lists both).

        Raises:
            ValueError: Naming the checkpoint file when known: callback names differ (with ``resume_strict``), the
                number of batches per epoch or the data order differs, the counters do not fit together or this run
                (see :func:`~mlpug.trainers.resume.check_counters`: e.g. an epoch past ``num_epochs``), or the trainer
                state does not fit the model components / optimizers (e.g. another layer shape).
        """
        source = (state.get("mlpug") or {}).get("path", "the training state")
        saved, present = set(state.get("callbacks", {})), {c.name for c in self.callbacks}
        if saved != present and self.resume_strict:
            raise ValueError(
                f"{source} does not match the callbacks: {sorted(saved ^ present)} present on only one side "
                f"(state has {sorted(saved)}, manager has {[c.name for c in self.callbacks]}); with "
                "resume_strict=False added callbacks start fresh and the state of dropped ones is ignored"
            )
        if state.get("num_batches_per_epoch", self.num_batches_per_epoch) != self.num_batches_per_epoch:
            raise ValueError(
                f"{source} was saved with num_batches_per_epoch={state['num_batches_per_epoch']}, this manager has "
                f"{self.num_batches_per_epoch}; the saved batch position would mean another place in the data"
            )
        check_counters(state, self.num_epochs, self.num_batches_per_epoch, str(source))
        data_module.check_data_state(self.training_dataset, state.get("data") or {}, str(source))
        if "trainer" in state:
            try:
                self.trainer.set_state(state["trainer"])
            except Exception as error:
                raise ValueError(
                    f"{source}: the saved trainer state does not fit this trainer's model components / "
                    f"optimizers: {type(error).__name__}: {error}"
                ) from error
        if saved != present:
            _log.warning(
                f"Resuming from {source} with resume_strict=False: callbacks that start fresh (not in the "
                f"checkpoint): {sorted(present - saved)}; saved callback states ignored (no such callback): "
                f"{sorted(saved - present)}"
            )
        self.epoch, self.batch_step, self.global_iter = state["epoch"], state["batch_step"], state["global_iter"]
        for callback in self.callbacks:
            if callback.name in saved:
                callback.set_state(state["callbacks"][callback.name])
        self._pending_random_state = state.get("random")
        self._random_before_data = state.get("random_before_data")

    def start_training(self) -> None:
        """Train from the current counters to ``num_epochs`` (see the module docstring for the life cycle).

        Raises:
            RuntimeError: The trainer is not ready (e.g. no training model set).
            Exception: Whatever the step, the data or a hook raised, after the failure path ran.
            KeyboardInterrupt / SystemExit: After a clean end caused by SIGINT / SIGTERM.
        """
        self.trainer.ensure_ready()
        resume_from, self._resume_from = self._resume_from, None
        resume_state = load_resume_state(resume_from, self.callbacks)
        if resume_state is not None:
            _log.info(f"Resuming training from {(resume_state.get('mlpug') or {}).get('path', 'the given state')}")
            self.set_state(resume_state)
        self.training_error = None
        self._stop_requested, self._received_signal, self._hooks.failed_hook = False, None, None
        self.batch_reduction, self._step_reductions = None, StepReductions(self.distributed)
        self._read_points.forget()  # set_state may have moved the counters
        stopped_on_error = False
        previous_handlers = (
            install_stop_handlers(lambda: self._received_signal, partial(setattr, self, "_received_signal"))
            if self.handle_signals
            else {}
        )
        self.weights_check.forget()  # set_state may have set other weights at the same step count
        self._next_weights_check = self.weights_check.next_check(self.global_iter)
        try:
            self._train()
            if self._step_reductions.has_pending:  # left the loop alike on every rank: reduce the last steps
                self._step_reductions.issue(self._stop_requested or self._received_signal is not None, self.global_iter)
            self._check_finite_in_loop()  # no run ends normally with non-finite weights (policy "raise")
        except BaseException as error:
            stopped_on_error = True
            self.training_error = error
            self._step_reductions.abandon()  # no collective on the failure path: unreduced values read as this rank's
            add_note(error, f"mlpug: training failed {self._failure_position()}")
            raise
        finally:
            try:
                self._end_training(stopped_on_error)
            finally:
                restore_handlers(previous_handlers)
        if self._received_signal is not None:
            if self._received_signal == signal.SIGINT:
                raise KeyboardInterrupt("training interrupted by SIGINT; ended cleanly at a batch boundary")
            raise SystemExit(128 + int(self._received_signal))

    # ----- the loop -----
    def _train(self) -> None:
        logs = self.logs
        if self._steps_per_execution is not None:
            self._steps_per_execution.warn_if_limited(self.global_iter)
        self._hooks.dispatch(
            "on_training_start",
            self.num_epochs,
            self.num_batches_per_epoch,
            self.epoch,
            self.batch_step,
            self.global_iter,
        )
        for epoch in range(self.epoch, self.num_epochs):
            self.epoch = logs["epoch"] = epoch
            epoch_start_time = time.perf_counter()
            logs["current"] = logs_module.new_current(epoch, self.batch_step, self.global_iter)
            # A resumed run restores the random states where they were captured: at an epoch start (captured in
            # the epoch checkpoint phase) before on_epoch_start and the data iterator (either may draw random
            # numbers), mid-epoch (captured in a batch checkpoint phase) after both.
            if self._pending_random_state is not None and self.batch_step == 0:
                self._restore_random_state()
            # An epoch that training continues mid-way (a resume, or start_training after a stop) gets its
            # on_epoch_start too, told so: a callback keeps the per-epoch state that set_state restored.
            logs["resumed_mid_epoch"] = self.batch_step > 0
            self._hooks.dispatch("on_epoch_start", logs)
            # The states with which this epoch's data iterator is created (a shuffled DataLoader draws its order
            # then): saved in checkpoints, so that a mid-epoch resume creates the same iterator, then skips.
            resuming_mid_epoch = self._pending_random_state is not None
            providers = self._random_state_providers
            if resuming_mid_epoch and self._random_before_data is not None:
                set_random_states(providers, self._random_before_data)
            else:  # taken in the fast form; converted to plain states only when a checkpoint asks for them
                captured = capture_random_states(providers)
                self._random_before_data = Deferred(partial(plain_states, providers, captured))
            data = self._data_source.epoch_iterator(epoch, self.batch_step, self.num_batches_per_epoch)
            if resuming_mid_epoch:
                self._restore_random_state()
            try:
                epoch_completed = self._train_epoch(data, logs)
            except BaseException:
                data_module.close_iterator(
                    data
                )  # e.g. a prefetching iterator's thread; the error keeps this frame (and data) alive
                raise
            if not epoch_completed:
                data_module.close_iterator(data)
                return
            params = logs["current"]["training_params"]["epoch"]
            params["duration"] = time.perf_counter() - epoch_start_time
            params["lr"] = logs_module.deferred_number(self.step_result.learning_rate if self.step_result else None)
            self._check_finite_in_loop()
            # a failing epoch-end hook leaves the epoch unfinished: an emergency checkpoint resumes at its end
            self._hooks.dispatch("on_epoch_completed", logs)
            self.epoch, self.batch_step = epoch + 1, 0
            self._hooks.dispatch("on_epoch_checkpoint", logs)
            if self._should_stop(epoch_end=True):
                return
        self.epoch = self.num_epochs

    def _train_epoch(self, data: Any, logs: dict) -> bool:
        """Train the batches of one epoch; return False when stopped before its end.

        Each trainer call trains one batch (``train_on``), or with ``steps_per_execution`` > 1 up to that many
        (``train_on_batches``, sized by :class:`~mlpug.trainers.steps_per_execution.StepsPerExecution`); the batch
        hooks then run for every batch of the call, in order (``on_batch_training_start`` for all of them before the
        call). A stop request or a signal takes effect at the end of a call. Each batch's logged duration is the
        call's duration divided by its batches.
        """
        trainer, training_settings, dispatcher = self.trainer, logs["training_settings"], self._hooks
        hooks = dispatcher.batch_hooks()
        start_hooks = hooks.start
        calls, num_batches = self._steps_per_execution, self.num_batches_per_epoch
        epoch, new_current = self.epoch, logs_module.new_current
        batch_step = self.batch_step
        while batch_step < num_batches:
            if self._should_stop():
                return False
            self.batch_step, global_iter = batch_step, self.global_iter
            size = 1 if calls is None else calls.batches_in_call(batch_step, num_batches, global_iter)
            batches = [self._next_batch(data, batch_step + index) for index in range(size)]  # data errors first
            currents = []
            for index, batch in enumerate(batches):
                logs["current"] = current = new_current(epoch, batch_step + index, global_iter + index)
                currents.append(current)
                if start_hooks:
                    dispatcher.call(start_hooks, "on_batch_training_start", batch, logs)
            start_time = time.perf_counter()
            try:
                results = (
                    [trainer.train_on(batches[0], training_settings)]
                    if calls is None
                    else trainer.train_on_batches(batches, training_settings)
                )
            except Exception as error:
                dispatcher.dispatch_failure(error, logs)
                raise
            duration = (time.perf_counter() - start_time) / size
            end_step, end_iter = batch_step + size, global_iter + size
            try:
                for batch, result, current in zip(batches, results, currents):
                    logs["current"] = current
                    self._complete_batch(batch, result, current, duration, hooks)
            except BaseException:
                # the model has trained every batch of the call: a checkpoint of the failure resumes after them
                self.batch_step, self.global_iter = end_step, end_iter
                raise
            batch_step = end_step
            if self.global_iter >= self._next_weights_check:  # after the call: the weights of its last step
                self._check_finite_in_loop()
        return True

    def _next_batch(self, data: Any, batch_step: int) -> Any:
        try:
            return next(data)
        except StopIteration:
            raise RuntimeError(
                f"training_dataset ran out after {batch_step} batches in epoch {self.epoch}, but "
                f"num_batches_per_epoch is {self.num_batches_per_epoch}"
            ) from None

    def _complete_batch(
        self, batch: Any, result: StepResult, current: dict, duration: float, hooks: BatchHooks
    ) -> None:
        """After a batch's step: its ``training_params``, the non-finite record, the counters, then its
        batch-end and checkpoint hooks."""
        self.step_result = result
        call = self._hooks.call
        epoch, batch_step, logs = self.epoch, self.batch_step, self.logs
        params = current["training_params"]["batch"]
        params["duration"] = duration
        params["lr"] = logs_module.deferred_number(result.learning_rate)
        params["batch_size"] = logs_module.deferred_number(result.num_samples)
        params["optimizer_step_skipped"] = logs_module.deferred_number(result.optimizer_step_skipped)
        current["training"]["batch"] = MetricValues()
        distributed = self.distributed.world_size > 1
        if not distributed:
            self.non_finite.record(result.loss, self.global_iter, epoch, batch_step)
        else:  # the loss over all ranks: every rank finds a non-finite loss at the same batch
            self.batch_reduction = reduction = self._step_reductions.new_step()
            self.non_finite.record(
                reduction.add([(result.loss, result.num_samples)])[0][0], self.global_iter, epoch, batch_step
            )
        self.global_iter += 1
        self.batch_step = batch_step + 1
        if not distributed:
            if hooks.completed:
                call(hooks.completed, "on_batch_training_completed", batch, logs)
        else:
            read_point = self._read_points.is_read_point(
                self.global_iter - 1, self.batch_step == self.num_batches_per_epoch
            )
            call(hooks.reducing_completed, "on_batch_training_completed", batch, logs)
            if read_point:  # every step since the last read point, in one collective
                self._step_reductions.issue(self._stop_requested or self._received_signal is not None, self.global_iter)
            call(hooks.other_completed, "on_batch_training_completed", batch, logs)
        if hooks.checkpoint:
            call(hooks.checkpoint, "on_batch_checkpoint", logs)

    def _failure_position(self) -> str:
        """Where training failed: the batch (epoch, batch step, global iteration) whose data, step or hook raised,
        or the end of the epoch whose epoch-end hooks raised."""
        hook, logs = self._hooks.failed_hook, self.logs
        if hook == "check_finite":  # the loop's own check of the losses and weights
            if self.global_iter == 0:
                return "at the check of the weights before the first training step"
            epoch, batch_step = self._last_step_position()
            return (
                f"at the check of the losses and weights after global iteration {self.global_iter - 1} (epoch "
                f"{epoch}, batch step {batch_step})"
            )
        if hook in ("on_epoch_completed", "on_epoch_checkpoint"):
            return f"at the end of epoch {logs['epoch']}"
        if hook in ("on_batch_training_completed", "on_batch_checkpoint"):  # the counters point at the next batch
            current = logs["current"]
            epoch, batch_step, global_iter = current["epoch"], current["batch_step"], current["global_iter"]
        else:  # data, on_batch_training_start, the step, or a hook before the first batch: the counters are right
            epoch, batch_step, global_iter = self.epoch, self.batch_step, self.global_iter
        return f"at epoch {epoch}, batch step {batch_step} (global iteration {global_iter})"

    def _restore_random_state(self) -> None:
        state, self._pending_random_state = self._pending_random_state, None
        set_random_states(self._random_state_providers, state or {})

    def _should_stop(self, epoch_end: bool = False) -> bool:
        """Whether to leave the loop now; with several ranks, decided alike on every rank (see
        :class:`~mlpug.distributed.StepReductions`: at a batch boundary from the stop flags of the read points
        before the last step, at an epoch end at once)."""
        stop = self._stop_requested or self._received_signal is not None
        if self.distributed.world_size == 1:
            return stop
        agreed = self._step_reductions.any_rank_stops(stop, self.global_iter, epoch_end)
        if agreed and not stop:
            self._stop_requested = True  # another rank asked: stop here too
        return agreed

    def _end_training(self, stopped_on_error: bool) -> None:
        interrupted_by = self._received_signal
        interrupted = interrupted_by is not None
        stopped_early = not stopped_on_error and (self._stop_requested or interrupted)
        errors: list = []
        self._hooks.call_all("on_training_checkpoint", errors, stopped_early, stopped_on_error, interrupted)
        success = self.logs["cb_calls_success"]
        self._hooks.call_all("on_training_ended", errors, stopped_early, stopped_on_error, interrupted, success)
        # non_finite_weights="warn": the final weights (checked at the end) are not finite; never "All good"
        non_finite_weights = [] if stopped_on_error else self.weights_check.names
        if non_finite_weights:
            first = self.weights_check.first_found
            _log.warning(
                f"Training ended with non-finite trainable weights ({len(non_finite_weights)}: "
                f"{', '.join(non_finite_weights[:10])}{' ...' if len(non_finite_weights) > 10 else ''}); "
                f"first found: {first.finding if first is not None else 'at the end'} (non_finite_weights='warn')."
            )
        if stopped_on_error:
            _log.error("Training ended on an error.")
        elif errors:
            _log.error(f"Training ended, but {len(errors)} end hook(s) raised (see above); raising the first.")
        elif interrupted_by is not None:
            _log.warning(f"Training interrupted by signal {signal.Signals(interrupted_by).name}; ended cleanly.")
        elif stopped_early:
            _log.info("Training stopped early.")
        elif non_finite_weights:
            _log.warning("Training completed, but the trainable weights are not finite (see above).")
        elif self.logs["cb_calls_success"]:
            _log.info("Training completed. All good! ❤️")
        else:
            _log.warning("Training completed, but one or more callback calls reported a problem; see the log.")
        if errors and not stopped_on_error:
            raise errors[0]
