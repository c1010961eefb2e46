"""Asynchronous dataset evaluation: the validation of epoch k runs on a worker thread while epoch k+1 trains.

It evaluates a frozen copy of the weights, never the live ones, and the best model is written from the
*evaluated* weights without a round trip through disk (see docs/design-notes.md for the rationale).
``TestMetricsLogger(dataset, name, evaluator, run_async=True)`` uses :class:`AsyncEvaluation`:

* **Trigger** (an epoch end, in ``on_epoch_completed``): the training thread copies the weights into an
  :class:`~mlpug.trainers.snapshot.EvaluationSnapshot` and creates the dataset's iterator with the random states
  isolated (``iter(DataLoader)`` draws from torch's global generator); one worker thread evaluates the snapshot.
  The evaluation draws no random numbers of its own (inference mode), so the training's random streams do not
  move.
* **Landing**: results land at epoch ends (of the same epoch when it is the last one, else of a later one), in
  the order they were triggered, under the dataset's usual keys ``logs.current.<name>.dataset.<metric>``, tagged
  with the position of the weights they evaluated in ``logs.current.<name>.evaluated_at`` (``epoch``,
  ``batch_step``, ``global_iter``). Each is published as an
  :class:`~mlpug.trainers.evaluation_result.EvaluationResult` with the evaluated weights: every callback receives
  it in ``on_evaluation_result``, once, in order. When several land at once (at the last epoch, or after a wait)
  ``logs`` holds the newest.
* **Bounded queue**: at most ``max_pending`` evaluations are queued or running. At a trigger with a full queue,
  ``overflow="wait"`` (default) waits for the oldest to finish and lands it; ``overflow="skip"`` skips this
  trigger's evaluation (with a warning naming the epoch), so training never waits; the last epoch's evaluation
  is never skipped (nothing is left to train).
* **End of training**: everything pending is waited for and lands in ``on_training_checkpoint`` (before the
  training checkpoint of a stop or a SIGTERM, and before ``on_training_ended``). After an error the pending
  evaluations are not waited for: the emergency checkpoint holds them and a resume redoes them.
* **Checkpoints**: an evaluation that has not landed is saved in the training checkpoint with its snapshot's
  weights (one copy of the model components per pending evaluation) and redone on resume, so a resumed run lands
  the same results at the same epoch ends as an uninterrupted one. An epoch end repeated on resume (after one of
  its hooks failed) does not evaluate again the weights whose evaluation the checkpoint holds.
* **Errors**: an exception in the worker is raised on the training thread at the next batch boundary (or the
  epoch end where its result was to land), with a note naming the evaluation.
* **Several ranks**: each rank evaluates its shard of the snapshot on its worker thread *without any collective*;
  the training thread reduces the results at the epoch end where they land. Whether an evaluation has finished is
  agreed with one ``all_reduce_sum`` of per-rank flags at that epoch end, so every rank lands the same results at
  the same point, and the evaluation's collectives are the training thread's, issued in the same order on every
  rank; they can never interleave differently with the training's.
* **Cores**: ``num_threads`` limits the worker thread's intra-op threads (PyTorch: ``torch.set_num_threads`` on
  that thread; TensorFlow shares one process-wide pool, set with ``tf.config.threading`` before TensorFlow starts).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
from collections.abc import Iterable
from typing import Any, Literal, Optional

from mlpug.data import close_iterator
from mlpug.logs import MetricValues
from mlpug.random_state import isolated_random_states
from mlpug.trainers.evaluation_result import EvaluationResult

Overflow = Literal["wait", "skip"]
OVERFLOW_POLICIES = ("wait", "skip")

_log = logging.getLogger("mlpug.AsyncEvaluation")


def check_async_options(max_pending: Any, overflow: Any, num_threads: Any) -> None:
    """Raise ``ValueError`` naming the argument for a bad ``max_pending`` (int >= 1), ``overflow``
    (``"wait"`` / ``"skip"``) or ``num_threads`` (None or int >= 1)."""
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise ValueError(f"max_pending must be an int >= 1 (evaluations queued or running), got {max_pending!r}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(
            f"num_threads must be None or an int >= 1 (the worker's intra-op threads), got {num_threads!r}"
        )


class _Pending:
    """One triggered evaluation: its snapshot, the position it evaluates and the worker's future."""

    __slots__ = ("snapshot", "position", "future")

    def __init__(self, snapshot: Any, position: tuple, future: Any = None):
        self.snapshot, self.position, self.future = snapshot, position, future


class AsyncEvaluation:
    """The worker thread, the snapshots and the queue of one asynchronous ``TestMetricsLogger`` (see the module
    docstring). All methods but the worker's run on the training thread.

    Args:
        dataset_name: Used in messages and results.
        max_pending: Evaluations queued or running at most (>= 1). Up to ``max_pending + 1`` snapshots (copies of
            the model) exist: one more for results that landed in the current hook.
        overflow: ``"wait"`` or ``"skip"``: what a trigger does when ``max_pending`` evaluations are pending.
        num_threads: Intra-op threads of the worker thread (see ``EvaluationSnapshot.configure_thread``).
    """

    def __init__(self, dataset_name: str, max_pending: int = 1, overflow: Overflow = "wait", num_threads: Any = None):
        check_async_options(max_pending, overflow, num_threads)
        self.dataset_name = dataset_name
        self.max_pending = max_pending
        self.overflow = overflow
        self.num_threads = num_threads
        self._pending: collections.deque = collections.deque()
        self._free: list = []  # snapshots to reuse
        self._landed: list = []  # snapshots of results landed in the current hook, freed at the next call
        self._restored: list = []  # pending evaluations of a checkpoint, to redo
        self._restored_epochs: set[int] = set()  # their epochs: a repeated epoch end does not trigger them again
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._thread_configured = False
        self._error: Optional[BaseException] = None
        self._error_raised = False
        self._evaluator: Any = None
        self._dataset: Any = None
        self._settings: Any = None
        self._providers: list = []

    def start(self, evaluator: Any, dataset: Iterable, evaluate_settings: Any, random_state_providers: list) -> None:
        """Bind what every evaluation uses (at ``on_training_start``)."""
        self._evaluator, self._dataset, self._settings = evaluator, dataset, evaluate_settings
        self._providers = random_state_providers

    @property
    def num_pending(self) -> int:
        """Evaluations triggered (or restored from a checkpoint) that have not landed."""
        return len(self._pending) + len(self._restored)

    # ----- training thread -----
    def release_landed(self) -> None:
        """The snapshots of results that landed in an earlier hook become reusable."""
        self._free.extend(self._landed)
        self._landed = []

    def raise_worker_error(self) -> None:
        """Raise the worker's exception (once), at a batch boundary of the training thread."""
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error

    def trigger(self, position: tuple, distributed: Any, last: bool = False) -> tuple[bool, list]:
        """Start the evaluation of the weights of now (``position``: epoch, batch step, global iteration).

        Args:
            last: The last trigger of the run (no training left to keep going): a full queue is waited for, also
                with ``overflow="skip"``, so the final weights are always evaluated.

        Returns:
            ``(started, results)``: whether it started (False: skipped by ``overflow="skip"``, or the epoch end is
            one repeated on resume whose evaluation the checkpoint holds) and the results that landed to make room
            (``overflow="wait"``).
        """
        self.resubmit_restored()
        results: list = []
        if position[0] in self._restored_epochs:  # an epoch end repeated on resume: evaluated from the checkpoint
            self._restored_epochs.discard(position[0])
            return False, results
        if len(self._pending) >= self.max_pending:
            if self.overflow == "skip" and not last:
                _log.warning(
                    f"{self.dataset_name}: {len(self._pending)} asynchronous evaluation(s) still pending "
                    f"(max_pending={self.max_pending}, overflow='skip'): the evaluation of epoch {position[0]} is "
                    "skipped"
                )
                return False, results
            results = self._land(len(self._pending) - self.max_pending + 1, distributed)
        self._submit(position, None)
        return True, results

    def land_finished(self, distributed: Any) -> list:
        """Land the evaluations that have finished (on every rank), oldest first; no waiting."""
        if not self._pending:
            return []
        finished = 0
        for pending in self._pending:
            if not pending.future.done():
                break
            finished += 1
        if distributed.world_size > 1:  # agreed: every rank lands the same evaluations here
            flags = distributed.all_reduce_sum([1.0 if i < finished else 0.0 for i in range(len(self._pending))])
            finished = 0
            for flag in flags:
                if round(flag) < distributed.world_size:
                    break
                finished += 1
        return self._land(finished, distributed)

    def land_all(self, distributed: Any) -> list:
        """Wait for every pending evaluation (redoing restored ones first) and land them all."""
        self.resubmit_restored()
        return self._land(len(self._pending), distributed)

    def resubmit_restored(self) -> None:
        """Redo the pending evaluations of the checkpoint training resumed from (once the model is built)."""
        restored, self._restored = self._restored, []
        for entry in restored:
            self._submit((entry["epoch"], entry["batch_step"], entry["global_iter"]), entry["model_components"])

    def _submit(self, position: tuple, weights: Optional[dict]) -> None:
        snapshot = self._free.pop() if self._free else self._evaluator.trainer.evaluation_snapshot()
        if weights is None:
            snapshot.capture()
        else:
            snapshot.set_model_components_state(weights)
        with isolated_random_states(self._providers):  # iter(DataLoader) draws from the global generator
            batches = iter(self._dataset)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"mlpug-eval-{self.dataset_name}"
            )
        pending = _Pending(snapshot, position)
        pending.future = self._executor.submit(self._evaluate, pending, batches)
        self._pending.append(pending)

    def _land(self, count: int, distributed: Any) -> list:
        results = []
        for _ in range(count):
            pending = self._pending.popleft()
            try:
                rank_result = pending.future.result()
            except BaseException as error:
                self._error_raised = True  # raised here, not again at the next batch
                raise error
            values = self._evaluator.combine_ranks(rank_result)  # several ranks: the one collective, here
            self._landed.append(pending.snapshot)
            epoch, batch_step, global_iter = pending.position
            results.append(
                EvaluationResult(
                    self.dataset_name, values, epoch, batch_step, global_iter, pending.snapshot.model_components_state
                )
            )
        return results

    def close(self, wait_for_pending: bool = True) -> None:
        """End the worker thread; without ``wait_for_pending`` evaluations not started yet are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=not wait_for_pending)
            self._executor = None

    # ----- worker thread -----
    def _evaluate(self, pending: _Pending, batches: Any) -> Any:
        try:
            if not self._thread_configured:
                pending.snapshot.configure_thread(self.num_threads)
                self._thread_configured = True
            result = self._evaluator.evaluate_on_rank(batches, self._settings, pending.snapshot)
            if isinstance(result, MetricValues):  # one process: the numbers now, on this thread
                result = MetricValues(result.items())
            return result
        except BaseException as error:
            note = (
                f"mlpug: raised by the asynchronous evaluation of {self.dataset_name!r} of the weights of epoch "
                f"{pending.position[0]} (global iteration {pending.position[2]})"
            )
            if hasattr(error, "add_note"):
                error.add_note(note)
            if self._error is None:
                self._error = error
            raise
        finally:
            close_iterator(batches)

    # ----- state -----
    def get_state(self) -> dict:
        """The evaluations not landed yet, each with its position and its snapshot's weights (redone on resume)."""
        entries = [
            {
                "epoch": pending.position[0],
                "batch_step": pending.position[1],
                "global_iter": pending.position[2],
                "model_components": pending.snapshot.model_components_state(),
            }
            for pending in self._pending
        ]
        return {"pending": [*self._restored, *entries]}

    def set_state(self, state: dict) -> None:
        self._restored = list(state.get("pending", []))
        self._restored_epochs = {entry["epoch"] for entry in self._restored}
