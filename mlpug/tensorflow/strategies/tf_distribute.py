"""``TFDistributeStrategy``: a ``tf.distribute`` strategy behind mlpug's neutral strategy protocol."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import tensorflow as tf

from mlpug.distributed import DistributedContext
from mlpug.tensorflow.distributed import (
    check_cluster,
    resolve_strategy,
    shard_evaluation_dataset,
    shard_training_dataset,
    strategy_context,
)
from mlpug.trainers.strategy import Strategy


class TFDistributeStrategy(Strategy):
    """Training under a ``tf.distribute`` strategy: the variables created in its :meth:`scope` are mirrored, the step
    runs in every replica and the replicas' gradients are all-reduced in it (the trainer's ``ReplicatedStep``); with
    several workers each trains and evaluates its shard of the data (see :mod:`mlpug.tensorflow.distributed`).

    Args:
        tf_strategy: A ``tf.distribute.MirroredStrategy`` (several devices of one process) or
            ``tf.distribute.MultiWorkerMirroredStrategy`` (several workers, ``TF_CONFIG``); None, or TensorFlow's
            default strategy, is one device.

    Raises:
        TypeError / NotImplementedError: Another kind of ``tf.distribute`` strategy, or not a strategy.
        RuntimeError: ``TF_CONFIG`` describes a cluster of several tasks, but ``tf_strategy`` is not a
            ``MultiWorkerMirroredStrategy``.
    """

    def __init__(self, tf_strategy: Any = None):
        resolved = resolve_strategy(tf_strategy)
        check_cluster(resolved)
        self.tf_strategy: Optional[tf.distribute.Strategy] = resolved
        if resolved is None:
            self.name = "single_process"
        elif isinstance(resolved, tf.distribute.MultiWorkerMirroredStrategy):
            self.name = "multi_worker_mirrored"
        else:
            self.name = "mirrored"
        self._context = strategy_context(resolved)

    def distributed_context(self) -> DistributedContext:
        return self._context

    def scope(self) -> AbstractContextManager:
        """The ``tf.distribute`` strategy's scope (variables created in it are mirrored), or a do-nothing context."""
        return self.tf_strategy.scope() if self.tf_strategy is not None else nullcontext()

    def training_dataset(self, dataset: Any) -> Any:
        """Several workers: this worker's shard (see :func:`mlpug.tensorflow.distributed.shard_training_dataset`)."""
        if self._context.world_size > 1:
            return shard_training_dataset(dataset, self._context)
        return dataset

    def evaluation_dataset(self, dataset: Any) -> Any:
        """Several workers: this worker's unpadded shard (see
        :func:`mlpug.tensorflow.distributed.shard_evaluation_dataset`)."""
        if self._context.world_size > 1:
            return shard_evaluation_dataset(dataset, self._context)
        return dataset
