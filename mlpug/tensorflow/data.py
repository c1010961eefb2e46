"""TensorFlow adapters of the resumable data order (:mod:`mlpug.data`).

:class:`ResumableArrayBatches` slices in-memory arrays into batches of tensors in an order that depends only on
``(seed, epoch)`` and can start at any batch, so that resuming mid-epoch is exact without replaying batches.
A ``tf.data.Dataset`` cannot start at a position; the manager skips its batches (with a warning) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import tensorflow as tf

from mlpug.data import ResumableArrayBatches as _NeutralResumableArrayBatches
from mlpug.data import ResumableBatchSampler

__all__ = ["ResumableArrayBatches", "ResumableBatchSampler"]


class ResumableArrayBatches(_NeutralResumableArrayBatches):
    __doc__ = (_NeutralResumableArrayBatches.__doc__ or "") + (
        "\n    TensorFlow: batches are converted with ``tf.convert_to_tensor`` by default.\n"
    )

    def __init__(
        self,
        arrays: Sequence[Any],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        convert: Optional[Callable[[Any], Any]] = tf.convert_to_tensor,
    ):
        super().__init__(arrays, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, convert=convert)
