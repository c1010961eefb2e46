"""JAX distribution strategies (see :mod:`mlpug.trainers.strategy` and :class:`JaxStrategy`): ``"single_process"``
(one device, :class:`SingleDevice`) and ``"data_parallel"`` (a batch split over a ``jax.sharding.Mesh`` of devices,
the training state replicated: :class:`DataParallelStrategy`), in one process or in several
(``jax.distributed.initialize``, see :mod:`mlpug.jax.distributed`).
"""

from __future__ import annotations

from typing import Union

import jax

from mlpug.jax.strategies.data_parallel import DataParallelStrategy
from mlpug.jax.strategies.jax_strategy import JaxStrategy
from mlpug.jax.strategies.single_device import SingleDevice
from mlpug.trainers.strategy import SingleProcess, Strategy, check_not_a_class

STRATEGY_NAMES = ("single_process", "data_parallel")
"""The names ``DefaultTrainer(strategy=...)`` takes."""

StrategyArgument = Union[str, Strategy, None]


def resolve_strategy(strategy: StrategyArgument) -> JaxStrategy:
    """The :class:`JaxStrategy` that ``DefaultTrainer(strategy=...)`` names.

    Args:
        strategy: None (default): ``"data_parallel"`` when several JAX processes run (``jax.distributed.initialize``
            was called, ``jax.process_count() > 1``), else ``"single_process"``; a name of :data:`STRATEGY_NAMES`
            (``"data_parallel"``: a :class:`DataParallelStrategy` over all devices); a :class:`JaxStrategy` (used as
            it is); or mlpug's ``SingleProcess`` (the same as ``"single_process"``).

    Raises:
        ValueError: An unknown name (the names are listed); ``"single_process"`` while several JAX processes run
            (each would train alone on the same data and write the same files).
        TypeError: A class instead of an object, an mlpug ``Strategy`` of another backend, or not a strategy.
    """
    check_not_a_class(strategy)
    num_processes = jax.process_count()
    if isinstance(strategy, JaxStrategy) and not isinstance(strategy, SingleProcess):
        return strategy
    if strategy is None:
        return DataParallelStrategy() if num_processes > 1 else SingleDevice()
    if strategy == "single_process" or isinstance(strategy, SingleProcess):
        if num_processes > 1:
            raise ValueError(
                f"strategy {strategy!r:.100} trains in one process, but jax.process_count() is {num_processes}: "
                f"each of the {num_processes} processes would train alone on the same data and write the same "
                "checkpoint files; leave strategy out (or pass 'data_parallel') to train together, or run one process "
                "(without jax.distributed.initialize())"
            )
        return strategy if isinstance(strategy, SingleDevice) else SingleDevice()
    if strategy == "data_parallel":
        return DataParallelStrategy()
    if isinstance(strategy, str):
        raise ValueError(
            f"strategy {strategy!r} is not a JAX strategy name; the names are {STRATEGY_NAMES} (data parallel "
            "training on JAX is 'data_parallel': a batch split over a jax.sharding.Mesh of the devices)"
        )
    if isinstance(strategy, Strategy):
        raise TypeError(
            f"strategy is a {type(strategy).__qualname__}, an mlpug Strategy that is not a JAX strategy: on JAX a "
            "strategy also places the step's arrays; subclass mlp.strategies.JaxStrategy (or DataParallelStrategy), "
            f"or pass one of {STRATEGY_NAMES}"
        )
    raise TypeError(
        f"strategy must be None, one of {STRATEGY_NAMES} or a JaxStrategy, got a "
        f"{type(strategy).__module__}.{type(strategy).__qualname__}: {strategy!r:.100}"
    )


__all__ = [
    "STRATEGY_NAMES",
    "DataParallelStrategy",
    "JaxStrategy",
    "SingleDevice",
    "SingleProcess",
    "Strategy",
    "resolve_strategy",
]
