"""The JAX backend (Flax NNX modules, optax optimizers): ``import mlpug.jax as mlp``.

``mlp.Trainer(model, loss_func, optimizer, metrics=...).train(train_dataset, validation_dataset, ...)`` is the
one-call API (:mod:`mlpug.one_call`, :mod:`mlpug.jax.one_call`), built from the parts below.

``mlp.trainers`` (``TrainingManager``, ``DefaultTrainer``), ``mlp.evaluation`` (``MetricEvaluator``),
``mlp.callbacks``, ``mlp.strategies`` (what ``DefaultTrainer(strategy=...)`` takes: one device, or data parallel
over a device mesh), ``mlp.distributed`` (several JAX processes: ``launch``) and ``mlp.logging``: the same names as
every other backend. Works with JAX 0.10, Flax 0.12 (``flax.nnx``) and optax 0.2.
Standard metric functions are ``mlp.metrics`` (``accuracy``, ``top_k_accuracy``); ``mlp.set_random_seed(seed)``
seeds Python and NumPy (JAX has no global generator: the model's ``nnx.Rngs`` carry its seeds).
"""

from mlpug import logging
from mlpug.jax import callbacks, checkpointing, data, distributed, evaluation, metrics, strategies, trainers
from mlpug.jax.checkpointing import load_model_checkpoint, load_training_checkpoint
from mlpug.jax.one_call import Trainer
from mlpug.jax.random_state import set_random_seed

__all__ = [
    "Trainer",
    "callbacks",
    "checkpointing",
    "data",
    "distributed",
    "evaluation",
    "load_model_checkpoint",
    "load_training_checkpoint",
    "logging",
    "metrics",
    "set_random_seed",
    "strategies",
    "trainers",
]
