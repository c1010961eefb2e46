"""The PyTorch backend: ``import mlpug.pytorch as mlp``.

``mlp.trainers`` (``TrainingManager``, ``DefaultTrainer``), ``mlp.evaluation`` (``MetricEvaluator``),
``mlp.callbacks`` and ``mlp.logging``: the same names as every other backend.
"""

from mlpug import logging
from mlpug.pytorch import callbacks, checkpointing, data, evaluation, trainers
from mlpug.pytorch.checkpointing import load_model_checkpoint, load_training_checkpoint

__all__ = [
    "callbacks",
    "checkpointing",
    "data",
    "evaluation",
    "load_model_checkpoint",
    "load_training_checkpoint",
    "logging",
    "trainers",
]
