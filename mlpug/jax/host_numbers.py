"""``HostNumbers``: the host values of scalar device arrays, each transferred once.

A sliding-window average is read every few batches over the same per-batch arrays (up to an epoch of them); reading
every array again at each read costs a host transfer per array (about 9 us each on a CPU). ``HostNumbers`` keeps the
value of each array it has read, keyed by the array object, which it holds (so an array's ``id`` cannot be reused
while its entry exists), so that each read transfers only the arrays it has not seen.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

DEFAULT_CAPACITY = 8192
"""Arrays remembered at least (the least recently read beyond it are forgotten first); a read of more arrays than this
keeps all of them, so that a window longer than the capacity, read again, transfers only its new values."""


class HostNumbers:
    """Host values (float64) of scalar arrays and numbers, each device array transferred once while remembered.

    Args:
        capacity: How many arrays to remember at least (int >= 1); at most the larger of this and twice the arrays of
            the latest read. The least recently read are forgotten first.

    Thread safety: reads from several threads (a training-window read and an asynchronous dataset evaluation sharing
    one ``MetricEvaluator``) may run at once; the transfer runs outside the lock, and an array two reads transfer at
    once is transferred twice (the same value).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._values: collections.OrderedDict[int, tuple[jax.Array, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def read(self, values: Sequence[Any]) -> np.ndarray:
        """``values`` as a float64 vector: 0-d (or one-element) ``jax.Array`` s, NumPy values or Python numbers.

        One host transfer for all arrays not read before (``jax.device_get``); this waits for the device only when
        such an array is still being computed.
        """
        with self._lock:
            new = [value for value in values if isinstance(value, jax.Array) and id(value) not in self._values]
        fetched = {
            id(array): (array, float(np.asarray(host, dtype=np.float64).reshape(())))
            for array, host in zip(new, jax.device_get(new) if new else [])
        }
        with self._lock:
            known = self._values
            known.update(fetched)
            numbers = np.empty(len(values), dtype=np.float64)
            for index, value in enumerate(values):
                if isinstance(value, jax.Array):
                    numbers[index] = known[id(value)][1]
                    known.move_to_end(id(value))
                else:
                    numbers[index] = float(np.asarray(value, dtype=np.float64).reshape(()))
            capacity = max(self.capacity, 2 * len(values))
            while len(known) > capacity:
                known.popitem(last=False)
            return numbers
