"""JAX distribution strategies (see :mod:`mlpug.trainers.strategy`): for now one process on one device only.

``DefaultTrainer(strategy=...)`` takes None, ``"single_process"`` or mlpug's ``SingleProcess``; data parallel
training on JAX (a batch sharded over a ``jax.sharding.Mesh``) is not implemented yet, and a run of several JAX
processes (``jax.distributed.initialize()``, ``jax.process_count() > 1``) is refused: each process would train
alone and write the same checkpoint files.
"""

from __future__ import annotations

from typing import Any

import jax

from mlpug.trainers.strategy import SingleProcess, Strategy, check_not_a_class

STRATEGY_NAMES = ("single_process",)
"""The names ``DefaultTrainer(strategy=...)`` takes."""


def resolve_strategy(strategy: Any) -> SingleProcess:
    """The strategy that ``DefaultTrainer(strategy=...)`` names.

    Args:
        strategy: None, ``"single_process"`` or a ``SingleProcess`` (one process, one device).

    Raises:
        ValueError: Any other name, or another mlpug ``Strategy``, or several JAX processes
            (``jax.process_count() > 1``, the count is named): data parallel training on JAX comes later.
        TypeError: A class instead of an object, or not a strategy at all.
    """
    num_processes = jax.process_count()
    if num_processes > 1:
        raise ValueError(
            f"jax.process_count() is {num_processes}: the JAX backend trains in one process on one device for now, "
            f"and each of the {num_processes} processes would train alone and write the same checkpoint files; "
            "data parallel training on JAX (a batch sharded over a jax.sharding.Mesh) comes later. Run one process "
            "(without jax.distributed.initialize())"
        )
    if strategy is None or strategy == "single_process":
        return SingleProcess()
    if isinstance(strategy, SingleProcess):
        return strategy
    check_not_a_class(strategy)
    if isinstance(strategy, (str, Strategy)):
        given = repr(strategy) if isinstance(strategy, str) else f"a {type(strategy).__qualname__}"
        raise ValueError(
            f"strategy {given} is not available on JAX: the JAX backend trains in one process on one device for now "
            f"(strategy names: {STRATEGY_NAMES}); data parallel training on JAX (a batch sharded over a "
            "jax.sharding.Mesh) comes later"
        )
    raise TypeError(
        f"strategy must be None, one of {STRATEGY_NAMES} or an mlpug Strategy, got a "
        f"{type(strategy).__module__}.{type(strategy).__qualname__}: {strategy!r:.100}"
    )


__all__ = ["STRATEGY_NAMES", "SingleProcess", "Strategy", "resolve_strategy"]
