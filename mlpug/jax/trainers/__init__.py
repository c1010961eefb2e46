"""JAX trainers; the ``TrainingManager`` is the neutral one."""

from mlpug.jax.trainers.trainer import DefaultTrainer
from mlpug.trainers.trainer import BackendTrainer, ModelOutputs, StepResult
from mlpug.trainers.training_manager import TrainingManager

__all__ = ["DefaultTrainer", "ModelOutputs", "StepResult", "BackendTrainer", "TrainingManager"]
