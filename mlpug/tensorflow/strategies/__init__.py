"""TensorFlow distribution strategies (see :mod:`mlpug.trainers.strategy`): ``"single_process"``, ``"mirrored"``,
``"multi_worker_mirrored"``, each a :class:`TFDistributeStrategy` over the ``tf.distribute`` strategy of that name."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from mlpug.tensorflow.strategies.tf_distribute import TFDistributeStrategy
from mlpug.trainers.strategy import SingleProcess, Strategy

STRATEGY_NAMES = ("single_process", "mirrored", "multi_worker_mirrored")
"""The names ``DefaultTrainer(strategy=...)`` takes."""


def resolve_strategy(strategy: Any) -> Strategy:
    """The :class:`~mlpug.trainers.strategy.Strategy` that ``DefaultTrainer(strategy=...)`` names.

    Args:
        strategy: None (default): one device (``TF_CONFIG`` with a cluster of several tasks is an error, as without
            a strategy); a name of :data:`STRATEGY_NAMES` (``"mirrored"``: ``tf.distribute.MirroredStrategy()``
            over this process's devices; ``"multi_worker_mirrored"``: ``MultiWorkerMirroredStrategy()`` from
            ``TF_CONFIG``); a ``tf.distribute`` strategy object; or an mlpug ``Strategy`` object (used as it is).

    Raises:
        ValueError: An unknown name (the valid ones are listed).
        TypeError / NotImplementedError / RuntimeError: See :class:`TFDistributeStrategy`.
    """
    if isinstance(strategy, Strategy):
        return strategy
    if strategy is None or strategy == "single_process":
        return TFDistributeStrategy(None)
    if isinstance(strategy, str):
        if strategy == "mirrored":
            return TFDistributeStrategy(tf.distribute.MirroredStrategy())
        if strategy == "multi_worker_mirrored":
            return TFDistributeStrategy(tf.distribute.MultiWorkerMirroredStrategy())
        raise ValueError(f"strategy {strategy!r} is unknown; the TensorFlow strategies are {STRATEGY_NAMES}")
    return TFDistributeStrategy(strategy)


__all__ = ["STRATEGY_NAMES", "SingleProcess", "Strategy", "TFDistributeStrategy", "resolve_strategy"]
