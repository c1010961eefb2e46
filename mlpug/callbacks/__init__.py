"""Neutral callbacks. Backends re-export these (and add their own) as ``mlp.callbacks``."""

from mlpug.trainers.callbacks.async_evaluation import EvaluationResult, landed_results
from mlpug.trainers.callbacks.callback import HOOKS, Callback
from mlpug.trainers.callbacks.checkpoint_manager import CheckpointManager
from mlpug.trainers.callbacks.early_stopping import EarlyStopping
from mlpug.trainers.callbacks.log_progress import LogProgress
from mlpug.trainers.callbacks.metrics_history import MetricsHistory
from mlpug.trainers.callbacks.metrics_logging import TestMetricsLogger, TrainingMetricsLogger
from mlpug.trainers.callbacks.progress_bar import ProgressBar
from mlpug.trainers.callbacks.tensorboard import AutoTensorboard, Tensorboard

__all__ = [
    "HOOKS",
    "AutoTensorboard",
    "Callback",
    "CheckpointManager",
    "EarlyStopping",
    "EvaluationResult",
    "LogProgress",
    "MetricsHistory",
    "ProgressBar",
    "Tensorboard",
    "TestMetricsLogger",
    "TrainingMetricsLogger",
    "landed_results",
]
