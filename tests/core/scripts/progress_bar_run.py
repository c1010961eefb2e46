"""Trains the fake backend for 3 epochs with a ProgressBar on stdout; writes the validation losses as JSON to
argv[1]. Run by tests/core/test_progress_bar.py under a pseudo-terminal and with a pipe."""

import json
import sys

from mlpug.callbacks import MetricsHistory, ProgressBar, TestMetricsLogger, TrainingMetricsLogger
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import make_batches, make_trainer

run_async = sys.argv[2] == "async"
trainer, _ = make_trainer()
evaluator = MetricEvaluator(trainer=trainer)
history = MetricsHistory()
bar = ProgressBar("toy", metrics={"Loss": ("validation.dataset.loss", "min")}, refresh_period=2)
callbacks = [
    TrainingMetricsLogger(evaluator),
    TestMetricsLogger(make_batches(3), "validation", evaluator, run_async=run_async),
    history,
    bar,
]
TrainingManager(trainer, make_batches(8), num_epochs=3, callbacks=callbacks).start_training()
with open(sys.argv[1], "w") as file:
    json.dump([row["validation.dataset.loss"] for row in history.rows], file)
