"""Callbacks for the JAX backend: the neutral ones work unchanged; ``CheckpointManager`` writes with the JAX saver."""

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
