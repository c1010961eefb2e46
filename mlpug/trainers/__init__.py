"""The neutral training loop and the trainer contract."""

from mlpug.trainers.training import DefaultTrainer, ModelOutputs, Trainer, TrainingManager

__all__ = ["DefaultTrainer", "ModelOutputs", "Trainer", "TrainingManager"]
