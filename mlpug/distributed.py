"""What the neutral core needs to know about distribution, behind one small interface.

The single-process case is the :class:`SerialContext` null object, so loop code calls these methods
unconditionally. Data-parallel backends provide their own implementation. Until a backend supports data-parallel
training, its ``DefaultTrainer`` refuses a launch of several processes (``mlpug.<backend>.distributed``) with
:func:`several_processes_error`.
"""

from __future__ import annotations

from collections.abc import Sequence


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


class SerialContext(DistributedContext):
    """The single-process null object: rank 0 of a world of 1; collectives return their input."""

    def barrier(self) -> None:
        pass

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def any_rank(self, flag: bool) -> bool:
        return flag


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
