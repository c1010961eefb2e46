"""Callbacks for the TensorFlow backend: the neutral ones work unchanged."""

from mlpug.tensorflow.callbacks.checkpoint_manager import CheckpointManager
from mlpug.tensorflow.callbacks.lr_scheduler import LRSchedulerWrapper
from mlpug.trainers.callbacks import (
    HOOKS,
    AutoTensorboard,
    Callback,
    EarlyStopping,
    EvaluationResult,
    LogProgress,
    MetricsHistory,
    ProgressBar,
    Tensorboard,
    TestMetricsLogger,
    TrainingMetricsLogger,
    landed_results,
)

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
    "Tensorboard",
    "TestMetricsLogger",
    "TrainingMetricsLogger",
    "landed_results",
]
