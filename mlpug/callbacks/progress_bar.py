"""``ProgressBar``: a tqdm bar per epoch whose description shows the evaluation results (primary rank only)."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional, TextIO

from mlpug.callbacks.improvement import ImprovementRule
from mlpug.callbacks.log_progress import format_duration
from mlpug.logs import get_value_at, to_number
from mlpug.trainers.callback import Callback, check_log_path
from mlpug.trainers.evaluation_result import EvaluationResult
from mlpug.trainers.run_context import RunContext

DEFAULT_METRICS = {"Acc": ("validation.dataset.accuracy", "max"), "Loss": ("validation.dataset.loss", "min")}
_MISSING = object()


class ProgressBar(Callback):
    """One tqdm progress bar per epoch, described as:
    ``(best_epoch) name | Epoch: k/N | Acc: current / (best) | Loss: current / (best)``.

    * Epoch numbers are 1-based. ``current`` is the newest evaluation result, ``best`` the best so far and
      ``best_epoch`` the (1-based) epoch of the best value of the first metric; "better" is decided by the shared
      :class:`~mlpug.callbacks.improvement.ImprovementRule` of each metric's mode (``improvement``,
      label -> rule; ``min_delta`` 0), and a NaN / inf value is not shown. A result of an earlier epoch's
      weights (asynchronous evaluation: it lands later) adds ``| of epoch e``.
    * The postfix shows the sliding-window average of the training loss (``loss_path``), refreshed every
      ``refresh_period`` batches: only then is the value read (a device sync), as in ``LogProgress``.
    * When ``file`` is not a terminal (CI logs, files) there is no bar: one line per epoch is written, with the
      same description, the batch count, the epoch's duration and the loss.

    Args:
        name: The name in the description (e.g. the dataset or the experiment).
        metrics: Label -> ``(dotted path under logs["current"], "min" | "max")``; default accuracy and loss of
            ``"validation"`` (``DEFAULT_METRICS``; the paths no callback writes are left out). Given paths are
            checked when the ``TrainingManager`` is constructed.
        loss_path: The postfix value; None shows none.
        refresh_period: Batches between postfix updates (>= 1).
        file: Where to write; default ``sys.stdout``.
        callback_name: Unique callback name.

    Raises:
        ValueError: A bad ``metrics`` entry or ``refresh_period``, or (at the manager's construction) a path that
            no callback writes.
        ModuleNotFoundError: At construction, ``file`` is a terminal and tqdm is not installed
            (``pip install tqdm``; a dependency of the mlpug package).
    """

    def __init__(
        self,
        name: str = "mlpug",
        metrics: Optional[Mapping[str, tuple]] = None,
        loss_path: Optional[str] = "training.window_average.loss",
        refresh_period: int = 20,
        file: Optional[TextIO] = None,
        callback_name: Optional[str] = None,
    ):
        if isinstance(refresh_period, bool) or not isinstance(refresh_period, int) or refresh_period < 1:
            raise ValueError(f"refresh_period must be an int >= 1 (batches), got {refresh_period!r}")
        for label, entry in (metrics or {}).items():
            if not (isinstance(entry, tuple) and len(entry) == 2 and entry[1] in ("min", "max")):
                raise ValueError(
                    f"metrics[{label!r}] must be (dotted path, 'min' | 'max'), e.g. "
                    f"('validation.dataset.accuracy', 'max'); got {entry!r}"
                )
        output = file if file is not None else sys.stdout
        if output.isatty() and importlib.util.find_spec("tqdm") is None:
            raise ModuleNotFoundError(
                "ProgressBar draws its bar with tqdm, which is not installed: pip install tqdm (a dependency of the "
                "mlpug package), or use LogProgress"
            )
        super().__init__(callback_name)
        self.display_name = name
        self._explicit_metrics = metrics is not None
        self.metrics = dict(metrics if metrics is not None else DEFAULT_METRICS)
        self.improvement = {label: ImprovementRule(mode) for label, (_, mode) in self.metrics.items()}
        self.loss_path = loss_path
        self.refresh_period = refresh_period
        self.file = file
        self.current: dict = {}  # label -> newest value
        self.best: dict = {}  # label -> best value
        self.best_epoch: Optional[int] = None  # 0-based epoch of the best value of the first metric
        self._result_epoch: Optional[int] = None  # 0-based epoch of the weights of the newest result
        self._results_since_epoch_end = False  # results landed after the last epoch end (a last line at the end)
        self._bar: Any = None
        self._epoch_start = 0.0
        self._num_epochs = self._num_batches = 0
        self._done = 0

    def set_training_manager(self, manager: RunContext) -> bool:
        """Keep the run context; check the metric paths (default ones that no callback writes are left out)."""
        for label, (path, _) in list(self.metrics.items()):
            try:
                check_log_path(path, manager.callbacks, f"{self.name}: metrics[{label!r}]")
            except ValueError:
                if self._explicit_metrics:
                    raise
                del self.metrics[label]
                del self.improvement[label]
        return bool(super().set_training_manager(manager))

    def _is_primary(self) -> bool:
        return self.training_manager is None or self.training_manager.distributed.is_primary

    def _output(self) -> TextIO:
        return self.file if self.file is not None else sys.stdout

    def description(self, epoch: int) -> str:
        """The bar's description at (0-based) ``epoch``."""
        best_epoch = "-" if self.best_epoch is None else str(self.best_epoch + 1)
        parts = [f"({best_epoch}) {self.display_name}", f"Epoch: {epoch + 1}/{self._num_epochs}"]
        for label in self.metrics:
            if label in self.current:
                parts.append(f"{label}: {self.current[label]:.4f} / ({self.best[label]:.4f})")
        if self._result_epoch is not None and self.current and self._result_epoch != epoch:
            parts.append(f"of epoch {self._result_epoch + 1}")
        return " | ".join(parts)

    # ----- results -----
    def _take(self, index: int, label: str, epoch: int, value: Any) -> None:
        """Keep ``value`` (of the weights of ``epoch``) as the newest of ``label``, and as its best when better."""
        if value is None or not math.isfinite(float(to_number(value))):
            return
        value = float(to_number(value))
        self.current[label], self._result_epoch = value, epoch
        if self.improvement[label].is_improvement(value, self.best.get(label)):
            self.best[label] = value
            if index == 0:
                self.best_epoch = epoch

    def _is_result_metric(self, path: str) -> bool:
        context = self.training_manager
        return context is not None and context.is_result_metric(path)

    def on_evaluation_result(self, result: EvaluationResult, logs: dict) -> bool:
        """Each result of a shown dataset metric: the newest value and the best."""
        for index, (label, (path, _)) in enumerate(self.metrics.items()):
            if self._is_result_metric(path) and path.split(".", 1)[0] == result.dataset_name:
                self._take(index, label, result.epoch, result.value_of(path))
                self._results_since_epoch_end = True
        return True

    # ----- hooks -----
    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        self._num_epochs, self._num_batches = num_epochs, num_batches_per_epoch
        self._done = start_batch
        return True

    def on_epoch_start(self, logs: dict) -> bool:
        self._epoch_start = time.perf_counter()
        self._done = logs["current"]["batch_step"]
        if not self._is_primary() or not self._output().isatty():
            return True
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self._num_batches,
            initial=self._done,
            desc=self.description(logs["current"]["epoch"]),
            file=self._output(),
            dynamic_ncols=True,
            leave=True,
        )
        return True

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """With a ``loss_path``: the batches up to the next refresh of the postfix (every ``refresh_period`` batches
        of an epoch), on every rank (the primary's bar reads); else None."""
        if self.loss_path is None:
            return None
        num_batches, period = self.context.num_batches_per_epoch, self.refresh_period
        index = global_iter % num_batches  # of the next batch in its epoch; refreshed after batch (k * period - 1)
        refresh = min(-(-(index + 1) // period) * period - 1, num_batches - 1)
        return refresh - index + 1

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> bool:
        self._done += 1
        bar = self._bar
        if bar is None:
            return True
        bar.update(1)
        if self.loss_path is not None and self._done % self.refresh_period == 0:
            loss = self._loss(logs["current"])
            if loss is not None:
                bar.set_postfix_str(f"loss={loss:.4f}", refresh=False)
        return True

    def _loss(self, current: dict) -> Optional[float]:
        value = get_value_at(current, self.loss_path, None) if self.loss_path is not None else None
        return None if value is None else float(to_number(value))

    def on_epoch_completed(self, logs: dict) -> bool:
        current = logs["current"]
        self._results_since_epoch_end = False
        for index, (label, (path, _)) in enumerate(self.metrics.items()):
            if not self._is_result_metric(path):
                self._take(index, label, current["epoch"], get_value_at(current, path, None))
        if not self._is_primary():
            return True
        description = self.description(current["epoch"])
        loss = self._loss(current)
        if self._bar is not None:
            self._bar.set_description_str(description, refresh=False)
            if loss is not None:
                self._bar.set_postfix_str(f"loss={loss:.4f}", refresh=False)
            self._bar.close()
            self._bar = None
        else:
            duration = format_duration(time.perf_counter() - self._epoch_start)
            loss_text = "" if loss is None else f", loss={loss:.4f}"
            self._write(f"{description}: {self._done}/{self._num_batches} batches [{duration}{loss_text}]")
        return True

    def on_training_checkpoint(self, stopped_early: bool, stopped_on_error: bool, interrupted: bool) -> bool:
        """Closes a bar left open (a stop mid-epoch); results that landed at the end get a last line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._results_since_epoch_end and self._is_primary():
            self._write(self.description(self.context.logs["current"]["epoch"]))
        self._results_since_epoch_end = False
        return True

    def _write(self, line: str) -> None:
        output = self._output()
        output.write(line + "\n")
        output.flush()

    # ----- state -----
    def get_state(self) -> dict:
        return {
            "current": dict(self.current),
            "best": dict(self.best),
            "best_epoch": self.best_epoch,
            "result_epoch": self._result_epoch,
        }

    def set_state(self, state: dict) -> None:
        self.current, self.best = dict(state.get("current", {})), dict(state.get("best", {}))
        self.best_epoch, self._result_epoch = state.get("best_epoch"), state.get("result_epoch")
