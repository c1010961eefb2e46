"""The TensorFlow backend: ``import mlpug.tensorflow as mlp``.

``mlp.trainers`` (``TrainingManager``, ``DefaultTrainer``), ``mlp.evaluation`` (``MetricEvaluator``),
``mlp.callbacks``, ``mlp.distributed`` (``tf.distribute`` strategies) and ``mlp.logging``: the same
names as every other backend. Works with TensorFlow 2.21 and
its bundled Keras 3 (``tf.keras``).
"""

from mlpug import logging
from mlpug.tensorflow import callbacks, checkpointing, data, distributed, evaluation, trainers
from mlpug.tensorflow.checkpointing import load_model_checkpoint, load_training_checkpoint

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
