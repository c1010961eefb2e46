"""The PyTorch backend: ``import mlpug.pytorch as mlp``.

``mlp.trainers`` (``TrainingManager``, ``DefaultTrainer``), ``mlp.evaluation`` (``MetricEvaluator``),
``mlp.callbacks`` and ``mlp.logging``: the same names as every other backend; ``mlp.distributed`` (``launch``,
``local_device``) for data-parallel training.
"""

from mlpug import logging
from mlpug.pytorch import callbacks, checkpointing, data, distributed, evaluation, trainers
from mlpug.pytorch.checkpointing import load_model_checkpoint, load_training_checkpoint

__all__ = [
    "callbacks",
    "checkpointing",
    "data",
    "distributed",
    "evaluation",
    "load_model_checkpoint",
    "load_training_checkpoint",
    "logging",
    "trainers",
]
