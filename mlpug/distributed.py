"""What the neutral core needs to know about distribution, behind one small interface.

The single-process case is the :class:`SerialContext` null object, so loop code calls these methods
unconditionally. Data-parallel backends provide their own implementation.
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
