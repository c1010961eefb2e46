"""``Tensorboard`` and ``AutoTensorboard``: metrics from ``logs`` into TensorBoard event files, backend-free.

Events are written with TensorBoard's own record writer (``tensorboard.summary.writer.record_writer``, the TFRecord
framing with TensorBoard's CRC) into ``events.out.tfevents.*`` files, which needs neither PyTorch nor TensorFlow
(TensorBoard's ``EventFileWriter`` would import TensorFlow whenever it is installed). A metric at the dotted path
``<section>.<level>.<name...>`` of ``logs["current"]`` (e.g. ``validation.dataset.loss``,
``training.window_average.loss``, ``training_params.batch.lr``) goes to the **run** ``<section>-<level>`` under the
**tag** ``<name>`` (nested names joined by ``/``), so that a metric and its averages overlay in one chart: ``loss``
of the runs ``training-batch``, ``training-window_average``, ``validation-dataset``, ... (the names of mlpug's
original ``Tensorboard`` callbacks). Steps are ``logs.current.global_iter`` (0-based index of the last trained
batch), for batch and epoch-level values alike, so that every chart has the same x axis.

Values of the levels ``batch`` and ``window_average`` are written every ``log_period`` batches (reading them is
a device wait at that batch, as for ``LogProgress``); the others (``dataset``, ``epoch``) at every epoch end where
they are present. Only the primary rank writes. When a run resumes, every run directory gets TensorBoard's purge
marker (a ``SessionLog.START`` event at the resumed step), so that TensorBoard drops the events an interrupted run
wrote after its last training checkpoint instead of showing them twice.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from mlpug.logs import get_value_at, iter_paths, to_number
from mlpug.trainers.callback import Callback, check_log_path
from mlpug.trainers.evaluation_result import EvaluationResult, without_results
from mlpug.trainers.run_context import RunContext

__all__ = ["AutoTensorboard", "Tensorboard", "run_and_tag"]

BATCH_LEVELS = ("batch", "window_average")
_MISSING = object()


def run_and_tag(path: str) -> tuple[str, str]:
    """The run directory name and the tag of a dotted metric path (see the module docstring).

    Raises:
        ValueError: ``path`` has fewer than three parts (``<section>.<level>.<name>``).
    """
    parts = path.split(".")
    if len(parts) < 3 or not all(parts):
        raise ValueError(
            f"a TensorBoard metric path must be <section>.<level>.<name>, e.g. 'validation.dataset.loss' or "
            f"'training_params.batch.lr'; got {path!r}"
        )
    return f"{parts[0]}-{parts[1]}", "/".join(parts[2:])


def _require_tensorboard() -> None:
    """Raise a clear ``ImportError`` at construction when the ``tensorboard`` package is missing."""
    try:
        import tensorboard.summary.writer.record_writer  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"mlpug's Tensorboard callbacks write with the tensorboard package, which is not importable ({error}); "
            "install it: pip install tensorboard"
        ) from error


class _EventFile:
    """One ``events.out.tfevents.<time>.<host>.<pid>.<n>`` file of a run directory, written synchronously through
    TensorBoard's ``RecordWriter``; flushed when ``flush_period_s`` passed since the last flush, and by
    :meth:`flush`."""

    _counter = 0

    def __init__(self, directory: str, flush_period_s: float):
        import socket

        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(directory, exist_ok=True)
        _EventFile._counter += 1
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{_EventFile._counter}"
        self._file = open(os.path.join(directory, name), "wb")
        self._writer = RecordWriter(self._file)
        self._flush_period_s, self._last_flush = flush_period_s, time.monotonic()
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_event(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())
        if time.monotonic() - self._last_flush >= self._flush_period_s:
            self.flush()

    def flush(self) -> None:
        self._writer.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._writer.close()


class Tensorboard(Callback):
    """Writes the metrics at ``metric_paths`` to TensorBoard event files under ``log_dir``.

    Args:
        metric_paths: Dotted paths under ``logs["current"]`` (str, or a list of them), each
            ``<section>.<level>.<name>``; checked when the ``TrainingManager`` is constructed (a callback must
            write them).
        log_dir: Directory of the run directories (``<log_dir>/<section>-<level>``); default ``"tensorboard"``.
            Point ``tensorboard --logdir`` at it.
        log_period: Write batch-level values (levels ``batch``, ``window_average``) every this many batches
            (int >= 1; default 50). 1 writes every batch, at the cost of a
            device wait per batch.
        flush_period_s: The writers flush to disk at least this often (seconds, > 0; default 10), and at the end.
        name: The callback's name.

    Raises:
        ValueError: No paths, a path without three parts, a bad ``log_period`` or ``flush_period_s``, or a
            ``log_dir`` that is a file; at the manager's construction, a path that no callback writes.
        TypeError: ``metric_paths`` or ``log_dir`` of the wrong type.
        ImportError: The ``tensorboard`` package is missing (``pip install tensorboard``).
    """

    def __init__(
        self,
        metric_paths: str | Sequence[str],
        log_dir: str = "tensorboard",
        log_period: int = 50,
        flush_period_s: float = 10.0,
        name: Optional[str] = None,
    ):
        super().__init__(name)
        _require_tensorboard()
        paths = [metric_paths] if isinstance(metric_paths, str) else metric_paths
        if not isinstance(paths, (list, tuple)) or not all(isinstance(path, str) for path in paths):
            raise TypeError(f"metric_paths must be a dotted path str or a list of them, got {metric_paths!r:.200}")
        self.metric_paths = list(paths)
        for path in self.metric_paths:
            run_and_tag(path)
        self._check_common(paths, log_dir, log_period, flush_period_s)
        self.log_dir, self.log_period, self.flush_period_s = log_dir, log_period, float(flush_period_s)
        self._writers: dict[str, Any] = {}

    def _check_common(self, paths: Sequence[str], log_dir: Any, log_period: Any, flush_period_s: Any) -> None:
        if not paths:
            raise ValueError("metric_paths is empty: give at least one dotted path such as 'validation.dataset.loss'")
        if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
            raise TypeError(f"log_dir must be a directory path, got {log_dir!r:.200}")
        if os.path.isfile(log_dir):
            raise ValueError(f"log_dir {str(log_dir)!r} is a file; give a directory for the TensorBoard event files")
        if isinstance(log_period, bool) or not isinstance(log_period, int) or log_period < 1:
            raise ValueError(f"log_period must be an int >= 1 (batches), got {log_period!r}")
        if isinstance(flush_period_s, bool) or not isinstance(flush_period_s, (int, float)) or not flush_period_s > 0:
            raise ValueError(f"flush_period_s must be a number > 0 (seconds), got {flush_period_s!r}")

    # ----- which values -----
    def sections(self) -> Iterable[str]:
        """The ``logs`` sections this callback reads (each must be produced by a callback or the manager)."""
        return {path.split(".", 1)[0] for path in self.metric_paths}

    def paths_to_write(self, current: dict, batch_level: bool) -> list[str]:
        """The paths whose values are written now: the batch levels at a batch, the others at an epoch end."""
        return [path for path in self.metric_paths if (path.split(".")[1] in BATCH_LEVELS) == batch_level]

    # ----- hooks -----
    def set_training_manager(self, manager: RunContext) -> bool:
        """Keep the run context; check that callbacks write every metric path.

        Raises:
            ValueError: No callback writes one of ``metric_paths``.
        """
        for path in self.metric_paths:
            check_log_path(path, manager.callbacks, f"{self.name}: metric path")
        return bool(super().set_training_manager(manager))

    def _is_primary(self) -> bool:
        context = self.training_manager
        return context is None or context.distributed.is_primary

    def _writer(self, run: str) -> Any:
        writer = self._writers.get(run)
        if writer is None:
            writer = self._writers[run] = _EventFile(os.path.join(str(self.log_dir), run), self.flush_period_s)
            if self._resumed_at is not None:
                self._purge_after(writer, self._resumed_at)
        return writer

    _resumed_at: Optional[int] = None

    @staticmethod
    def _purge_after(writer: Any, step: int) -> None:
        from tensorboard.compat.proto import event_pb2

        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, session_log=start))

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        if start_update_iter > 0:  # resumed: TensorBoard drops what an interrupted run wrote after this step
            self._resumed_at = start_update_iter
        return True

    def _write(self, current: dict, batch_level: bool) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        step, now = current["global_iter"], time.time()
        per_run: dict[str, list] = {}
        for path in self.paths_to_write(current, batch_level):
            value = get_value_at(current, path, _MISSING)
            if value is _MISSING or value is None:
                continue
            number = to_number(value)
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            run, tag = run_and_tag(path)
            per_run.setdefault(run, []).append(summary_pb2.Summary.Value(tag=tag, simple_value=float(number)))
        for run, values in per_run.items():
            summary = summary_pb2.Summary(value=values)
            self._writer(run).add_event(event_pb2.Event(wall_time=now, step=step, summary=summary))

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """The batches up to the next batch-level write (``log_period``), on every rank (the primary writes)."""
        return self.log_period - global_iter % self.log_period

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> bool:
        current = logs["current"]
        if self._is_primary() and (current["global_iter"] + 1) % self.log_period == 0:
            self._write(current, batch_level=True)
        return True

    def on_evaluation_result(self, result: EvaluationResult, logs: dict) -> bool:
        """A dataset result is written at the step of the weights it evaluated (asynchronous ones land later)."""
        if self._is_primary():
            self._write({result.dataset_name: {"dataset": result.values}, "global_iter": result.global_iter}, False)
        return True

    def on_epoch_completed(self, logs: dict) -> bool:
        if self._is_primary():  # the dataset results were written as they were published
            self._write(without_results(logs["current"], self.context.result_datasets), batch_level=False)
        return True

    def _flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def on_epoch_checkpoint(self, logs: dict) -> bool:
        """Flush, so that a checkpoint never holds a later step than the event files on disk."""
        self._flush()
        return True

    def on_training_checkpoint(self, stopped_early: bool, stopped_on_error: bool, interrupted: bool) -> bool:
        self._flush()
        return True

    def on_training_ended(self, stopped_early, stopped_on_error, interrupted, callback_calls_success) -> bool:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
        return True


class AutoTensorboard(Tensorboard):
    """Writes every metric of one ``logs`` section to TensorBoard: all of ``logs.current.<dataset_name>``
    (levels ``batch``, ``window_average``, ``dataset``), and for ``"training"`` also ``training_params`` (LR,
    batch duration, ...). Paths, runs and tags as for :class:`Tensorboard`, found at every write.

    Args:
        dataset_name: The section, e.g. ``"training"`` or ``"validation"``; checked at the manager's construction
            (a callback must produce it).
        log_dir: As for :class:`Tensorboard`.
        log_period: As for :class:`Tensorboard`.
        flush_period_s: As for :class:`Tensorboard`.
        name: The callback's name; default ``AutoTensorboard[<dataset_name>]``.
    """

    def __init__(
        self,
        dataset_name: str,
        log_dir: str = "tensorboard",
        log_period: int = 50,
        flush_period_s: float = 10.0,
        name: Optional[str] = None,
    ):
        if not isinstance(dataset_name, str):
            raise TypeError(f"dataset_name must be a str such as 'validation', got {dataset_name!r:.100}")
        if not dataset_name:
            raise ValueError("dataset_name must be a non-empty str such as 'validation', got ''")
        Callback.__init__(self, name or f"AutoTensorboard[{dataset_name}]")
        _require_tensorboard()
        self.dataset_name = dataset_name
        self.metric_paths = []
        self._check_common([dataset_name], log_dir, log_period, flush_period_s)
        self.log_dir, self.log_period, self.flush_period_s = log_dir, log_period, float(flush_period_s)
        self._writers = {}

    def sections(self) -> Iterable[str]:
        return [self.dataset_name, "training_params"] if self.dataset_name == "training" else [self.dataset_name]

    def set_training_manager(self, manager: RunContext) -> bool:
        """Keep the run context; check that a callback produces ``dataset_name``.

        Raises:
            ValueError: No callback produces ``dataset_name`` (the produced sections are listed).
        """
        producers = {section for callback in manager.callbacks for section in callback.produces}
        if self.dataset_name not in producers:
            raise ValueError(
                f"{self.name}: dataset_name {self.dataset_name!r} is not written into logs['current'] by any callback; "
                f"the callbacks produce {sorted(producers)} (a TrainingMetricsLogger produces 'training', a "
                "TestMetricsLogger its dataset name)"
            )
        return bool(Callback.set_training_manager(self, manager))

    def paths_to_write(self, current: dict, batch_level: bool) -> list[str]:
        paths: list[str] = []
        for section in self.sections():
            node = current.get(section)
            if isinstance(node, dict):
                paths.extend(
                    path
                    for path in iter_paths(node, f"{section}.")
                    if path.count(".") >= 2
                    and path.split(".")[1] != "evaluated_at"  # the position of a result, not a metric
                    and (path.split(".")[1] in BATCH_LEVELS) == batch_level
                )
        return paths
