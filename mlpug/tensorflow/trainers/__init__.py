"""TensorFlow trainers; the ``TrainingManager`` is the neutral one."""

from mlpug.tensorflow.trainers.training import DefaultTrainer
from mlpug.trainers.training import ModelOutputs, Trainer, TrainingManager

__all__ = ["DefaultTrainer", "ModelOutputs", "Trainer", "TrainingManager"]
