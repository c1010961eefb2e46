"""Callbacks that put metrics into ``logs``: ``TrainingMetricsLogger`` and ``TestMetricsLogger``.

They are producers (``produces`` names their dataset): every hook reaches them before the callbacks that
read their values, wherever they stand in the list. They declare the paths they write (``log_paths``: dataset
name, level and metric names), so that a consumer's path (e.g. ``metric_to_monitor``) is checked at construction.
A dataset result (``TestMetricsLogger``, synchronous or asynchronous) with a NaN or infinite metric is logged as a
warning naming the metric and the epoch of the evaluated weights, where it lands.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

from mlpug.callbacks.async_evaluation import AsyncEvaluation, Overflow
from mlpug.data import known_length
from mlpug.evaluation import MetricEvaluator
from mlpug.logs import MetricValues, to_number
from mlpug.metrics import metric_functions_check
from mlpug.random_state import isolated_random_states
from mlpug.trainers.callback import Callback
from mlpug.trainers.evaluation_result import EvaluationResult
from mlpug.trainers.run_context import RunContext


def _not_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isfinite(value)


def _check_evaluator(metric_evaluator: Any) -> None:
    if not isinstance(metric_evaluator, MetricEvaluator):
        raise TypeError(f"metric_evaluator must be an mlp.evaluation.MetricEvaluator, got {metric_evaluator!r:.200}")


def _bind_distributed(metric_evaluator: MetricEvaluator, context: RunContext) -> None:
    """Give an evaluator without a distributed context of its own the run's."""
    if not metric_evaluator.has_distributed_context:
        metric_evaluator.distributed = context.distributed


def _check_window_length(window_length: Optional[int]) -> None:
    if window_length is not None and (
        isinstance(window_length, bool) or not isinstance(window_length, int) or window_length < 1
    ):
        raise ValueError(f"window_length must be None or an int >= 1, got {window_length!r}")


class _SlidingWindow:
    """The last ``length`` gathered batches, with O(1) work per batch.

    ``append`` returns deferred sample-weighted means over the window *as it is after that batch*: the
    values are computed when first read, from an immutable view of the window at that moment. Entries are
    kept until ``2 * length`` have accumulated and then the oldest ``length`` are dropped, so a view stays
    readable for at least ``length`` later batches.
    """

    def __init__(self, evaluator: MetricEvaluator, length: Optional[int]):
        self.evaluator = evaluator
        self.length = length
        self.entries: list = []
        self.first_index = 0  # absolute batch index of entries[0]
        self.skip_non_finite = False  # leave non-finite batch values out of the window means

    def append(self, gathered: dict) -> MetricValues:
        entries = self.entries
        entries.append(gathered)
        end = self.first_index + len(entries)
        if self.length is not None and len(entries) >= 2 * self.length:
            del entries[: len(entries) - self.length]
            self.first_index = end - self.length
        return self.evaluator.combined_values(_WindowView(self, end), self.skip_non_finite)

    def get_state(self) -> dict:
        """The last ``length`` batches' metric ``(mean_value, weight)`` pairs as Python floats (one conversion
        per value, at checkpoint time) and the absolute index after the last batch."""
        end = self.first_index + len(self.entries)
        kept = self.entries[-self.length :] if self.length is not None else self.entries
        return {
            "end": end,
            "entries": [
                {name: [to_number(value), to_number(weight)] for name, (value, weight) in g.items()} for g in kept
            ],
        }

    def set_state(self, state: dict) -> None:
        self.entries = [{name: tuple(pair) for name, pair in g.items()} for g in state["entries"]]
        self.first_index = state["end"] - len(self.entries)


class _WindowView(Sequence):
    """The batches of a ``_SlidingWindow`` that ended at absolute index ``end`` (exclusive)."""

    __slots__ = ("window", "end")

    def __init__(self, window: _SlidingWindow, end: int):
        self.window, self.end = window, end

    def _range(self) -> tuple:
        window = self.window
        start = self.end - window.length if window.length is not None else 0
        start = max(start, 0)
        if start < window.first_index:
            raise RuntimeError(
                f"window values of batch {self.end - 1} were read more than {window.length} batches later; "
                "they are no longer kept. Read logs values in the hook that receives them."
            )
        return start - window.first_index, self.end - window.first_index

    def __len__(self) -> int:
        start, end = self._range()
        return end - start

    def __getitem__(self, index):
        start, end = self._range()
        return self.window.entries[start:end][index]

    def __iter__(self):
        start, end = self._range()
        return iter(self.window.entries[start:end])


class TrainingMetricsLogger(Callback):
    """Logs the metrics of every training batch and their sliding-window average.

    Writes ``logs.current.training.batch.<metric>``, ``logs.current.training.window_average.<metric>``
    and ``logs.current.training_params.window_average.duration`` (seconds per batch), computed from the
    manager's ``step_result``. Values are deferred: a tensor becomes a number only when a consumer reads it.

    At every training start it has its metric functions called once on the first batch's outputs, before that
    batch's optimizer step (:func:`mlpug.metrics.metric_functions_check` through the trainer's
    ``add_first_batch_check``), so that a metric that cannot run fails before anything trains.

    Args:
        metric_evaluator: Computes the metrics from the model outputs of the training step.
        window_length: Number of recent batches averaged (sample weighted); default one epoch's batches.
        name: Unique callback name.
    """

    reduces_batch_metrics = True

    def __init__(
        self, metric_evaluator: MetricEvaluator, window_length: Optional[int] = None, name: Optional[str] = None
    ):
        _check_evaluator(metric_evaluator)
        _check_window_length(window_length)
        super().__init__(name)
        self.metric_evaluator = metric_evaluator
        self._window = _SlidingWindow(metric_evaluator, window_length)
        self._durations: collections.deque = collections.deque(maxlen=window_length)
        self._duration_sum = 0.0

    @property
    def produces(self) -> frozenset:
        return frozenset({"training", "training_params"})

    @property
    def log_paths(self) -> frozenset:
        """``training.batch.<metric>``, ``training.window_average.<metric>`` and
        ``training_params.window_average.duration``."""
        metrics = self.metric_evaluator.metric_names
        paths = {f"training.{level}.{metric}" for level in ("batch", "window_average") for metric in metrics}
        return frozenset(paths | {"training_params.window_average.duration"})

    def set_training_manager(self, manager: RunContext) -> None:
        super().set_training_manager(manager)
        _bind_distributed(self.metric_evaluator, manager)

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        # skip_step: the non-finite values of the skipped batches are left out of the window means
        self._window.skip_non_finite = self.context.non_finite_loss_policy == "skip_step"
        check = metric_functions_check(self.metric_evaluator)
        if check is not None:  # every metric function once on the first batch's outputs, before its optimizer step
            self.context.trainer.add_first_batch_check(check)
        if self._window.length is None:
            self._window.length = num_batches_per_epoch
            self._durations = collections.deque(self._durations, maxlen=num_batches_per_epoch)
            self._duration_sum = sum(self._durations)

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """None: it adds the batch metrics to the reduction over the ranks and reads none of them."""
        return None

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> bool:
        current = logs["current"]
        batch_logs = current["training"]["batch"]
        evaluator = self.metric_evaluator
        context = self.context
        gathered = evaluator.reduce(evaluator.gather(training_batch, context.step_result), context.batch_reduction)
        batch_logs.update_deferred(self.metric_evaluator.batch_values(gathered))
        current["training"]["window_average"] = self._window.append(gathered)
        durations, duration = self._durations, current["training_params"]["batch"]["duration"]
        if len(durations) == durations.maxlen:
            self._duration_sum -= durations[0]
        durations.append(duration)
        self._duration_sum += duration
        current["training_params"]["window_average"]["duration"] = self._duration_sum / len(durations)
        return True

    def get_state(self) -> dict:
        """Sliding windows of metrics and batch durations, so window averages continue exactly on resume."""
        return {"window": self._window.get_state(), "durations": list(self._durations)}

    def set_state(self, state: dict) -> None:
        self._window.set_state(state["window"])
        self._durations = collections.deque(state["durations"], maxlen=self._durations.maxlen)
        self._duration_sum = sum(self._durations)


class TestMetricsLogger(Callback):
    """Logs metrics of a dataset that is not trained on (e.g. ``"validation"``).

    * ``batch_level=False``: at every epoch end, evaluates the whole dataset and writes
      ``logs.current.<name>.dataset.<metric>`` (sample-weighted over all its batches).
    * ``batch_level=True``: after every training batch, evaluates the next batch of ``dataset``
      (cycling through it) and writes ``logs.current.<name>.batch.<metric>`` and the sliding-window
      average ``logs.current.<name>.window_average.<metric>``.

    Dataset-level results are tagged with the position of the weights they evaluated,
    ``logs.current.<name>.evaluated_at`` (``epoch``, ``batch_step``, ``global_iter``), and published: every
    callback receives each one as an :class:`~mlpug.trainers.evaluation_result.EvaluationResult` in
    ``on_evaluation_result``, once, in order (``logs`` holds the newest). With
    ``run_async=True`` the epoch's evaluation runs on a worker thread, on a frozen copy of the weights, while
    the next epoch trains, and its result lands at a later epoch end (see
    :mod:`mlpug.callbacks.async_evaluation` for the queue, the overflow policy, checkpoints and ranks).

    Args:
        dataset: Iterable of batches; not empty (``len() == 0`` is refused).
        name: Dataset name, the key in ``logs.current`` (``"training"`` writes the training set's dataset metrics).
        metric_evaluator: Computes the metrics; it needs its ``trainer`` to evaluate the model.
        batch_level: See above.
        window_length: Sliding window for ``batch_level=True``; default one epoch of training batches.
        evaluate_settings: Passed to the model; default the evaluator's.
        callback_name: Unique callback name; default ``f"TestMetricsLogger[{name}]"``.
        run_async: Evaluate the dataset asynchronously (dataset level only).
        max_pending: With ``run_async``: evaluations queued or running at most (>= 1).
        overflow: With ``run_async``: at a trigger with ``max_pending`` evaluations pending, ``"wait"`` for the
            oldest (default) or ``"skip"`` this evaluation (a warning says which epoch).
        num_threads: With ``run_async``: intra-op threads of the evaluation thread (PyTorch); None leaves them.

    Raises:
        TypeError: ``dataset`` is not iterable, ``name`` not a non-empty str, or ``metric_evaluator`` not a
            MetricEvaluator.
        ValueError: ``dataset`` is empty (its ``len()`` is 0), the evaluator has no trainer, a bad
            ``window_length``, ``run_async`` with ``batch_level``, or a bad ``max_pending`` / ``overflow`` /
            ``num_threads``.
        NotImplementedError: ``run_async`` with a trainer that cannot copy its model (at ``on_training_start``).
        RuntimeError: ``run_async`` with a trainer that cannot evaluate on a worker thread (its
            ``check_asynchronous_evaluation()``, when the training manager is made; e.g. several JAX processes).
    """

    __test__ = False  # not a pytest test class
    reduces_batch_metrics = True  # with batch_level

    def __init__(
        self,
        dataset: Iterable,
        name: str,
        metric_evaluator: MetricEvaluator,
        batch_level: bool = False,
        window_length: Optional[int] = None,
        evaluate_settings: Any = None,
        callback_name: Optional[str] = None,
        run_async: bool = False,
        max_pending: int = 1,
        overflow: Overflow = "wait",
        num_threads: Optional[int] = None,
    ):
        if not isinstance(run_async, bool):
            raise TypeError(f"run_async must be a bool, got {run_async!r:.100}")
        if run_async and batch_level:
            raise ValueError(
                "run_async=True evaluates whole datasets in the background; batch_level=True evaluates one batch "
                "after every training batch and cannot: pass batch_level=False"
            )
        if not hasattr(dataset, "__iter__"):
            raise TypeError(f"dataset must be an iterable of batches, got {type(dataset).__qualname__}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str (e.g. 'validation'), got {name!r}")
        if known_length(dataset)[0] == 0:  # of unknown length (tf.data filter()): found empty when evaluated
            raise ValueError(
                f"the {name!r} dataset is empty ({type(dataset).__qualname__} of len() 0): TestMetricsLogger has no "
                f"batch to evaluate; pass a dataset with batches, or leave the {name!r} logger out"
            )
        _check_evaluator(metric_evaluator)
        _check_window_length(window_length)
        if metric_evaluator.trainer is None:
            raise ValueError(
                f"{name}: metric_evaluator has no trainer to evaluate the model with; pass MetricEvaluator(trainer=...)"
            )
        super().__init__(callback_name or f"TestMetricsLogger[{name}]")
        self.dataset = dataset
        self.dataset_name = name
        self.metric_evaluator = metric_evaluator
        self.batch_level = batch_level
        self.evaluate_settings = evaluate_settings
        self._window = _SlidingWindow(metric_evaluator, window_length)
        self._batches: Optional[Iterator] = None
        self._position = 0
        self._random_state_providers: list = []  # the trainer's, set at on_training_start
        self.run_async = run_async
        self._async = AsyncEvaluation(name, max_pending, overflow, num_threads) if run_async else None

    @property
    def produces(self) -> frozenset:
        return frozenset({self.dataset_name})

    @property
    def publishes_results(self) -> frozenset:
        """Dataset level: ``{name}`` (each evaluation is an ``on_evaluation_result`` event); batch level: none."""
        return frozenset() if self.batch_level else frozenset({self.dataset_name})

    @property
    def asynchronous_results(self) -> frozenset:
        """With ``run_async``: ``{name}``."""
        return frozenset({self.dataset_name}) if self._async is not None else frozenset()

    @property
    def log_paths(self) -> frozenset:
        """``<name>.dataset.<metric>``, or with ``batch_level`` ``<name>.batch.<metric>`` and
        ``<name>.window_average.<metric>``."""
        levels = ("batch", "window_average") if self.batch_level else ("dataset",)
        metrics = self.metric_evaluator.metric_names
        paths = {f"{self.dataset_name}.{level}.{metric}" for level in levels for metric in metrics}
        if not self.batch_level:
            paths |= {f"{self.dataset_name}.evaluated_at.{key}" for key in ("epoch", "batch_step", "global_iter")}
        return frozenset(paths)

    def set_training_manager(self, manager: RunContext) -> None:
        super().set_training_manager(manager)
        _bind_distributed(self.metric_evaluator, manager)
        if self._async is not None:  # refused before training when the trainer cannot (e.g. several JAX processes)
            check = getattr(self.metric_evaluator.trainer, "check_asynchronous_evaluation", None)
            if callable(check):
                check()
        # data-parallel: this rank's shard, every sample on exactly one rank (the trainer's choice)
        shard = getattr(self.metric_evaluator.trainer, "evaluation_dataset", None)
        self.dataset = shard(self.dataset) if callable(shard) else self.dataset

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        if self._window.length is None:
            self._window.length = num_batches_per_epoch
        self._random_state_providers = self.metric_evaluator.trainer.random_state_providers()
        if self._async is not None:
            self._async.start(self.metric_evaluator, self.dataset, self.evaluate_settings, self._random_state_providers)

    def _dataset_logs(self, logs: dict) -> dict:
        return logs["current"].setdefault(self.dataset_name, {})

    def batches_until_model_access(self, global_iter: int) -> Optional[int]:
        """Batch level: 1 (a batch of the dataset is evaluated on the model after every training batch); else
        None (the dataset is evaluated at epoch ends)."""
        return 1 if self.batch_level else None

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """None: at batch level it adds the batch metrics to the reduction over the ranks and reads none of them."""
        return None

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> bool:
        if not self.batch_level:
            if self._async is not None:
                self._clear_landed()
                self._async.raise_worker_error()  # a failed evaluation surfaces at the next batch boundary
                self._async.resubmit_restored()  # resumed with pending evaluations: redo them (the model is built)
            return True
        if self._batches is None:
            self._batches = self._cycle()
        self.context.trainer.prepare_evaluation()  # every rank, every batch (FSDP: gathers the weights)
        with isolated_random_states(self._random_state_providers):  # iter(DataLoader) draws random numbers
            gathered = self.metric_evaluator.evaluate_batch(next(self._batches), self.evaluate_settings)
        gathered = self.metric_evaluator.reduce(gathered, self.context.batch_reduction)
        section = self._dataset_logs(logs)
        section["batch"] = self.metric_evaluator.batch_values(gathered)
        section["window_average"] = self._window.append(gathered)
        return True

    def _cycle(self):
        """Iterate the dataset again and again (re-iterating, so nothing is cached), starting at
        ``self._position`` (batches already evaluated in the current pass), which it keeps up to date."""
        while True:
            skip, empty = self._position, True
            for index, batch in enumerate(self.dataset):
                empty = False
                if index < skip:
                    continue  # resuming: batches of this pass evaluated before the checkpoint
                self._position = index + 1
                yield batch
            if empty:
                raise ValueError(f"{self.dataset_name}: the dataset to evaluate yielded no batches")
            self._position = 0

    def get_state(self) -> dict:
        """Batch level: the sliding window and the position in the evaluation dataset; asynchronous: the
        evaluations not landed yet, with their weights (see :mod:`~mlpug.callbacks.async_evaluation`);
        else nothing."""
        if self.batch_level:
            return {"window": self._window.get_state(), "position": self._position}
        return self._async.get_state() if self._async is not None else {}

    def set_state(self, state: dict) -> None:
        if self.batch_level:
            self._window.set_state(state["window"])
            self._position, self._batches = state["position"], None
        elif self._async is not None:
            self._async.set_state(state)

    def on_epoch_start(self, logs: dict) -> bool:
        self._clear_landed()
        return True

    def _clear_landed(self) -> None:
        if self._async is not None:
            self._async.release_landed()

    def _land(self, logs: dict, results: list[EvaluationResult]) -> None:
        """Write landed results into ``logs.current`` (the newest) and publish each, oldest first; warn about
        non-finite ones."""
        self._warn_if_not_finite(results)
        if results:
            section = self._dataset_logs(logs)
            section["dataset"], section["evaluated_at"] = results[-1].values, results[-1].evaluated_at
        for result in results:
            self.context.publish_result(result)

    def _warn_if_not_finite(self, results: list) -> None:
        """One WARNING per result with NaN / inf dataset metrics, naming them and the epoch of the evaluated weights
        (the values are read here, once: the evaluation has waited for the device already)."""
        for result in results:
            values = [(name, to_number(value)) for name, value in result.values.items()]
            bad = [f"{self.dataset_name}.dataset.{name} = {value}" for name, value in values if _not_finite(value)]
            if bad:
                self._log.warning(
                    f"{self.name}: not finite for the weights of epoch {result.epoch} (global iteration "
                    f"{result.global_iter}): {', '.join(bad)}. Check the {self.dataset_name!r} data (NaN or infinite "
                    "inputs or targets) and the model; a non-finite value never counts as the best."
                )

    def on_epoch_completed(self, logs: dict) -> bool:
        if self.batch_level:
            return True
        self._clear_landed()
        current = logs["current"]
        position = (current["epoch"], current["batch_step"], current["global_iter"])
        if self._async is None:
            with isolated_random_states(self._random_state_providers):
                values = self.metric_evaluator.evaluate_dataset(self.dataset, self.evaluate_settings)
            self._land(logs, [EvaluationResult(self.dataset_name, values, *position)])
            return True
        distributed = self.context.distributed
        self._async.resubmit_restored()
        self._land(logs, self._async.land_finished(distributed))
        last = current["epoch"] == logs["final_epoch"]
        _, results = self._async.trigger(position, distributed, last)
        self._land(logs, results)
        if last:  # nothing left to train: the last results land now
            self._land(logs, self._async.land_all(distributed))
        return True

    def on_training_checkpoint(self, stopped_early: bool, stopped_on_error: bool, interrupted: bool) -> bool:
        """Asynchronous: everything pending lands before the training checkpoint (a stop, a SIGTERM); after an
        error nothing is waited for (the emergency checkpoint holds the pending evaluations)."""
        self._clear_landed()  # results of the last epoch end were consumed there
        if self._async is not None and not stopped_on_error:
            self._land(self.context.logs, self._async.land_all(self.context.distributed))
        return True

    def on_training_ended(self, stopped_early, stopped_on_error, interrupted, callback_calls_success) -> bool:
        if self._async is not None:
            self._async.close(wait_for_pending=not stopped_on_error)
        return True
