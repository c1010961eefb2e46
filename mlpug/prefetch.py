"""``BackgroundPrefetcher``: prepare the next batches of any iterable on a background thread.

While the training step runs, a thread takes the next ``num_prefetch`` batches from the wrapped iterable (loading,
decoding, augmenting them), so that a slow loader overlaps with training instead of adding to it. It helps when the
loader's work releases the GIL (NumPy, PIL, file reads, ``time.sleep``-like waits) or when the step runs in native
code (the backends' kernels do).

* **Order and content** are those of the wrapped iterable; an exception raised while loading is re-raised in the
  training loop at the batch where it happened, with its traceback.
* **Resumable position preserved**: the wrapper exposes the wrapped dataset's order (``batch_sampler``: its
  :func:`mlpug.data.find_resumable` object; ``sampler``; ``set_epoch``), so the manager sets the epoch and start
  batch of a resumable dataset before the thread starts iterating, and checkpoints hold its order. Prefetching
  ahead does not move the position, which the manager's counters hold.
* **Clean shutdown**: the thread stops when the epoch's iterator is exhausted, closed (``close()``: the manager
  closes an epoch's iterator that training leaves early, on a stop, a signal or an error) or dropped, and never
  outlives it by more than one ``put`` time-out (0.1 s).
* The **first batch** of every pass is taken on the caller's thread (when ``iter()`` is called), so that an order
  drawn from the global random generators when iteration starts is drawn where the manager restored them.

A loader that draws from the global random generators (Python ``random``, ``np.random``, ``torch`` without a
generator) draws them on the thread, interleaved with the training's draws in no fixed order: runs are then not
repeatable and a resume is not exact. Give such augmentation its own generator (e.g. seeded by epoch and batch).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Optional

from mlpug.data import find_resumable

__all__ = ["BackgroundPrefetcher"]

_ITEM, _ERROR = 0, 2
_END: Any = object()  # the end of a pass; also: no first batch pending
_PUT_TIMEOUT_S = 0.1


def _fill(source: Iterator, items: queue.Queue, stop: threading.Event) -> None:
    """The thread's work; holds no reference to the consumer's iterator, so dropping that one stops it."""
    try:
        for item in source:
            while not stop.is_set():
                try:
                    items.put((_ITEM, item), timeout=_PUT_TIMEOUT_S)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        message: tuple = (_END, None)
    except BaseException as error:  # re-raised in the training loop
        message = (_ERROR, error)
    while not stop.is_set():
        try:
            items.put(message, timeout=_PUT_TIMEOUT_S)
            return
        except queue.Full:
            continue


class _PrefetchIterator:
    def __init__(self, source: Iterator, num_prefetch: int, name: str):
        self._items: queue.Queue = queue.Queue(maxsize=num_prefetch)
        self._stop = threading.Event()
        self._done = False
        # The first batch on the caller's thread: an iterable that draws its order from the global generators when
        # iteration starts (DataLoader(shuffle=True) draws its sampler's seed at the first batch) draws it here,
        # where the manager restored the random states, not on the thread.
        try:
            self._first: Any = next(source)
        except StopIteration:
            self._done = True
            self._first = _END
        self._thread = threading.Thread(target=_fill, args=(source, self._items, self._stop), name=name, daemon=True)
        if not self._done:
            self._thread.start()

    def __iter__(self) -> _PrefetchIterator:
        return self

    def __next__(self) -> Any:
        if self._first is not _END:
            first, self._first = self._first, _END
            return first
        if self._done:
            raise StopIteration
        kind, value = self._items.get()
        if kind == _ITEM:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread and wait for it (at most about the put time-out)."""
        self._done = True
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * _PUT_TIMEOUT_S + 1.0)

    def __del__(self) -> None:
        self._stop.set()


class BackgroundPrefetcher:
    """Wraps an iterable of batches so that the next ``num_prefetch`` are prepared on a background thread.

    Args:
        dataset: Any iterable of batches (a ``DataLoader``, ``mlp.data.ResumableArrayBatches``, a generator
            factory's iterable, a list ...); iterated anew by every ``iter()``.
        num_prefetch: How many batches may wait ready (int >= 1; default 2). Memory: that many batches more.
        name: The thread's name (default ``"mlpug-prefetch"``).

    Raises:
        ValueError: ``num_prefetch`` is not an int >= 1.
        TypeError: ``dataset`` is not iterable.
    """

    def __init__(self, dataset: Iterable, num_prefetch: int = 2, name: Optional[str] = None):
        if isinstance(num_prefetch, bool) or not isinstance(num_prefetch, int) or num_prefetch < 1:
            raise ValueError(f"num_prefetch must be an int >= 1, got {num_prefetch!r}")
        if not hasattr(dataset, "__iter__"):
            raise TypeError(f"dataset must be an iterable of batches, got {type(dataset).__qualname__}")
        self.dataset = dataset
        self.num_prefetch = num_prefetch
        self.name = name or "mlpug-prefetch"

    def __iter__(self) -> Iterator:
        return _PrefetchIterator(iter(self.dataset), self.num_prefetch, self.name)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # TypeError like the dataset's when it has none

    @property
    def batch_sampler(self) -> Any:
        """The wrapped dataset's resumable order (see :func:`mlpug.data.find_resumable`), or None."""
        return find_resumable(self.dataset)

    @property
    def sampler(self) -> Any:
        return getattr(self.dataset, "sampler", None)

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the wrapped dataset (or its ``sampler``, e.g. a ``DistributedSampler``)."""
        for candidate in (self.dataset, getattr(self.dataset, "sampler", None)):
            set_epoch = getattr(candidate, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
                return
