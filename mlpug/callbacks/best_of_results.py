"""The ``CheckpointManager``'s "best" of asynchronous evaluation results (a mixin of it).

With a monitored metric evaluated asynchronously (``TestMetricsLogger(..., run_async=True)``), results land at
later epoch ends, tagged with the position of the weights they evaluated. The best decision is made on each
landed result (:func:`~mlpug.trainers.callbacks.async_evaluation.landed_results`), in the hook where it lands,
and the best model checkpoint is written at once from the **evaluated snapshot's** weights (copied to host memory
in the hook, written in the background), not from the live weights, which have trained on since. A non-finite
result is handled by the ``CheckpointManager``'s ``non_finite_metric`` policy where it lands, naming the epoch of the
evaluated weights.
"""

from __future__ import annotations

from typing import Any, Optional

from mlpug.logs import get_value_at, resolve
from mlpug.trainers.callbacks.async_evaluation import EvaluationResult, is_asynchronous, landed_results


class BestOfResults:
    """Mixin of ``CheckpointManager``: "best" decided on landed asynchronous results (see the module docstring)."""

    metric_to_monitor: Optional[str]
    _async_section: Optional[str] = None  # the monitored dataset, when it is evaluated asynchronously

    def _find_async_source(self, callbacks: Any) -> None:
        section = self.metric_to_monitor.split(".", 1)[0] if self.metric_to_monitor else None
        self._async_section = section if section is not None and is_asynchronous(callbacks, section) else None

    @property
    def monitors_async_results(self) -> bool:
        """Whether the monitored metric is evaluated asynchronously (best decided on landed results)."""
        return self._async_section is not None

    def _decide_on_landed_results(self, logs: dict) -> None:
        """Compare every result that landed now with the best; write the best model of each improvement from the
        evaluated weights (primary rank)."""
        section, metric = self._async_section, self.metric_to_monitor
        assert section is not None and metric is not None
        current = logs["current"]
        for result in landed_results(self.training_manager, section):  # type: ignore[attr-defined]
            view = self._result_view(current, result)
            value = get_value_at(view, metric, None)
            self._check_finite_value(value, view)  # type: ignore[attr-defined]  # non_finite_metric, at its epoch
            if not self._is_improvement(value):  # type: ignore[attr-defined]
                continue
            current["is_best"] = True
            self.best_logs = logs["best"] = resolve(view)
            if self._is_primary():  # type: ignore[attr-defined]
                self._write_best_of(result, view)

    @staticmethod
    def _result_view(current: dict, result: EvaluationResult) -> dict:
        """``logs.current`` as of the evaluated weights: their position and this result's section; the position
        at which it landed under ``landed_at``."""
        view = dict(current)
        view["landed_at"] = {key: current[key] for key in ("epoch", "batch_step", "global_iter")}
        view.update(result.evaluated_at)
        view[result.dataset_name] = {"dataset": result.values, "evaluated_at": result.evaluated_at}
        return view

    def _write_best_of(self, result: EvaluationResult, view: dict) -> None:
        assert result.model_components is not None
        self._writer.wait()  # type: ignore[attr-defined]  # the saver's buffers are free
        trainer_state = self.saver.snapshot(  # type: ignore[attr-defined]
            {"trainer": {"model_components": result.model_components()}}
        )["trainer"]
        checkpoint = self._model_checkpoint(trainer_state, {"current": view})  # type: ignore[attr-defined]
        best_path = self.file_names.best_model  # type: ignore[attr-defined]
        # A failure is reported like every background write: logged at once, and noted with the file and the period
        # of the evaluated weights (not the one at which their result landed).
        period = self._period_name({"current": view})  # type: ignore[attr-defined]
        on_error = self._report_failed_write(period, [best_path])  # type: ignore[attr-defined]

        def job() -> None:
            self._save_if_finite(checkpoint, best_path)  # type: ignore[attr-defined]

        self._write(job, on_error=on_error)  # type: ignore[attr-defined]
