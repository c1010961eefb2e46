"""What the neutral core needs to know about distribution, behind one small interface.

The single-process case is the :class:`SerialContext` null object, so loop code calls these methods
unconditionally. A data-parallel backend trainer returns its own implementation from
``BackendTrainer.distributed_context()`` (PyTorch: ``mlpug.pytorch.distributed.TorchDistributedContext``), and the
``TrainingManager`` and the ``MetricEvaluator`` use it.

Every rank must issue the collectives of a run in the same order. The core issues them at points that every
rank passes alike, never lazily where a consumer reads a value (consumers such as ``LogProgress`` act on the
primary rank only):

* at the *read points* of training, one collective each (:class:`StepReductions`): the batches whose hooks read
  values reduced over the ranks (the callbacks declare them: ``Callback.batches_until_values_read``), the last
  batch of every epoch, and a scheduled stop check at least every ``check_stop_every`` batches
  (``TrainingManager``). Between two read points every step's ``(value, weight)`` pairs stay on their rank as
  they are (device scalars, no wait): the batch loss (for the non-finite loss checks) and the batch metrics of
  the metric loggers (added in their batch-end hooks, which run before those of every other callback), each
  step's in a :class:`BatchReduction`. At a read point **one collective** reduces the pairs of every pending step,
  each step's own (so every per-step value is exactly the sample-weighted mean over the ranks), and whether this
  rank asks to stop (a stop request or a signal). Its values wait for it when first read. The stop flags are read
  at the first batch boundary after one more step (the collective ran during it, so reading does not wait): a
  stop takes effect on every rank after the same batch, the one after the first read point that follows the
  request;
* at every epoch end, whether any rank asks to stop (:meth:`DistributedContext.any_rank`);
* when training leaves the loop without an error (completed, or stopped on every rank at the same batch), the
  steps since the last read point, if any, in one collective;
* once per dataset evaluation, the sums and counts of its metrics.

A value whose step was not reduced yet cannot be read (a ``RuntimeError`` says how to declare the read), except
after an error ended training: no collective runs then, and such a value reads as this rank's own.

Why so few collectives: ``docs/design-notes.md``.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any, Optional


class DistributedContext:
    """Distributed facts and collectives used by the neutral core.

    Attributes:
        rank: This process's rank, 0-based.
        world_size: Number of processes taking part.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_primary(self) -> bool:
        """True on the rank that prints and writes files (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Block until every rank arrives."""
        raise NotImplementedError

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of Python numbers over all ranks; every rank receives the result."""
        raise NotImplementedError

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one rank (e.g. a stop request)."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def all_reduce_pairs_async(self, pairs: Sequence[tuple[Any, Any]]) -> Callable[[], list[float]]:
        """One collective issued now for all ``(value, weight)`` pairs (backend scalars or numbers); returns a
        function that waits for it and gives ``[sum_r(value * weight) for each pair] + [sum_r(weight) for each
        pair]`` as Python floats. Default: computed now, blocking."""
        from mlpug.logs import to_number

        numbers = [(to_number(value), to_number(weight)) for value, weight in pairs]
        sums = self.all_reduce_sum([v * w for v, w in numbers] + [w for _, w in numbers])
        return lambda: sums

    def all_reduce_weighted(self, pairs: Sequence[tuple[Any, Any]]) -> list[tuple[float, float]]:
        """Sample-weighted means over all ranks, now (blocking): per ``(mean_value, weight)`` pair of this rank,
        ``(sum_r(mean_value_r * weight_r) / sum_r(weight_r), sum_r(weight_r))``, never a mean of means; a total
        weight of 0 gives the mean ``nan``."""
        return _means(self.all_reduce_pairs_async(pairs)(), len(pairs))


class SerialContext(DistributedContext):
    """The single-process null object: rank 0 of a world of 1; collectives return their input."""

    def barrier(self) -> None:
        pass

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def any_rank(self, flag: bool) -> bool:
        return flag

    def all_reduce_weighted(self, pairs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        return list(pairs)


def _means(sums: Sequence[float], count: int) -> list[tuple[float, float]]:
    return [(sums[i] / sums[count + i] if sums[count + i] else float("nan"), sums[count + i]) for i in range(count)]


class _Collective:
    """One issued collective of a read point: ``count`` pairs, their means computed once, when first read."""

    __slots__ = ("_result", "_count", "_means")

    def __init__(self, result: Callable[[], list[float]], count: int):
        self._result, self._count = result, count
        self._means: Optional[list[tuple[float, float]]] = None

    @property
    def is_waited(self) -> bool:
        """Whether the collective was waited for (its means computed)."""
        return self._means is not None

    def value(self, index: int, part: int) -> float:
        """Part 0 (mean) or 1 (total weight) of pair ``index`` (waits for the collective at the first read)."""
        if self._means is None:
            self._means = _means(self._result(), self._count)
        return self._means[index][part]


class BatchReduction:
    """The ``(value, weight)`` pairs of one training step to be reduced over the ranks (see the module docstring).

    The manager creates one per step and adds the batch loss; the metric loggers add their metric pairs
    (:meth:`add`) in their batch-end hooks; they stay on this rank until the collective of the next read point
    (:meth:`StepReductions.issue`), which the manager issues before the batch-end hooks of every other callback.
    Every rank adds the same pairs in the same order.

    Args:
        context: The distributed context whose :meth:`DistributedContext.all_reduce_pairs_async` reduces.
    """

    def __init__(self, context: DistributedContext):
        self.context = context
        self._pairs: list = []
        self._collective: Optional[_Collective] = None  # the collective of the read point that reduces this step
        self._offset = 0  # where this step's pairs start in it
        self._abandoned = False  # training ended on an error before it was reduced: values read as this rank's

    def add(self, pairs: Sequence[tuple[Any, Any]]) -> list[tuple[ReducedValue, ReducedValue]]:
        """Add this rank's ``(mean_value, weight)`` pairs; return their values over all ranks, ``(mean, total
        weight)`` as :class:`ReducedValue` s, readable once the collective of a read point has reduced this step.

        Raises:
            RuntimeError: The step was reduced already (every rank must add before the manager issues it).
        """
        if self._collective is not None:
            raise RuntimeError(
                "this step's metric reduction was issued already: a callback that reduces batch metrics must do so "
                "in on_batch_training_completed and set reduces_batch_metrics = True, so that it runs before it"
            )
        start = len(self._pairs)
        self._pairs.extend(pairs)
        return [(ReducedValue(self, start + i, 0), ReducedValue(self, start + i, 1)) for i in range(len(pairs))]

    @property
    def pairs(self) -> list:
        """This rank's ``(mean_value, weight)`` pairs of the step, in the order they were added."""
        return self._pairs

    def bind(self, collective: _Collective, offset: int) -> None:
        """This step is reduced by ``collective`` (of a read point), its pairs from position ``offset`` on."""
        self._collective, self._offset = collective, offset

    def abandon(self) -> None:
        """No collective will reduce this step (training ended on an error): its values read as this rank's."""
        self._abandoned = True

    @property
    def is_waited(self) -> bool:
        """Whether reading a value waits for nothing (the collective was waited for, or the step abandoned)."""
        return self._abandoned or (self._collective is not None and self._collective.is_waited)

    @property
    def readable(self) -> bool:
        """Whether reading a value waits for nothing but an issued collective (or, abandoned, for nothing)."""
        return self._collective is not None or self._abandoned

    def value(self, index: int, part: int) -> float:
        """Part 0 (mean) or 1 (total weight) of pair ``index`` over all ranks (waits for the collective once).

        Raises:
            RuntimeError: Read before a read point reduced this step.
        """
        if self._collective is not None:
            return self._collective.value(self._offset + index, part)
        if self._abandoned:
            from mlpug.logs import to_number

            return to_number(self._pairs[index][part])
        raise RuntimeError(
            "a value reduced over the ranks was read before its step was reduced: either in a hook of a callback "
            "with reduces_batch_metrics = True (read it in a later hook or callback), or at a batch that no callback "
            "declared as a read point (a callback that reads logs values in batch hooks returns the batches until "
            "its next read from Callback.batches_until_values_read, the same on every rank)"
        )


class StepReductions:
    """The :class:`BatchReduction` s of a run's training steps, the collectives of the read points that reduce
    them and the stop decisions taken from those (see the module docstring).

    A batch boundary reads the stop flags of the collectives issued before the last step (they ran during it, so
    reading does not wait); an epoch end reads all of them and agrees at once (:meth:`DistributedContext.any_rank`).
    """

    def __init__(self, context: DistributedContext):
        self.context = context
        self._pending: list[BatchReduction] = []  # steps not reduced yet, in order
        self._unread: list[tuple[int, _Collective, int]] = []  # (steps trained when issued, collective, stop index)

    def new_step(self) -> BatchReduction:
        """The reduction of the next training step, pending until the next read point."""
        reduction = BatchReduction(self.context)
        self._pending.append(reduction)
        return reduction

    @property
    def has_pending(self) -> bool:
        """Whether steps wait for a read point (the same on every rank)."""
        return bool(self._pending)

    def issue(self, stop: bool, num_steps: int) -> None:
        """The collective of a read point: every pending step's pairs and this rank's stop flag, at once.

        Args:
            stop: This rank asks to stop.
            num_steps: Training steps trained so far (the manager's ``global_iter``).
        """
        pairs: list = []
        offsets = []
        for reduction in self._pending:
            offsets.append(len(pairs))
            pairs.extend(reduction.pairs)
        stop_index = len(pairs)
        pairs.append((1.0 if stop else 0.0, 1.0))
        collective = _Collective(self.context.all_reduce_pairs_async(pairs), len(pairs))
        for reduction, offset in zip(self._pending, offsets):
            reduction.bind(collective, offset)
        self._pending = []
        self._unread.append((num_steps, collective, stop_index))

    def abandon(self) -> None:
        """Training ended on an error: no collective may run any more, so the pending steps' values read as this
        rank's own (e.g. in an emergency checkpoint)."""
        for reduction in self._pending:
            reduction.abandon()
        self._pending = []

    def any_rank_stops(self, stop: bool, num_steps: int, epoch_end: bool = False) -> bool:
        """Whether every rank leaves the loop now (the same answer on every rank).

        Args:
            stop: This rank asks to.
            num_steps: Training steps trained so far: a batch boundary reads the collectives issued before the
                last step.
            epoch_end: At an epoch end: read every collective and agree at once (blocking).
        """
        if epoch_end:
            asked = any(collective.value(index, 0) > 0 for _, collective, index in self._unread)
            self._unread = []
            return self.context.any_rank(stop or asked)
        due = 0
        while due < len(self._unread) and self._unread[due][0] < num_steps:
            due += 1
        if not due:
            return False
        read, self._unread = self._unread[:due], self._unread[due:]
        return any(collective.value(index, 0) > 0 for _, collective, index in read)


def is_pending(value: Any) -> bool:
    """Whether ``value`` is a :class:`ReducedValue` whose step no read point has reduced yet (reading it would
    raise)."""
    return isinstance(value, ReducedValue) and value.is_pending


class ReducedValue:
    """A mean (``part`` 0) or total weight (``part`` 1) over the ranks whose collective may still be running:
    ``item()`` (what :func:`mlpug.logs.to_number` calls) waits for it and returns a Python float."""

    __slots__ = ("_reduction", "_index", "_part")

    def __init__(self, reduction: BatchReduction, index: int, part: int):
        self._reduction, self._index, self._part = reduction, index, part

    def item(self) -> float:
        return self._reduction.value(self._index, self._part)

    def __float__(self) -> float:
        return self.item()

    def __repr__(self) -> str:
        return f"ReducedValue({self.item()!r})" if self._reduction.is_waited else "ReducedValue(pending)"

    @property
    def is_pending(self) -> bool:
        """Whether no read point has reduced this value's step yet (reading it would raise)."""
        return not self._reduction.readable


def free_port() -> int:
    """A TCP port of the loopback address (``127.0.0.1``) that is free now, for the processes a backend's
    ``launch`` starts to meet at (another program may take it before they do: a small race every launcher has)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports of the loopback address that are free now (bound together, so no port is given
    twice), e.g. one per worker of a TensorFlow cluster; the race of :func:`free_port` applies."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


# ----- a launcher's report of a failed run (used by the PyTorch and JAX launch) -----
def first_failure(raised_at: Sequence[float], seen: Sequence[int]) -> int:
    """The process that failed first: the one whose failure the others' failures followed.

    A process that ended without raising (killed by a signal, crashed, ``sys.exit``) comes first: the others'
    collectives fail because it is gone. Among processes that raised, the earliest to raise.

    Args:
        raised_at: Per process, the moment (seconds, any one clock) its function raised, 0 when it did not.
        seen: The processes that ended with a non-zero exit code when the launcher first looked (at least one).

    Returns:
        The index of a process in ``seen``, or one that raised before any in ``seen`` ended.
    """
    candidates = set(seen) | {index for index, moment in enumerate(raised_at) if moment > 0}
    return min(candidates, key=lambda index: (raised_at[index] > 0, raised_at[index], index))


def exit_description(code: Optional[int]) -> str:
    """How a process ended, from its exit code: ``was still running`` (None), ``was killed by signal SIGKILL`` (a
    negative code; the number when it names no signal), ``exited with code 1``."""
    if code is None:
        return "was still running"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def after_first_failure(
    first: int, exit_codes: Sequence[Optional[int]], raised: Sequence[str], terminated: Sequence[int]
) -> str:
    """How the processes other than ``first`` ended, for a launcher's error message:
    ``"\n-- after it: process 0 raised RuntimeError: ...; process 2 was killed by signal SIGTERM (terminated by the
    launcher)"``, or ``""`` when every other process exited with code 0.

    Args:
        first: The process that failed first (:func:`first_failure`).
        exit_codes: Per process, its exit code (None while running).
        raised: Per process, the last line of what its function raised, ``""`` when it did not raise.
        terminated: The processes the launcher terminated.
    """
    others = []
    for index, code in enumerate(exit_codes):
        if index == first or code == 0:
            continue
        how = f"raised {raised[index]}" if raised[index] else exit_description(code)
        others.append(f"process {index} {how}" + (" (terminated by the launcher)" if index in terminated else ""))
    return f"\n-- after it: {'; '.join(others)}" if others else ""
