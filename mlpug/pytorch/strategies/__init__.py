"""PyTorch distribution strategies (see :mod:`mlpug.trainers.strategy`): ``"single_process"``, ``"ddp"``,
``"fsdp"``."""

from __future__ import annotations

from typing import Union

from mlpug.pytorch.distributed import environment_world_size
from mlpug.pytorch.strategies.ddp import DDPStrategy
from mlpug.pytorch.strategies.fsdp import FSDPStrategy
from mlpug.trainers.strategy import SingleProcess, Strategy, check_not_a_class

STRATEGY_NAMES = ("single_process", "ddp", "fsdp")
"""The names ``DefaultTrainer(strategy=...)`` takes."""

StrategyArgument = Union[str, Strategy, None]


def resolve_strategy(strategy: StrategyArgument) -> Strategy:
    """The :class:`~mlpug.trainers.strategy.Strategy` that ``DefaultTrainer(strategy=...)`` names.

    Args:
        strategy: None (default): ``"ddp"`` under a data-parallel launch (``WORLD_SIZE`` > 1, or a process group of
            several ranks that the script initialised), else ``"single_process"``; a name of
            :data:`STRATEGY_NAMES`; or a ``Strategy`` object (used as it is).

    Raises:
        ValueError: An unknown name (the valid ones are listed); ``"ddp"`` or ``"fsdp"`` without a data-parallel
            launch;
            ``"single_process"`` (or a ``SingleProcess``) under a launch of several processes, where every process
            would train alone on the same data and write the same files.
        TypeError: Neither None, a str nor a ``Strategy`` object (e.g. a class).
    """
    check_not_a_class(strategy)
    if strategy == "single_process" or isinstance(strategy, SingleProcess):
        if _launched_with_several_ranks():
            raise ValueError(
                f"strategy {strategy!r:.100} trains in one process, but this is one of a data-parallel launch "
                "(WORLD_SIZE > 1): every process would train alone on the same data and write the same files; leave "
                "strategy out (or pass 'ddp') to train together, or run one process"
            )
        return strategy if isinstance(strategy, SingleProcess) else SingleProcess()
    if isinstance(strategy, Strategy):
        return strategy
    if strategy is None:
        return DDPStrategy() if _launched_with_several_ranks() else SingleProcess()
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be None, one of {STRATEGY_NAMES} or a Strategy object, got {strategy!r:.100}")
    if strategy == "ddp":
        return DDPStrategy()
    if strategy == "fsdp":
        return FSDPStrategy()
    raise ValueError(f"strategy {strategy!r} is unknown; the PyTorch strategies are {STRATEGY_NAMES}")


def _launched_with_several_ranks() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return environment_world_size() > 1


__all__ = ["STRATEGY_NAMES", "DDPStrategy", "FSDPStrategy", "SingleProcess", "Strategy", "resolve_strategy"]
