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
"""Arrays remembered at most (the least recently read are forgotten first): a few windows of per-batch values."""


class HostNumbers:
    """Host values (float64) of scalar arrays and numbers, each device array transferred once while remembered.

    Args:
        capacity: How many arrays to remember at most (int >= 1); the least recently read are forgotten first.

    Thread safety: reads from several threads (a training-window read and an asynchronous dataset evaluation sharing
    one ``MetricEvaluator``) are serialised by a lock.
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
            known = self._values
            new = [value for value in values if isinstance(value, jax.Array) and id(value) not in known]
            if new:
                fetched = jax.device_get(new)
                for array, host in zip(new, fetched):
                    known[id(array)] = (array, float(np.asarray(host, dtype=np.float64).reshape(())))
            numbers = np.empty(len(values), dtype=np.float64)
            for index, value in enumerate(values):
                if isinstance(value, jax.Array):
                    numbers[index] = known[id(value)][1]
                    known.move_to_end(id(value))
                else:
                    numbers[index] = float(np.asarray(value, dtype=np.float64).reshape(()))
            while len(known) > self.capacity:
                known.popitem(last=False)
            return numbers
