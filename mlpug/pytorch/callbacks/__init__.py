"""Callbacks for the PyTorch backend: the neutral ones work unchanged."""

from mlpug.pytorch.callbacks.checkpoint_manager import CheckpointManager
from mlpug.trainers.callbacks import HOOKS, Callback, LogProgress, TestMetricsLogger, TrainingMetricsLogger

__all__ = ["HOOKS", "Callback", "CheckpointManager", "LogProgress", "TestMetricsLogger", "TrainingMetricsLogger"]
