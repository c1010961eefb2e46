"""Callbacks for the TensorFlow backend: the neutral ones work unchanged."""

from mlpug.tensorflow.callbacks.checkpoint_manager import CheckpointManager
from mlpug.trainers.callbacks import HOOKS, Callback, LogProgress, TestMetricsLogger, TrainingMetricsLogger

__all__ = ["HOOKS", "Callback", "CheckpointManager", "LogProgress", "TestMetricsLogger", "TrainingMetricsLogger"]
