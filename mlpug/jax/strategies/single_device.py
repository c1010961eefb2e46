"""``SingleDevice``: the JAX backend's null strategy, one process on one device."""

from __future__ import annotations

from mlpug.jax.strategies.jax_strategy import JaxStrategy
from mlpug.trainers.strategy import SingleProcess


class SingleDevice(SingleProcess, JaxStrategy):
    """One process on JAX's default device: values stay where they are, no collectives (the default strategy; an
    mlpug ``SingleProcess`` given to ``DefaultTrainer(strategy=...)`` becomes this)."""

    name = "single_process"
