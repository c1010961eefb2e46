"""The JAX backend (Flax NNX modules, optax optimizers): ``import mlpug.jax as mlp``.

``mlp.trainers`` (``TrainingManager``, ``DefaultTrainer``), ``mlp.evaluation`` (``MetricEvaluator``),
``mlp.callbacks``, ``mlp.strategies`` (what ``DefaultTrainer(strategy=...)`` takes; one process for now) and
``mlp.logging``: the same names as every other backend. Works with JAX 0.10, Flax 0.12 (``flax.nnx``) and optax 0.2.
Standard metric functions are ``mlp.metrics`` (``accuracy``, ``top_k_accuracy``); ``mlp.set_random_seed(seed)``
seeds Python and NumPy (JAX has no global generator: the model's ``nnx.Rngs`` carry its seeds).
"""

from mlpug import logging
from mlpug.jax import callbacks, checkpointing, data, evaluation, metrics, strategies, trainers
from mlpug.jax.checkpointing import load_model_checkpoint, load_training_checkpoint
from mlpug.jax.random_state import set_random_seed

__all__ = [
    "callbacks",
    "checkpointing",
    "data",
    "evaluation",
    "load_model_checkpoint",
    "load_training_checkpoint",
    "logging",
    "metrics",
    "set_random_seed",
    "strategies",
    "trainers",
]
