"""The PyTorch backend: ``import mlpug.pytorch as mlp``.

``mlp.Trainer(model, loss_func, optimizer, metrics=...).train(train_dataset, validation_dataset, ...)`` is the
one-call API (:mod:`mlpug.one_call`), built from the parts below.

``mlp.trainers`` (``TrainingManager``, ``DefaultTrainer``), ``mlp.evaluation`` (``MetricEvaluator``),
``mlp.callbacks`` and ``mlp.logging``: the same names as every other backend; ``mlp.distributed`` (``launch``,
``local_device``) for data-parallel training, and ``mlp.strategies`` (``DDPStrategy``, ``SingleProcess``): what
``DefaultTrainer(strategy=...)`` takes besides a name.
Standard metric functions are ``mlp.metrics`` (``accuracy``, ``top_k_accuracy``); ``mlp.set_random_seed(seed)``
seeds Python, NumPy and the backend.
"""

from mlpug import logging
from mlpug.pytorch import callbacks, checkpointing, data, distributed, evaluation, metrics, strategies, trainers
from mlpug.pytorch.checkpointing import load_model_checkpoint, load_training_checkpoint
from mlpug.pytorch.one_call import Trainer
from mlpug.pytorch.random_state import set_random_seed

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
