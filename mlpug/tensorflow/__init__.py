"""The TensorFlow backend: ``import mlpug.tensorflow as mlp``.

``mlp.Trainer(model, loss_func, optimizer, metrics=...).train(train_dataset, validation_dataset, ...)`` is the
one-call API (:mod:`mlpug.one_call`), built from the parts below.

``mlp.trainers`` (``TrainingManager``, ``DefaultTrainer``), ``mlp.evaluation`` (``MetricEvaluator``),
``mlp.callbacks``, ``mlp.distributed`` (``tf.distribute`` helpers), ``mlp.strategies`` (what
``DefaultTrainer(strategy=...)`` takes besides a name) and ``mlp.logging``: the same names as every other backend.
Works with TensorFlow 2.21 and its bundled Keras 3 (``tf.keras``).
Standard metric functions are ``mlp.metrics`` (``accuracy``, ``top_k_accuracy``); ``mlp.set_random_seed(seed)``
seeds Python, NumPy and the backend.
"""

from mlpug import logging
from mlpug.tensorflow import callbacks, checkpointing, data, distributed, evaluation, metrics, strategies, trainers
from mlpug.tensorflow.checkpointing import load_model_checkpoint, load_training_checkpoint
from mlpug.tensorflow.one_call import Trainer
from mlpug.tensorflow.random_state import set_random_seed

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
