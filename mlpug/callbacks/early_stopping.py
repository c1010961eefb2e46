"""``EarlyStopping``: stop training when a monitored metric has stopped improving.

Every value of ``metric_to_monitor`` is compared with the best so far: the value of each published evaluation
result of a whole dataset (``<dataset>.dataset.<metric>``, received in ``on_evaluation_result``, also two results
that land together), else the value in ``logs`` at every epoch end. It improves when it is
better by more than ``min_delta`` (lower for ``mode="min"``, higher for ``"max"``). After ``patience`` epochs in
a row without improvement the callback asks the manager to stop (``TrainingManager.stop_training``), so the
epoch-end checkpoint phase, the final training checkpoint and every end hook still run, as for any early stop.
``patience`` is counted in evaluated epochs and ``min_delta`` is absolute, decided by the shared
:class:`~mlpug.callbacks.improvement.ImprovementRule`.
A NaN or infinite value is never an improvement (not even ``inf`` in mode ``"max"``): it counts against the
patience, and each one is logged as a WARNING naming the metric, the epoch and the value.

Its state (best value, epochs without improvement, the epoch it stopped at) is part of training checkpoints, so
a resumed run keeps its patience counter; a run resumed after it stopped ends at once, with a message.
In data-parallel training the monitored dataset metrics are the same on every rank (reduced as sums and counts),
so every rank takes the same decision.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from mlpug.callbacks.improvement import ImprovementRule
from mlpug.logs import get_value_at, to_number
from mlpug.trainers.callback import Callback, check_log_path
from mlpug.trainers.evaluation_result import EvaluationResult
from mlpug.trainers.run_context import RunContext

_MISSING = object()


class EarlyStopping(Callback):
    """Stops training after ``patience`` epochs without an improvement of ``metric_to_monitor``.

    Args:
        metric_to_monitor: Dotted path into ``logs["current"]``, e.g. ``"validation.dataset.loss"``; checked when
            the ``TrainingManager`` is constructed (a callback must write it). An epoch whose logs do not hold
            it (e.g. validation every other epoch) neither improves nor counts against the patience. A NaN or
            infinite value is never an improvement (it counts against the patience) and logs a WARNING.
        mode: ``"min"`` (default) or ``"max"``: whether lower or higher values are better.
        patience: Epochs without improvement (int >= 0) after which training stops; 0 and 1 both stop after the
            first epoch that does not improve.
        min_delta: The smallest change (float >= 0, in the metric's units) that counts as an improvement.
        name: The callback's name (key of its state in training checkpoints).

    Raises:
        ValueError: A bad ``mode``, ``patience`` or ``min_delta``, or an empty ``metric_to_monitor``; at the
            manager's construction, a ``metric_to_monitor`` that no callback writes.
        TypeError: ``metric_to_monitor`` is not a str.

    Attributes:
        improvement: The :class:`ImprovementRule` (``mode``, ``min_delta``) that decides an improvement.
        best: The best value so far (None before the first epoch with a value).
        epochs_without_improvement: Consecutive epochs since the last improvement.
        stopped_epoch: The epoch after which it stopped training, else None.
    """

    def __init__(
        self,
        metric_to_monitor: str = "validation.dataset.loss",
        mode: Literal["min", "max"] = "min",
        patience: int = 0,
        min_delta: float = 0.0,
        name: Optional[str] = None,
    ):
        super().__init__(name)
        if not isinstance(metric_to_monitor, str):
            raise TypeError(
                "metric_to_monitor must be a dotted path str such as 'validation.dataset.loss', got "
                f"{type(metric_to_monitor).__name__}: {metric_to_monitor!r:.100}"
            )
        if not metric_to_monitor:
            raise ValueError("metric_to_monitor must be a dotted path such as 'validation.dataset.loss', got ''")
        self.improvement = ImprovementRule(mode, min_delta)  # ValueError: a bad mode or min_delta
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0 (epochs), got {patience!r}")
        self.metric_to_monitor = metric_to_monitor
        self.patience = patience
        self.best: Optional[float] = None
        self.epochs_without_improvement = 0
        self.stopped_epoch: Optional[int] = None
        self._last_epoch: Optional[int] = None
        self._from_results = False  # the metric comes from on_evaluation_result (set with the run context)

    def set_training_manager(self, manager: RunContext) -> bool:
        """Keep the run context; check that a callback writes ``metric_to_monitor``.

        Raises:
            ValueError: No callback writes ``metric_to_monitor`` (the paths that are written are listed).
        """
        check_log_path(self.metric_to_monitor, manager.callbacks, f"{self.name}: metric_to_monitor")
        self._from_results = manager.is_result_metric(self.metric_to_monitor)
        return bool(super().set_training_manager(manager))

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        if self.stopped_epoch is not None:  # resumed from the checkpoint of a run it stopped
            self._log.info(
                f"{self.name}: this run stopped early after epoch {self.stopped_epoch} ({self.metric_to_monitor} did "
                f"not improve for {self.epochs_without_improvement} epochs); nothing more to train"
            )
            self.context.stop_training()
        return True

    @property
    def mode(self) -> Literal["min", "max"]:
        """``"min"`` or ``"max"``: whether lower or higher values are better (of ``improvement``)."""
        return self.improvement.mode

    @property
    def min_delta(self) -> float:
        """The smallest change that counts as an improvement (of ``improvement``)."""
        return self.improvement.min_delta

    def improves(self, value: float) -> bool:
        """Whether ``value`` is better than the best so far by more than ``min_delta`` (NaN / inf never is)."""
        return self.improvement.is_improvement(value, self.best)

    def on_evaluation_result(self, result: EvaluationResult, logs: dict) -> bool:
        """A result of the monitored dataset: its value counts for the epoch of the weights it evaluated."""
        if self._from_results:
            self._consider(result.value_of(self.metric_to_monitor, _MISSING), result.epoch, logs)
        return True

    def on_epoch_completed(self, logs: dict) -> bool:
        if not self._from_results:
            current = logs["current"]
            self._consider(get_value_at(current, self.metric_to_monitor, _MISSING), current["epoch"], logs)
        return True

    def _consider(self, value: Any, epoch: int, logs: dict) -> None:
        """Count ``value`` (of the weights of ``epoch``) against the best; ask to stop when patience runs out."""
        if value is _MISSING or value is None or epoch == self._last_epoch:  # a repeated epoch end counts once
            return
        self._last_epoch = epoch
        value = float(to_number(value))
        if not math.isfinite(value):
            self._log.warning(
                f"{self.name}: the monitored metric {self.metric_to_monitor!r} is {value} at epoch {epoch}; a "
                f"non-finite value is never an improvement, it counts against the patience "
                f"({self.epochs_without_improvement + 1} epoch(s) without improvement, patience {self.patience})"
            )
        if self.improves(value):
            self.best, self.epochs_without_improvement = value, 0
            return
        self.epochs_without_improvement += 1
        if self.epochs_without_improvement >= max(self.patience, 1):
            self.stopped_epoch = logs["current"]["epoch"]
            verdict = "had no finite value" if self.best is None else f"did not improve on {self.best}"
            self._log.info(
                f"{self.name}: {self.metric_to_monitor} {verdict} ({self.mode}, min_delta "
                f"{self.min_delta}) for {self.epochs_without_improvement} epoch(s) (up to the result of epoch "
                f"{epoch}), patience {self.patience}: training stops after epoch {logs['current']['epoch']}"
            )
            self.context.stop_training()

    def get_state(self) -> dict:
        return {
            "best": self.best,
            "epochs_without_improvement": self.epochs_without_improvement,
            "stopped_epoch": self.stopped_epoch,
            "last_epoch": self._last_epoch,
        }

    def set_state(self, state: dict) -> None:
        self.best = state.get("best")
        self.epochs_without_improvement = int(state.get("epochs_without_improvement", 0))
        self.stopped_epoch = state.get("stopped_epoch")
        self._last_epoch = state.get("last_epoch")
