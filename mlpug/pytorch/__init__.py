"""The PyTorch backend: ``import mlpug.pytorch as mlp``.

``mlp.trainers`` (``TrainingManager``, ``DefaultTrainer``), ``mlp.evaluation`` (``MetricEvaluator``),
``mlp.callbacks`` and ``mlp.logging``: the same names as every other backend.
"""

from mlpug import logging
from mlpug.pytorch import callbacks, evaluation, trainers

__all__ = ["callbacks", "evaluation", "logging", "trainers"]
