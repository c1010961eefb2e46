"""Neutral callbacks. Backends re-export these (and add their own) as ``mlp.callbacks``."""

from mlpug.callbacks.checkpoint_manager import CheckpointManager
from mlpug.callbacks.early_stopping import EarlyStopping
from mlpug.callbacks.log_progress import LogProgress
from mlpug.callbacks.metrics_history import MetricsHistory
from mlpug.callbacks.metrics_logging import TestMetricsLogger, TrainingMetricsLogger
from mlpug.callbacks.progress_bar import ProgressBar
from mlpug.callbacks.tensorboard import AutoTensorboard, Tensorboard
from mlpug.trainers.callback import HOOKS, Callback
from mlpug.trainers.evaluation_result import EvaluationResult
from mlpug.trainers.run_context import RunContext

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
    "RunContext",
    "Tensorboard",
    "TestMetricsLogger",
    "TrainingMetricsLogger",
]
