"""Callbacks for the PyTorch backend: the neutral ones work unchanged."""

from mlpug.pytorch.callbacks.checkpoint_manager import CheckpointManager
from mlpug.trainers.callbacks import (
    HOOKS,
    AutoTensorboard,
    Callback,
    EarlyStopping,
    LogProgress,
    Tensorboard,
    TestMetricsLogger,
    TrainingMetricsLogger,
)

__all__ = [
    "HOOKS",
    "AutoTensorboard",
    "Callback",
    "CheckpointManager",
    "EarlyStopping",
    "LogProgress",
    "Tensorboard",
    "TestMetricsLogger",
    "TrainingMetricsLogger",
]
