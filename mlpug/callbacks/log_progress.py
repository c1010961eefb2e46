"""``LogProgress``: prints training progress to the console (primary rank only)."""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable, Sequence
from typing import Optional

from mlpug.trainers.callback import Callback
from mlpug.trainers.evaluation_result import EvaluationResult, without_results

_SECTIONS = (("batch", "Batch"), ("window_average", "Moving average"), ("dataset", "Computed over dataset"))
_RULE = "#" * 79


def format_duration(seconds: Optional[float]) -> str:
    """``H:MM:SS`` for a duration in seconds (``"?"`` when unknown)."""
    if seconds is None:
        return "?"
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class LogProgress(Callback):
    """Prints batch progress every ``log_period`` batches and a summary at the end of every epoch.

    Batch blocks show, per dataset in ``set_names``, the batch values, the sliding-window averages and
    the dataset values that are present in ``logs.current``; the epoch summary shows the epoch's duration,
    the estimated time to the end of training (ETA), the moving averages and dataset values. Only these
    reads convert metric tensors to numbers, so steps between log periods have no device sync.

    Args:
        log_period: Print a batch block after every ``log_period`` training batches (>= 1).
        set_names: Dataset names (keys in ``logs.current``) to show, e.g. ``["training", "validation"]``.
        batch_level: Print batch blocks; ``False`` prints only epoch summaries.
        write: Function that prints a block of text; default writes to ``sys.stdout``.
        name: Unique callback name.

    Only the primary rank prints.
    """

    def __init__(
        self,
        log_period: int = 200,
        set_names: Optional[Sequence[str]] = None,
        batch_level: bool = True,
        write: Optional[Callable[[str], None]] = None,
        name: Optional[str] = None,
    ):
        if isinstance(log_period, bool) or not isinstance(log_period, int) or log_period < 1:
            raise ValueError(f"log_period must be an int >= 1 (batches), got {log_period!r}")
        if set_names is None:
            set_names = ["training"]
        if isinstance(set_names, str) or not all(isinstance(n, str) for n in set_names):
            raise TypeError(
                f"set_names must be a list of dataset names, e.g. ['training', 'validation'], got {set_names!r}"
            )
        super().__init__(name)
        self.log_period = log_period
        self.set_names = list(set_names)
        self.batch_level = batch_level
        self.write = write or _write_stdout
        self._training_start_time = 0.0
        self._epoch_start_time = 0.0
        self._start_iter = 0
        self._total_iters = 0
        self._results: list[EvaluationResult] = []  # published since the last block printed

    def _is_primary(self) -> bool:
        context = self.training_manager
        return context is None or context.distributed.is_primary

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        self._training_start_time = time.perf_counter()
        self._start_iter = start_update_iter
        self._total_iters = num_epochs * num_batches_per_epoch

    def on_epoch_start(self, logs: dict) -> bool:
        self._epoch_start_time = time.perf_counter()
        return True

    def _eta(self, global_iter_done: int) -> Optional[float]:
        done = global_iter_done - self._start_iter
        if done <= 0:
            return None
        per_batch = (time.perf_counter() - self._training_start_time) / done
        return per_batch * (self._total_iters - global_iter_done)

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """The batches up to the next block printed (``log_period``), on every rank; None without batch blocks."""
        return self.log_period - global_iter % self.log_period if self.batch_level else None

    def on_batch_training_completed(self, training_batch, logs: dict) -> bool:
        current = logs["current"]
        done = current["global_iter"] + 1
        if not self.batch_level or done % self.log_period != 0:
            return True
        if self.training_manager is not None:  # values are read now anyway: check the losses since the last check
            self.training_manager.check_finite()
        if not self._is_primary():
            return True
        duration = current["training_params"].get("window_average", {}).get("duration")
        lines = [
            f"Epoch {current['epoch']}/{logs['final_epoch']} - ETA {format_duration(self._eta(done))} - "
            f"Batch {current['batch_step']}/{logs['final_batch_step']}"
            + (f" - {duration * 1000:.1f} ms/batch" if duration is not None else "")
        ]
        for section, title in _SECTIONS:
            rows = self._rows(current, section)
            if rows:
                lines.append(f"{title}:")
                lines.extend(rows)
        self.write("\n".join(lines) + "\n")
        return True

    def on_epoch_completed(self, logs: dict) -> bool:
        results, self._results = self._results, []  # on every rank: they hold evaluation values
        if not self._is_primary():
            return True
        current = logs["current"]
        duration = time.perf_counter() - self._epoch_start_time
        lines = [
            _RULE,
            f"Epoch {current['epoch']}/{logs['final_epoch']}\tREADY - Duration {format_duration(duration)}"
            f" - ETA {format_duration(self._eta(current['global_iter'] + 1))}",
        ]
        context = self.training_manager
        view = without_results(current, context.result_datasets) if context is not None else current
        for section, title in _SECTIONS[1:]:
            rows = self._rows(view, section)
            if section == "dataset":
                rows += self._result_rows(results, current["epoch"])
            if rows:
                lines += [f"{title}:", *rows, ""]
        self.write("\n".join(lines) + "\n")
        return True

    def _result_rows(self, results: list, epoch: int) -> list:
        """Rows of dataset results; one of the weights of another epoch (asynchronous evaluation) names it."""
        rows = []
        for result in results:
            if result.dataset_name in self.set_names:
                label = (
                    result.dataset_name if result.epoch == epoch else f"{result.dataset_name} (epoch {result.epoch})"
                )
                rows += self._rows({label: {"dataset": result.values}}, "dataset", [label])
        return rows

    def on_evaluation_result(self, result: EvaluationResult, logs: dict) -> bool:
        """Kept for the next block printed (the epoch's, or the one at the end of training)."""
        self._results.append(result)
        return True

    def on_training_checkpoint(self, stopped_early: bool, stopped_on_error: bool, interrupted: bool) -> bool:
        """Prints the results that landed at the end of training (asynchronous evaluation)."""
        results, self._results = self._results, []
        if not self._is_primary():
            return True
        rows = self._result_rows(results, -1)
        if rows:
            self.write("\n".join([_RULE, "Computed over dataset (landed at the end of training):", *rows, ""]) + "\n")
        return True

    def _rows(self, current: dict, section: str, set_names: Optional[Sequence[str]] = None) -> list:
        rows = []
        for set_name in self.set_names if set_names is None else set_names:
            values = current.get(set_name, {}).get(section)
            if not values:
                continue
            metrics = list(values.items())
            if metrics:
                rows.append(
                    f"{set_name:<15}: "
                    + "  ".join(f"{metric:<13} {_format_value(value)}" for metric, value in metrics)
                    + "."
                )
        return rows


def _format_value(value) -> str:
    if value is None:
        return "N/A"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
