"""Callbacks for the JAX backend: the neutral ones work unchanged; ``CheckpointManager`` writes with the JAX saver;
``LRSchedulerWrapper`` applies optax schedules (or functions of the step) through ``trainer.set_learning_rate``."""

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
from mlpug.jax.callbacks.checkpoint_manager import CheckpointManager
from mlpug.jax.callbacks.lr_scheduler import LRSchedulerWrapper

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
