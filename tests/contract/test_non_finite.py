"""The non-finite loss policy on every backend: a NaN loss never makes a successful run or a NaN checkpoint.

The NaN comes from the data (the features of batch 2 of every epoch are NaN; the loss includes
``0 * mean(features)``), so it is the same on every backend, eager and compiled. Before the policy existed (a
deliberate break: ``NonFiniteLossTracker.check`` returning at once), the "raise" test trained two epochs, ended
"All good" and the training checkpoint held NaN weights.
"""

import logging
import os

import numpy as np
import pytest

from mlpug.trainers.non_finite import NonFiniteLossError
from tests.contract.backends import make_numpy_data
from tests.contract.scripts import checkpoint_worker as worker
from tests.recording import RecordingCallback

BATCH_SIZE, NUM_BATCHES, NAN_BATCH = 8, 4, 2


def nan_batches(harness, skip_nan_batch=False):
    features, labels = make_numpy_data(NUM_BATCHES * BATCH_SIZE, seed=0)
    features[NAN_BATCH * BATCH_SIZE : (NAN_BATCH + 1) * BATCH_SIZE] = np.nan
    if skip_nan_batch:
        keep = np.ones(len(features), bool)
        keep[NAN_BATCH * BATCH_SIZE : (NAN_BATCH + 1) * BATCH_SIZE] = False
        features, labels = features[keep], labels[keep]
    return harness.batches(features, labels, BATCH_SIZE)


def train(harness, problem, batches, directory, recorder, **manager_kwargs):
    mlp = problem.mlp
    problem.trainer.set_training_model(harness.nan_propagating_model(problem))
    checkpoint_manager = mlp.callbacks.CheckpointManager(
        checkpoints_path=str(directory), metric_to_monitor="training.batch.loss", batch_level=True,
        write_in_background=False,
    )  # fmt: skip
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=problem.trainer)),
        checkpoint_manager,
        recorder,
    ]
    manager = mlp.trainers.TrainingManager(
        problem.trainer, batches, num_epochs=2, callbacks=callbacks, **manager_kwargs
    )
    return manager, checkpoint_manager


def finite_weights(checkpoint) -> bool:
    flat = worker.flatten(worker.to_numpy_tree(checkpoint))
    return all(np.isfinite(np.asarray(value, np.float64)).all() for value in flat.values())


def test_a_nan_loss_ends_the_run_with_an_error_naming_its_iteration_and_no_nan_checkpoint(harness, tmp_path):
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    recorder = RecordingCallback()
    manager, checkpoint_manager = train(harness, problem, nan_batches(harness), tmp_path, recorder)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at global iteration 2 \(epoch 0, batch step 2\)"):
        manager.start_training()
    assert recorder.ended_with["stopped_on_error"] is True
    files = checkpoint_manager.file_names
    assert not os.path.exists(files.emergency_training)  # nothing is written from the non-finite state
    state = problem.mlp.load_training_checkpoint(files.training)
    assert state["global_iter"] == NAN_BATCH  # the last good one: after batch 1, resuming at batch 2
    assert finite_weights(state["trainer"]["model_components"])
    for path in (files.latest_model, files.best_model):
        checkpoint = problem.mlp.load_model_checkpoint(path)
        assert checkpoint["progress"]["global_iter"] < NAN_BATCH and finite_weights(checkpoint["model_components"])
    assert checkpoint_manager.best_global_iter < NAN_BATCH


def test_skip_step_skips_exactly_the_non_finite_steps(harness, tmp_path, caplog):
    problem = harness.make_problem(seed=4, batch_size=BATCH_SIZE)
    recorder = RecordingCallback(snapshot_logs=True)
    manager, _ = train(harness, problem, nan_batches(harness), tmp_path, recorder, non_finite_loss="skip_step")
    logging.getLogger("mlpug").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="mlpug"):
            manager.start_training()
    finally:
        logging.getLogger("mlpug").propagate = False
    skipped = [
        logs["current"]["global_iter"]
        for kind, logs in recorder.snapshots
        if kind == "batch" and logs["current"]["training_params"]["batch"]["optimizer_step_skipped"]
    ]
    assert skipped == [NAN_BATCH, NUM_BATCHES + NAN_BATCH]
    window = [
        logs["current"]["training"]["window_average"]["loss"] for kind, logs in recorder.snapshots if kind == "batch"
    ]
    assert all(np.isfinite(window))  # the skipped batches are not part of the sliding window either
    assert "not finite at 1 of the last" in caplog.text and "optimizer steps were skipped" in caplog.text
    # a skipped step is as if the batch were not there: the same weights as training on the other batches
    reference = harness.make_problem(seed=4, batch_size=BATCH_SIZE)
    reference.trainer.set_training_model(harness.nan_propagating_model(reference))
    reference_manager = problem.mlp.trainers.TrainingManager(
        reference.trainer, nan_batches(harness, skip_nan_batch=True), num_epochs=2
    )
    reference_manager.start_training()
    for a, b in zip(harness.weights(problem), harness.weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_warn_goes_on_and_never_writes_non_finite_weights(harness, tmp_path, caplog):
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    manager, checkpoint_manager = train(
        harness, problem, nan_batches(harness), tmp_path, RecordingCallback(), non_finite_loss="warn"
    )
    logging.getLogger("mlpug").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="mlpug"):
            manager.start_training()
    finally:
        logging.getLogger("mlpug").propagate = False
    assert "first nan at global iteration 2 (epoch 0, batch step 2); training goes on" in caplog.text
    assert "Not writing" in caplog.text
    files = checkpoint_manager.file_names
    state = problem.mlp.load_training_checkpoint(files.training)
    assert state["global_iter"] <= NAN_BATCH + 1 and finite_weights(state["trainer"]["model_components"])
    latest = problem.mlp.load_model_checkpoint(files.latest_model)
    assert finite_weights(latest["model_components"])


def test_bad_policy_is_refused_at_construction(harness):
    problem = harness.make_problem()
    with pytest.raises(
        ValueError, match=r"non_finite_loss must be one of \['raise', 'skip_step', 'warn'\], got 'skip'"
    ):
        problem.mlp.trainers.TrainingManager(problem.trainer, problem.training_batches, non_finite_loss="skip")
