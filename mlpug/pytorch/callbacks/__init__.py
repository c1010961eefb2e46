"""Callbacks for the PyTorch backend: the neutral ones work unchanged; ``LRSchedulerWrapper`` steps torch
schedulers; ``LogCudaMemory`` and ``EmptyCudaCache`` are the CUDA memory tools."""

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
from mlpug.pytorch.callbacks.checkpoint_manager import CheckpointManager
from mlpug.pytorch.callbacks.cuda_memory import EmptyCudaCache, LogCudaMemory
from mlpug.pytorch.callbacks.lr_scheduler import LRSchedulerWrapper

__all__ = [
    "HOOKS",
    "AutoTensorboard",
    "Callback",
    "CheckpointManager",
    "EarlyStopping",
    "EvaluationResult",
    "EmptyCudaCache",
    "LogProgress",
    "LRSchedulerWrapper",
    "LogCudaMemory",
    "MetricsHistory",
    "ProgressBar",
    "RunContext",
    "Tensorboard",
    "TestMetricsLogger",
    "TrainingMetricsLogger",
]
