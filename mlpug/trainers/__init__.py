"""The neutral training loop (``TrainingManager``) and the trainer contract (``BackendTrainer``, ``StepResult``)."""

from mlpug.trainers.trainer import BackendTrainer, DefaultTrainer, ModelOutputs, StepResult
from mlpug.trainers.training_manager import TrainingManager

__all__ = ["DefaultTrainer", "ModelOutputs", "StepResult", "BackendTrainer", "TrainingManager"]
