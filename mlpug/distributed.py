"""What the neutral core needs to know about distribution, behind one small interface.

The single-process case is the :class:`SerialContext` null object, so loop code calls these methods
unconditionally. A data-parallel backend trainer returns its own implementation from
``BackendTrainer.distributed_context()`` (PyTorch: ``mlpug.pytorch.distributed.TorchDistributedContext``), and the
``TrainingManager`` and the ``MetricEvaluator`` use it.

Every rank must issue the collectives of a run in the same order. The core issues them at fixed points that every
rank passes alike, never lazily where a consumer reads a value (consumers such as ``LogProgress`` act on the
primary rank only):

* once per training step, one :class:`BatchReduction`: the batch loss (for the non-finite loss checks), the batch
  metrics of the metric loggers (added in their batch-end hooks, which run before those of every other callback)
  and whether this rank asks to stop (a stop request or a signal), in **one asynchronous collective**. Its values
  wait for it when first read, where consumers read values anyway; the stop flag is read two batch
  boundaries later (its collective ran meanwhile, so reading does not wait): a stop takes effect two batches after
  it was asked for, on every rank at the same batch;
* at every epoch end, whether any rank asks to stop (:meth:`DistributedContext.any_rank`);
* once per dataset evaluation, the sums and counts of its metrics.

Why one asynchronous collective per step rather than blocking ones: ``docs/design-notes.md``.
"""

from __future__ import annotations

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


class BatchReduction:
    """The one collective of a training step in data-parallel training (see the module docstring).

    The manager creates one per step and adds the batch loss; the metric loggers add their metric pairs
    (:meth:`add`) in their batch-end hooks; then the manager issues it (:meth:`issue`) with its stop flag, before
    the batch-end hooks of every other callback. Every rank adds the same pairs in the same order.

    Args:
        context: The distributed context whose :meth:`DistributedContext.all_reduce_pairs_async` reduces.
    """

    def __init__(self, context: DistributedContext):
        self.context = context
        self._pairs: list = []
        self._result: Optional[Callable[[], list[float]]] = None
        self._numbers: Optional[list] = None

    def add(self, pairs: Sequence[tuple[Any, Any]]) -> list[tuple[ReducedValue, ReducedValue]]:
        """Add this rank's ``(mean_value, weight)`` pairs; return their values over all ranks, ``(mean, total
        weight)`` as :class:`ReducedValue` s, readable once the reduction is issued.

        Raises:
            RuntimeError: The reduction was issued already (every rank must add before the manager issues it).
        """
        if self._result is not None:
            raise RuntimeError(
                "this step's metric reduction was issued already: a callback that reduces batch metrics must do so "
                "in on_batch_training_completed and set reduces_batch_metrics = True, so that it runs before it"
            )
        start = len(self._pairs)
        self._pairs.extend(pairs)
        return [(ReducedValue(self, start + i, 0), ReducedValue(self, start + i, 1)) for i in range(len(pairs))]

    def issue(self, stop: bool) -> None:
        """Issue the collective of everything added, with this rank's stop flag."""
        self._result = self.context.all_reduce_pairs_async([*self._pairs, (1.0 if stop else 0.0, 1.0)])

    def any_rank_stops(self) -> bool:
        """Whether any rank asked to stop when the reduction was issued (waits for it)."""
        return self.value(len(self._pairs), 0) > 0

    def value(self, index: int, part: int) -> float:
        """Part 0 (mean) or 1 (total weight) of pair ``index`` over all ranks (waits for the collective once).

        Raises:
            RuntimeError: Read before the reduction was issued.
        """
        if self._numbers is None:
            if self._result is None:
                raise RuntimeError(
                    "a value reduced over the ranks was read before this step's reduction was issued (in a hook of a "
                    "callback with reduces_batch_metrics = True?): read it in a later hook or callback"
                )
            self._numbers = _means(self._result(), len(self._pairs) + 1)
        return self._numbers[index][part]


class StepReductions:
    """The :class:`BatchReduction` s of a run's training steps and the stop decisions taken from them.

    A batch boundary reads the stop flags of the step before the last one (its collective ran during the last
    step, so reading does not wait: a stop takes effect two batches after it was asked for, on every rank at the
    same batch); an epoch end agrees at once (:meth:`DistributedContext.any_rank`).
    """

    def __init__(self, context: DistributedContext):
        self.context = context
        self._older: Optional[BatchReduction] = None
        self._latest: Optional[BatchReduction] = None

    def new_step(self) -> BatchReduction:
        """The reduction of the next training step."""
        self._older, self._latest = self._latest, BatchReduction(self.context)
        return self._latest

    def any_rank_stops(self, stop: bool, epoch_end: bool = False) -> bool:
        """Whether every rank leaves the loop now; ``stop``: this rank asks to."""
        if epoch_end:
            asked = any(
                reduction is not None and reduction.any_rank_stops() for reduction in (self._older, self._latest)
            )
            return self.context.any_rank(stop or asked)
        return self._older is not None and self._older.any_rank_stops()


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
        return f"ReducedValue({'pending' if self._reduction._numbers is None else self.item()!r})"
