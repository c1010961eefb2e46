"""TensorFlow distribution strategies (see :mod:`mlpug.trainers.strategy`): :class:`TFDistributeStrategy`, a
``tf.distribute`` strategy behind mlpug's protocol.

The model components and optimizers must be created in the ``tf.distribute`` strategy's scope before the trainer is,
so a strategy is always given as an object (``strategy=tf.distribute.MirroredStrategy()``, created first, or a
``TFDistributeStrategy`` over it); the only name is ``"single_process"``.
"""

from __future__ import annotations

from typing import Any

from mlpug.tensorflow.strategies.tf_distribute import TFDistributeStrategy
from mlpug.trainers.strategy import SingleProcess, Strategy, check_not_a_class

STRATEGY_NAMES = ("single_process",)
"""The names ``DefaultTrainer(strategy=...)`` takes."""


def resolve_strategy(strategy: Any) -> TFDistributeStrategy:
    """The :class:`TFDistributeStrategy` that ``DefaultTrainer(strategy=...)`` names.

    Args:
        strategy: None or ``"single_process"`` (one device; ``TF_CONFIG`` with a cluster of several tasks is an
            error), a ``tf.distribute.MirroredStrategy`` / ``MultiWorkerMirroredStrategy`` (in whose scope the model
            components and optimizers were created), a ``TFDistributeStrategy`` (or a subclass) used as it is, or
            mlpug's ``SingleProcess`` (the same as None).

    Raises:
        ValueError: A name other than ``"single_process"`` (a ``tf.distribute`` strategy must be created, and the
            model and optimizer in its scope, before the trainer).
        TypeError: Another mlpug ``Strategy`` (on TensorFlow the replicated step, the scope and the gradient
            all-reduce are a ``tf.distribute`` strategy's: subclass ``TFDistributeStrategy``), a class instead of
            an object, or not a strategy at all.
        NotImplementedError / RuntimeError: See :class:`TFDistributeStrategy`.
    """
    if isinstance(strategy, TFDistributeStrategy):
        return strategy
    if type(strategy) is SingleProcess or strategy is None or strategy == "single_process":
        return TFDistributeStrategy(None)
    if isinstance(strategy, Strategy):
        raise TypeError(
            f"strategy is a {type(strategy).__qualname__}, an mlpug Strategy that is not a TFDistributeStrategy: on "
            "TensorFlow the replicated step, the variables' scope and the gradient all-reduce are a tf.distribute "
            "strategy's; subclass mlp.strategies.TFDistributeStrategy to change what a strategy does"
        )
    check_not_a_class(strategy)
    if isinstance(strategy, str):
        raise ValueError(
            f"strategy {strategy!r} is not a TensorFlow strategy name (the names are {STRATEGY_NAMES}): create the "
            "tf.distribute strategy first (e.g. strategy = tf.distribute.MirroredStrategy()), the model and "
            "optimizer in its scope, and pass strategy=strategy"
        )
    return TFDistributeStrategy(strategy)


__all__ = ["STRATEGY_NAMES", "Strategy", "TFDistributeStrategy", "resolve_strategy"]
