"""Callbacks for the TensorFlow backend: the neutral ones work unchanged."""

from mlpug.trainers.callbacks import HOOKS, Callback, LogProgress, TestMetricsLogger, TrainingMetricsLogger

__all__ = ["HOOKS", "Callback", "LogProgress", "TestMetricsLogger", "TrainingMetricsLogger"]
