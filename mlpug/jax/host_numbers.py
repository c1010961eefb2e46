"""``HostNumbers``: the host values of scalar device arrays, each transferred once.

A sliding-window average is read every few batches over the same per-batch arrays (up to an epoch of them, for every
metric); reading every array again at each read costs a host transfer per array (about 9 us each on a CPU).
``HostNumbers`` keeps the value of each array it has read for as long as the array lives (a weak reference, so it
holds no array and needs no capacity), so that each read transfers only the arrays it has not seen.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import numpy as np


def _number(value: Any) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(()))


class HostNumbers:
    """Host values (float64) of scalar arrays and numbers, each device array transferred once while it lives.

    Thread safety: reads from several threads (a training-window read and an asynchronous dataset evaluation sharing
    one ``MetricEvaluator``) may run at once: the transfer runs outside the lock, every read takes the values it
    found or fetched into a dict of its own, and an entry is removed only when its array is garbage collected (an
    array two reads transfer at once is transferred twice, with the same value).
    """

    def __init__(self) -> None:
        self._values: dict[int, tuple[weakref.ref, float]] = {}
        self._lock = threading.RLock()  # a forgetting callback may run inside a locked section of the same thread

    def __len__(self) -> int:
        """The number of arrays whose values are kept."""
        return len(self._values)

    def _forget(self, key: int) -> Callable[[weakref.ref], None]:
        def forget(reference: weakref.ref) -> None:
            with self._lock:
                entry = self._values.get(key)
                if entry is not None and entry[0] is reference:
                    del self._values[key]

        return forget

    def _known(self, array: jax.Array) -> Optional[float]:
        entry = self._values.get(id(array))
        return entry[1] if entry is not None and entry[0]() is array else None

    def read(self, values: Sequence[Any]) -> np.ndarray:
        """``values`` as a float64 vector: 0-d (or one-element) ``jax.Array`` s, NumPy values or Python numbers.

        One host transfer for all arrays not read before (``jax.device_get``); this waits for the device only when
        such an array is still being computed.
        """
        arrays = {id(value): value for value in values if isinstance(value, jax.Array)}
        with self._lock:
            found = {key: self._known(array) for key, array in arrays.items()}
        numbers = {key: number for key, number in found.items() if number is not None}
        new = [array for key, array in arrays.items() if key not in numbers]
        if new:
            fetched = [_number(host) for host in jax.device_get(new)]
            with self._lock:
                for array, number in zip(new, fetched):
                    key = id(array)
                    numbers[key] = number
                    self._values[key] = (weakref.ref(array, self._forget(key)), number)
        return np.array(
            [numbers[id(value)] if isinstance(value, jax.Array) else _number(value) for value in values],
            dtype=np.float64,
        )
