"""``MetricsHistory``: one row per epoch of the metrics in ``logs``, as a table, a CSV file and a plot.

At every epoch end the callback reads the epoch-level values of ``logs["current"]`` (the levels ``dataset``,
``window_average`` and ``epoch``: whole-dataset metrics, the training window averages at the epoch's last batch,
the epoch's learning rate and duration) into a row ``{"epoch": k, "global_iter": i, "<section>.<level>.<name>":
value, ...}``; ``history.rows`` is the list of rows. The rows are part of training checkpoints, so the history
of a resumed run holds all its epochs. pandas (``to_dataframe``, ``to_csv``) and matplotlib (``plot``) are
optional: they are imported when used, with a clear error when missing (``pip install mlpug[plot]``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional

from mlpug.logs import get_value_at, iter_paths, to_number
from mlpug.trainers.callback import Callback, check_log_path
from mlpug.trainers.evaluation_result import EvaluationResult, without_results
from mlpug.trainers.run_context import RunContext

__all__ = ["MetricsHistory"]

EPOCH_LEVELS = ("dataset", "window_average", "epoch")
_MISSING = object()


def _float_or_none(value: Any) -> Optional[float]:
    number = None if value is _MISSING or value is None else to_number(value)
    return float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else None


def _require(module: str, purpose: str) -> Any:
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(
            f"MetricsHistory.{purpose} needs {module}, which is not importable ({error}); install it: pip install "
            f"{module} (or mlpug[plot])"
        ) from error


class MetricsHistory(Callback):
    """Collects one row of metrics per epoch.

    Args:
        metric_paths: Dotted paths under ``logs["current"]`` to record (checked at the manager's construction);
            default None records every value of the levels ``dataset``, ``window_average`` and ``epoch`` that is
            present at the epoch end (``training.window_average.loss``, ``validation.dataset.accuracy``,
            ``training_params.epoch.lr``, ``training_params.epoch.duration`` in seconds, ...).
        name: The callback's name (key of its rows in training checkpoints).

    Attributes:
        rows: One dict per completed epoch: ``epoch`` (0-based), ``global_iter`` (of the epoch's last batch) and a
            float (or None) per path.

    Raises:
        TypeError: ``metric_paths`` is not a list of str.
        ValueError: At the manager's construction, a path that no callback writes.
    """

    def __init__(self, metric_paths: Optional[Sequence[str]] = None, name: Optional[str] = None):
        super().__init__(name)
        if metric_paths is not None and (
            isinstance(metric_paths, str) or not all(isinstance(path, str) for path in metric_paths)
        ):
            raise TypeError(f"metric_paths must be a list of dotted path str or None, got {metric_paths!r:.200}")
        self.metric_paths = None if metric_paths is None else list(metric_paths)
        self.rows: list[dict] = []

    def set_training_manager(self, manager: RunContext) -> bool:
        """Keep the run context; check the given ``metric_paths``.

        Raises:
            ValueError: No callback writes one of ``metric_paths``.
        """
        for path in self.metric_paths or []:
            check_log_path(path, manager.callbacks, f"{self.name}: metric path")
        return bool(super().set_training_manager(manager))

    def _paths(self, current: dict) -> list[str]:
        if self.metric_paths is not None:
            return self.metric_paths
        return [path for path in iter_paths(current) if path.count(".") >= 2 and path.split(".")[1] in EPOCH_LEVELS]

    def _row(self, epoch: int, global_iter: int) -> dict:
        """The row of ``epoch``, added (in epoch order) when it is not there yet."""
        for row in reversed(self.rows):
            if row["epoch"] == epoch:
                return row
        row = {"epoch": epoch, "global_iter": global_iter}
        self.rows.append(row)
        self.rows.sort(key=lambda r: r["epoch"])
        return row

    def on_evaluation_result(self, result: EvaluationResult, logs: dict) -> bool:
        """A dataset result goes into the row of the epoch whose weights it evaluated (asynchronous results land
        at a later epoch end)."""
        row = self._row(result.epoch, result.global_iter)
        for metric, value in result.values.items():
            path = f"{result.dataset_name}.dataset.{metric}"
            if self.metric_paths is None or path in self.metric_paths:
                row[path] = _float_or_none(value)
        return True

    def on_epoch_completed(self, logs: dict) -> bool:
        current = without_results(logs["current"], self.context.result_datasets)  # results come as events
        row = self._row(current["epoch"], current["global_iter"])
        for path in self._paths(current):
            if self.context.is_result_metric(path):
                row.setdefault(path, None)  # written by its result (an asynchronous one may land later)
            else:
                row[path] = _float_or_none(get_value_at(current, path, _MISSING))
        return True

    # ----- state -----
    def get_state(self) -> dict:
        return {"rows": [dict(row) for row in self.rows]}

    def set_state(self, state: dict) -> None:
        self.rows = [dict(row) for row in state.get("rows", [])]

    # ----- views -----
    def columns(self) -> list[str]:
        """All column names, in the order they first appear (``epoch``, ``global_iter``, then the paths)."""
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(row))
        return list(names)

    def to_dataframe(self) -> Any:
        """The rows as a ``pandas.DataFrame`` indexed by ``epoch`` (a missing value is NaN).

        Raises:
            ImportError: pandas is missing.
        """
        pandas = _require("pandas", "to_dataframe")
        frame = pandas.DataFrame(self.rows, columns=self.columns())
        return frame.set_index("epoch") if "epoch" in frame else frame

    def to_csv(self, path: str) -> str:
        """Write the table to ``path`` (CSV with a header, through pandas); returns ``path``.

        Raises:
            ImportError: pandas is missing.
        """
        self.to_dataframe().to_csv(path)
        return path

    def curves(self) -> dict[str, dict[str, list]]:
        """The plotted data: per metric name (``loss``, ``accuracy``, ...) the curves ``{"<section>.<level>":
        ([epoch, ...], [value, ...])}`` of every path with that name (``training_params`` left out)."""
        plots: dict[str, dict[str, list]] = {}
        for column in self.columns():
            parts = column.split(".")
            if len(parts) < 3 or parts[0] == "training_params":
                continue
            points = [(row["epoch"], row[column]) for row in self.rows if row.get(column) is not None]
            if points:
                epochs, values = zip(*points)
                plots.setdefault(".".join(parts[2:]), {})[".".join(parts[:2])] = [list(epochs), list(values)]
        return plots

    def plot(self, path: str) -> str:
        """Write a PNG with one panel per metric name and one curve per dataset and level (see :meth:`curves`),
        epochs on the x axis; returns ``path``.

        Raises:
            ImportError: matplotlib is missing.
            ValueError: There is nothing to plot yet (no completed epoch with metrics).
        """
        _require("matplotlib", "plot")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        plots = self.curves()
        if not plots:
            raise ValueError("MetricsHistory.plot: no epoch with metrics yet; train at least one epoch first")
        figure = Figure(figsize=(5 * len(plots), 4))  # no pyplot: the user's matplotlib backend is left alone
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(plots), squeeze=False)
        for axis, (metric, curves) in zip(axes[0], sorted(plots.items())):
            for label, (epochs, values) in sorted(curves.items()):
                axis.plot(epochs, values, marker="o", label=label)
            axis.set_title(metric)
            axis.set_xlabel("epoch")
            axis.legend()
        figure.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, format="png")
        self.last_figure = figure  # what was drawn (axes, lines), e.g. for tests
        return path

    def table(self, float_format: str = "{:.4f}") -> str:
        """The table as text, one line per epoch (for the console at the end of training).

        Raises:
            ImportError: pandas is missing.
        """
        return self.to_dataframe().to_string(float_format=float_format.format)

    def save(self, directory: str, base_filename: str) -> tuple[str, str]:
        """Write ``<base_filename>-history.csv`` and ``<base_filename>-history.png`` into ``directory`` (e.g. next
        to the checkpoints); returns their paths. Call it on the primary rank only in data-parallel training.

        Raises:
            ImportError: pandas or matplotlib is missing.
            ValueError: No epoch was completed yet.
        """
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, f"{base_filename}-history")
        return self.to_csv(f"{base}.csv"), self.plot(f"{base}.png")
