"""What the neutral core needs to know about distribution, behind one small interface.

The single-process case is the :class:`SerialContext` null object, so loop code calls these methods
unconditionally. A data-parallel backend trainer returns its own implementation from
``Trainer.distributed_context()`` (PyTorch: ``mlpug.pytorch.distributed.TorchDistributedContext``), and the
``TrainingManager`` and the ``MetricEvaluator`` use it.

Every rank must issue the collectives of a run in the same order. The core issues them at fixed points that every
rank passes alike, never lazily where a consumer reads a value (consumers such as ``LogProgress`` act on the
primary rank only):

* after every training step, the batch metrics (``MetricEvaluator.reduce``, from the metric loggers' hooks);
* at every batch boundary, whether any rank asks to stop (:meth:`DistributedContext.any_rank`: a stop request
  or a signal), so that all ranks leave the loop after the same batch;
* once per dataset evaluation, the sums and counts of its metrics.

A backend that does not support data-parallel training refuses a launch of several processes
(``mlpug.tensorflow.distributed``) with :func:`several_processes_error`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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

    def all_reduce_weighted(self, pairs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """Sample-weighted means over all ranks: per ``(mean_value, weight)`` pair of this rank, the pair
        ``(sum_r(mean_value_r * weight_r) / sum_r(weight_r), sum_r(weight_r))``, never a mean of means.

        Values and weights may be backend scalars; backends return backend scalars without waiting for the
        device (one collective for all pairs). This default converts to Python numbers. A total weight of 0
        gives the mean ``nan``.
        """
        from mlpug.logs import to_number

        numbers = [(to_number(value), to_number(weight)) for value, weight in pairs]
        sums = self.all_reduce_sum([v * w for v, w in numbers] + [w for _, w in numbers])
        count = len(numbers)
        return [(sums[i] / sums[count + i] if sums[count + i] else float("nan"), sums[count + i]) for i in range(count)]


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


def several_processes_error(launch: str, single_process: str) -> RuntimeError:
    """The error of a backend whose launcher started several processes, while data-parallel training is not supported.

    Args:
        launch: What the launcher's environment says, e.g. ``"torchrun started 2 processes (WORLD_SIZE=2, ...)"``.
        single_process: How to run one process instead, e.g. ``"python script.py"``.

    Returns:
        A ``RuntimeError`` saying that every process would train alone.
    """
    return RuntimeError(
        f"{launch}, but mlpug does not support data-parallel training yet: every process would train alone on the "
        f"same data, print the same progress and write the same checkpoint files. Run one process ({single_process})."
    )
