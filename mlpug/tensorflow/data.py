"""TensorFlow adapters of the resumable data order (:mod:`mlpug.data`).

:class:`ResumableArrayBatches` slices in-memory arrays into batches of tensors in an order that depends only on
``(seed, epoch)`` and can start at any batch, so that resuming mid-epoch is exact without replaying batches.
A ``tf.data.Dataset`` cannot start at a position; the manager skips its batches (with a warning) instead, and
:func:`training_data_source` makes infinite and reshuffled pipelines resume exactly where their seeds allow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Optional

import tensorflow as tf

from mlpug.data import ContinuedDataSource, DataSource, ReplayedDataSource, ResumableBatchSampler
from mlpug.data import ResumableArrayBatches as _NeutralResumableArrayBatches
from mlpug.prefetch import BackgroundPrefetcher

__all__ = ["BackgroundPrefetcher", "ResumableArrayBatches", "ResumableBatchSampler", "training_data_source"]

_log = logging.getLogger("mlpug.tensorflow.data")


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


def pipeline_stages(dataset: tf.data.Dataset) -> list:
    """``dataset`` and every dataset it is built from (through the private ``_inputs()`` of tf.data)."""
    found, pending = [], [dataset]
    while pending:
        node = pending.pop()
        found.append(node)
        pending.extend(getattr(node, "_inputs", lambda: [])())
    return found


def _unseeded_shuffles(datasets: list) -> int:
    """How many shuffle stages have neither an op seed nor a global seed (their order differs in every process)."""
    unseeded = 0
    for node in datasets:
        if "Shuffle" in type(node).__name__:
            seeds = [int(getattr(node, name, 0) or 0) for name in ("_seed", "_seed2")]
            unseeded += all(seed == 0 for seed in seeds)
    return unseeded


def training_data_source(dataset: Any) -> DataSource:
    """The :class:`mlpug.data.DataSource` for a TensorFlow training dataset.

    * an infinite ``tf.data.Dataset`` (``repeat()``): one iterator for the whole run
      (:class:`~mlpug.data.ContinuedDataSource`), every epoch continuing where the last one ended;
    * a pipeline with ``shuffle``: a resumed process re-creates the iterators of the earlier epochs first
      (:class:`~mlpug.data.ReplayedDataSource`), so the reshuffled order of every epoch is the original one; a
      shuffle with no seed at all (neither ``shuffle(seed=...)`` nor ``tf.random.set_seed`` /
      ``keras.utils.set_random_seed`` before the pipeline was built) has another order in every process, which
      is said once, here, at the start;
    * anything else: :class:`~mlpug.data.DataSource` (iterated anew every epoch, skipped forward on resume).
    """
    if not isinstance(dataset, tf.data.Dataset):
        return DataSource(dataset)
    pipeline = pipeline_stages(dataset)
    if _unseeded_shuffles(pipeline):
        _log.warning(
            "The training tf.data pipeline shuffles without a seed, so its order differs in every process: resuming "
            "from a checkpoint will not continue with the same batches. Seed it (tf.data.Dataset.shuffle(..., "
            "seed=...), or keras.utils.set_random_seed(...) before building it), or use "
            "mlp.data.ResumableArrayBatches."
        )
    if int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        return ContinuedDataSource(dataset)
    if not any("Shuffle" in type(node).__name__ for node in pipeline):
        return DataSource(dataset)
    return ReplayedDataSource(dataset)
