"""Checks of the ``TrainingManager`` arguments that need more than one line: batches per epoch and callbacks.

Each raises at construction, with the bad value and what would be right.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from mlpug.data import known_length
from mlpug.trainers.callback import Callback


def check_positive_int(value: Any, name: str) -> int:
    """``value`` when it is an int >= 1 (not a bool).

    Raises:
        ValueError: It is not; the message names the argument and echoes the value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def check_num_batches_per_epoch(training_dataset: Iterable, num_batches_per_epoch: Optional[int]) -> int:
    """The number of batches per epoch: ``num_batches_per_epoch``, or the dataset's ``len()``.

    Raises:
        ValueError: The dataset is empty; it has no known length (e.g. ``tf.data`` after ``filter()``) and no
            ``num_batches_per_epoch`` is given; ``num_batches_per_epoch`` is not an int >= 1 or more than the
            dataset has.
    """
    dataset_type = type(training_dataset).__qualname__
    dataset_length, no_length = known_length(training_dataset)
    if dataset_length == 0:
        raise ValueError(
            f"training_dataset ({dataset_type}) is empty: len() is 0, so there is no batch to train on; check "
            "how it was made (e.g. a filter, a split or drop_last with a batch size larger than the data)"
        )
    if num_batches_per_epoch is None:
        if dataset_length is None:
            raise ValueError(
                f"training_dataset ({dataset_type}) has no known length ({no_length}); give "
                "num_batches_per_epoch, the number of batches that form an epoch"
            )
        num_batches_per_epoch = dataset_length
    check_positive_int(num_batches_per_epoch, "num_batches_per_epoch")
    if dataset_length is not None and num_batches_per_epoch > dataset_length:
        raise ValueError(
            f"num_batches_per_epoch is {num_batches_per_epoch}, but training_dataset has only {dataset_length} "
            "batches; give at most that many, or an iterable that yields enough batches per epoch"
        )
    return num_batches_per_epoch


def check_callbacks(callbacks: Any) -> list[Callback]:
    """``callbacks`` as a new list of Callback instances with unique names.

    Raises:
        TypeError: ``callbacks`` is not None, a list or a tuple (a single callback is named, with the fix), or an
            item is not a Callback.
        ValueError: Two callbacks have the same name (names key their checkpoint state).
    """
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        name = type(callbacks).__qualname__
        raise TypeError(f"callbacks must be a list of Callback instances, got a single {name}; pass [{name}(...)]")
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(
            f"callbacks must be a list of Callback instances, got {type(callbacks).__qualname__}: {callbacks!r:.200}"
        )
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks[{index}] must be an mlpug Callback instance, got {type(callback).__qualname__}: "
                f"{callback!r:.200}"
            )
    names = [callback.name for callback in callbacks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"callback names must be unique (they key checkpoint state); duplicated: {duplicates}")
    return list(callbacks)
