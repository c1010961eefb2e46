"""``ReadPoints``: the batches at which the ``TrainingManager`` reduces the steps' values over the ranks.

With several ranks a step's batch loss and batch metrics stay on their rank until a *read point*, where one
collective reduces every step since the last one (:class:`mlpug.distributed.StepReductions`). A batch is a read
point when a callback reads values reduced over the ranks in its batch hooks (``Callback.batches_until_values_read``:
``LogProgress`` and ``Tensorboard`` at their log periods, a batch-level ``CheckpointManager`` at its periods, a
callback of your own that declares nothing and implements a batch hook after every batch), when it is the last
batch of its epoch (the epoch-end hooks read), and at least every ``check_stop_every`` batches (global iterations
``check_stop_every - 1``, ``2 * check_stop_every - 1``, ...), so that a stop asked for on one rank reaches every
rank within a bounded number of batches. Every answer depends only on the global iteration (and on what every rank
declares alike), so every rank has the same read points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from mlpug.trainers.callback import Callback


class ReadPoints:
    """The read points of a run with several ranks (see the module docstring).

    Args:
        callbacks: The run's callbacks; each may declare reads (``batches_until_values_read``).
        check_stop_every: A read point at least every this many batches (>= 1).
    """

    def __init__(self, callbacks: Sequence[Callback], check_stop_every: int):
        self.callbacks = list(callbacks)
        self.check_stop_every = check_stop_every
        self._next: Optional[int] = None  # the global iteration of the next read point, when known

    def forget(self) -> None:
        """Ask the callbacks again at the next batch (the counters were set: a resume)."""
        self._next = None

    def is_read_point(self, global_iter: int, last_of_epoch: bool) -> bool:
        """Whether the hooks of the batch with global iteration ``global_iter`` (0-based) read reduced values.

        Args:
            global_iter: The batch just trained.
            last_of_epoch: It is the last batch of its epoch.
        """
        if self._next is None or self._next < global_iter:
            self._next = self._next_read_point(global_iter)
        if global_iter == self._next or last_of_epoch:
            self._next = None  # asked again from the next batch on
            return True
        return False

    def _next_read_point(self, global_iter: int) -> int:
        """The first read point at or after ``global_iter``."""
        period = self.check_stop_every
        point = global_iter + period - 1 - global_iter % period  # the scheduled stop check
        for callback in self.callbacks:
            batches = callback.batches_until_values_read(global_iter)
            if batches is not None:
                point = min(point, global_iter + max(batches, 1) - 1)
        return point
