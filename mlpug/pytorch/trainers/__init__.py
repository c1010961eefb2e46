"""PyTorch trainers; the ``TrainingManager`` is the neutral one."""

from mlpug.pytorch.trainers.trainer import DefaultTrainer
from mlpug.trainers.trainer import ModelOutputs, StepResult, Trainer
from mlpug.trainers.training_manager import TrainingManager

__all__ = ["DefaultTrainer", "ModelOutputs", "StepResult", "Trainer", "TrainingManager"]
