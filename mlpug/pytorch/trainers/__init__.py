"""PyTorch trainers; the ``TrainingManager`` is the neutral one."""

from mlpug.pytorch.trainers.training import DefaultTrainer
from mlpug.trainers.training import ModelOutputs, Trainer, TrainingManager

__all__ = ["DefaultTrainer", "ModelOutputs", "Trainer", "TrainingManager"]
