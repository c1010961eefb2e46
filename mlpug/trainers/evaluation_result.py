"""``EvaluationResult``: one dataset evaluation, published by its producer and dispatched to every callback."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, NamedTuple, Optional

from mlpug.logs import MetricValues, get_value_at


class EvaluationResult(NamedTuple):
    """The metrics of one evaluation of a whole dataset, tagged with the position of the weights it evaluated.

    A producer (``TestMetricsLogger``, synchronous or asynchronous, or a callback of your own) publishes it with
    :meth:`~mlpug.trainers.run_context.RunContext.publish_result`; the ``TrainingManager`` then calls
    ``on_evaluation_result(result, logs)`` on every callback, in dispatch order, once per result.

    Attributes:
        dataset_name: The dataset's key in ``logs.current`` (e.g. ``"validation"``).
        values: The dataset metrics, what ``logs.current.<dataset_name>.dataset`` holds.
        epoch / batch_step / global_iter: The position (0-based, ``logs.current`` at the trigger) of the weights
            that were evaluated. An asynchronous result lands later than this position.
        model_components: Asynchronous results: returns the evaluated snapshot's weights in the form of
            ``trainer.get_state()["model_components"]``, valid only during the ``on_evaluation_result`` hook.
            None: the live weights were evaluated (a synchronous result: they are the weights of now).
    """

    dataset_name: str
    values: MetricValues
    epoch: int
    batch_step: int
    global_iter: int
    model_components: Optional[Callable[[], dict]] = None

    @property
    def evaluated_at(self) -> dict:
        """``{"epoch", "batch_step", "global_iter"}``: what ``logs.current.<name>.evaluated_at`` holds."""
        return {"epoch": self.epoch, "batch_step": self.batch_step, "global_iter": self.global_iter}

    def value_of(self, path: str, default: Any = None) -> Any:
        """The value of the dotted ``path`` in this result: ``<dataset_name>.dataset.<metric>`` gives the metric as a
        Python number; ``default`` when the path is of another dataset or level, or the metric is not there."""
        return get_value_at({self.dataset_name: {"dataset": self.values}}, path, default)

    @property
    def is_asynchronous(self) -> bool:
        """Whether a snapshot of the weights was evaluated (the result lands after training went on)."""
        return self.model_components is not None


def is_result_metric(path: str, result_datasets: Collection[str]) -> bool:
    """Whether the dotted ``path`` (in ``logs.current``) is a metric of published results:
    ``<dataset>.dataset.<metric>`` of a dataset in ``result_datasets`` (``RunContext.result_datasets``). Such a
    value reaches callbacks as ``on_evaluation_result`` events, one per evaluated set of weights."""
    parts = path.split(".", 2)
    return len(parts) == 3 and parts[1] == "dataset" and parts[0] in result_datasets


def without_results(current: dict, result_datasets: Collection[str]) -> dict:
    """A shallow copy of ``logs.current`` without the published results (the ``dataset`` and ``evaluated_at``
    levels of the datasets in ``result_datasets``), for consumers that record those from ``on_evaluation_result``,
    at the position of the weights each evaluated, and the rest of ``current`` at its own position."""
    view = dict(current)
    for name in result_datasets:
        section = view.get(name)
        if isinstance(section, dict) and ("dataset" in section or "evaluated_at" in section):
            view[name] = {key: value for key, value in section.items() if key not in ("dataset", "evaluated_at")}
    return view
