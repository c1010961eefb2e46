"""Callbacks for the TensorFlow backend: the neutral ones work unchanged."""

from mlpug.callbacks import (
    HOOKS,
    AutoTensorboard,
    Callback,
    EarlyStopping,
    EvaluationResult,
    LogProgress,
    MetricsHistory,
    ProgressBar,
    RunContext,
    Tensorboard,
    TestMetricsLogger,
    TrainingMetricsLogger,
)
from mlpug.tensorflow.callbacks.checkpoint_manager import CheckpointManager
from mlpug.tensorflow.callbacks.lr_scheduler import LRSchedulerWrapper

__all__ = [
    "HOOKS",
    "AutoTensorboard",
    "Callback",
    "CheckpointManager",
    "EarlyStopping",
    "EvaluationResult",
    "LogProgress",
    "LRSchedulerWrapper",
    "MetricsHistory",
    "ProgressBar",
    "RunContext",
    "Tensorboard",
    "TestMetricsLogger",
    "TrainingMetricsLogger",
]
