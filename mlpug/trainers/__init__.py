"""The neutral training loop (``TrainingManager``) and the trainer contract (``Trainer``, ``StepResult``)."""

from mlpug.trainers.trainer import DefaultTrainer, ModelOutputs, StepResult, Trainer
from mlpug.trainers.training_manager import TrainingManager

__all__ = ["DefaultTrainer", "ModelOutputs", "StepResult", "Trainer", "TrainingManager"]
