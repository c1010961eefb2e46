"""The exact-resume matrix: one runner, cells per backend in ``tests/pytorch``, ``tests/tensorflow`` and ``tests/jax``.

A cell is a data source x a resume point (mid-epoch, epoch end); every run has dropout in the model and
batch-level validation (a second data source evaluated after every batch). A cell is either *exact* (the losses
and weights of "train, stop, resume in a fresh trainer" equal an uninterrupted run bit for bit) or *warned* (a
warning at the start of the run says that resume is not exact for this source), as the README table says.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

NUM_EPOCHS, NUM_BATCHES = 2, 4
STOP_AT = {"mid_epoch": 5, "epoch_end": 3}  # global iterations: 5 is in epoch 1, 3 is the last of epoch 0


@dataclass
class Setup:
    """What a backend cell builds for one run (every run builds everything anew)."""

    mlp: Any
    trainer: Any
    training_data: Any
    validation_data: Any
    weights: Callable[[], list]  # the model weights as NumPy arrays


def run(
    build: Callable[[int], Setup],
    directory: str,
    stop_at=None,
    resume=False,
    batch_level_validation: bool = True,
    checkpoint_every: int = 1,
) -> tuple:
    """Train ``NUM_EPOCHS`` epochs (or until ``stop_at``); return ``(batch losses, weights)``.

    ``batch_level_validation=False`` (validation at epoch ends) and ``checkpoint_every`` (batch-level training
    checkpoints every this many batches) are for runs with several steps per compiled call: a batch-level
    validation or checkpoint needs the model after every batch, so each call would train one step."""
    setup = build(123 if resume else 0)  # another initialisation: everything that matters comes from the checkpoint
    mlp = setup.mlp
    losses = []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])
            if logs["current"]["global_iter"] == stop_at:
                self.training_manager.stop_training()

    evaluator = mlp.evaluation.MetricEvaluator(trainer=setup.trainer)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.TestMetricsLogger(
            setup.validation_data, "validation", evaluator, batch_level=batch_level_validation
        ),
        Record("Record"),
        mlp.callbacks.CheckpointManager(
            checkpoints_path=directory,
            metric_to_monitor=None,
            batch_level=True,
            write_in_background=False,
            create_checkpoint_every=checkpoint_every,
        ),
    ]
    manager = mlp.trainers.TrainingManager(
        setup.trainer, setup.training_data, num_epochs=NUM_EPOCHS, num_batches_per_epoch=NUM_BATCHES,
        callbacks=callbacks, resume_from="latest" if resume else None,
    )  # fmt: skip
    manager.start_training()
    return losses, setup.weights()


def check_cell(
    build: Callable[[int], Setup], tmp_path, resume_point: str, expected: str, caplog, **options: Any
) -> None:
    """Run the cell and assert its expectation: ``"exact"``, or the text of the warning logged at the start of
    the run (before the first batch) that says resume is not exact for this source. ``options`` go to every
    :func:`run` of the cell."""
    straight_losses, straight_weights = run(build, str(tmp_path / "straight"), **options)
    directory = str(tmp_path / "stopped")
    logging.getLogger("mlpug").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="mlpug"):
            first_losses, _ = run(build, directory, stop_at=STOP_AT[resume_point], **options)
        warnings_of_first_run = caplog.text
        random.random(), np.random.rand()  # move the global generators: the resume must restore them
        second_losses, weights = run(build, directory, resume=True, **options)
    finally:
        logging.getLogger("mlpug").propagate = False
    exact = first_losses + second_losses == straight_losses and all(
        np.array_equal(a, b) for a, b in zip(weights, straight_weights)
    )
    if expected == "exact":
        assert exact, (first_losses + second_losses, straight_losses)
    else:
        assert expected in warnings_of_first_run, f"no warning {expected!r} at the start: {warnings_of_first_run}"
