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

from mlpug.trainers.non_finite import NonFiniteLossError, NonFiniteMetricError, NonFiniteWeightsError
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
        harness, problem, nan_batches(harness), tmp_path, RecordingCallback(), non_finite_loss="warn",
        non_finite_weights="warn",
    )  # fmt: skip
    logging.getLogger("mlpug").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="mlpug"):
            manager.start_training()
    finally:
        logging.getLogger("mlpug").propagate = False
    assert "first nan at global iteration 2 (epoch 0, batch step 2); training goes on" in caplog.text
    assert "Not writing" in caplog.text
    # the weights went NaN with the loss: said at the first check and at the end, never "All good"
    assert "The trainable weights hold NaN or infinite values after global iteration 2" in caplog.text
    assert "Training ended with non-finite trainable weights" in caplog.text and "All good" not in caplog.text
    files = checkpoint_manager.file_names
    state = problem.mlp.load_training_checkpoint(files.training)
    assert state["global_iter"] <= NAN_BATCH + 1 and finite_weights(state["trainer"]["model_components"])
    latest = problem.mlp.load_model_checkpoint(files.latest_model)
    assert finite_weights(latest["model_components"])


def test_warn_for_the_loss_still_raises_for_non_finite_weights_by_default(harness, tmp_path):
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    manager, checkpoint_manager = train(
        harness, problem, nan_batches(harness), tmp_path, RecordingCallback(), non_finite_loss="warn"
    )
    with pytest.raises(NonFiniteWeightsError, match=r"after global iteration 2 \(epoch 0, batch step 2\)"):
        manager.start_training()  # found before the checkpoint of batch 2 would be written
    state = problem.mlp.load_training_checkpoint(checkpoint_manager.file_names.training)
    assert state["global_iter"] == NAN_BATCH and finite_weights(state["trainer"]["model_components"])


# ----- non-finite weights with a finite loss (issue 25, item 3) -----
def masked_training(harness, problem, directory, recorder, batch_level=False, **manager_kwargs):
    """The NaN batches with a model that hides the NaN rows from the loss: the loss stays finite at every step,
    the first layer's weight turns NaN at batch 2."""
    mlp = problem.mlp
    problem.trainer.set_training_model(harness.nan_gradient_model(problem))
    checkpoint_manager = mlp.callbacks.CheckpointManager(
        checkpoints_path=str(directory), metric_to_monitor=None, batch_level=batch_level, write_in_background=False
    )
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=problem.trainer)),
        checkpoint_manager,
        recorder,
    ]
    manager = mlp.trainers.TrainingManager(
        problem.trainer, nan_batches(harness), num_epochs=2, callbacks=callbacks, **manager_kwargs
    )
    return manager, checkpoint_manager


def run_logged(manager, caplog):
    logging.getLogger("mlpug").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="mlpug"):
            with pytest.raises(NonFiniteWeightsError) as caught:
                manager.start_training()
    finally:
        logging.getLogger("mlpug").propagate = False
    return caught.value


def test_non_finite_weights_with_a_finite_loss_end_the_run_at_the_first_epoch_end(harness, tmp_path, caplog):
    """Before the weight policy: the loss stayed finite, "Not writing ... NaN" at every period, "All good"."""
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    recorder = RecordingCallback(snapshot_logs=True)
    manager, checkpoint_manager = masked_training(harness, problem, tmp_path, recorder, check_weights_every=None)
    error = run_logged(manager, caplog)
    losses = [logs["current"]["training"]["batch"]["loss"] for kind, logs in recorder.snapshots if kind == "batch"]
    assert len(losses) == NUM_BATCHES and all(np.isfinite(losses))  # the loss never said anything
    # found at the end of epoch 0, before its checkpoint, naming the position and the first layer's weight only
    assert (error.global_iter, error.epoch, error.batch_step) == (NUM_BATCHES - 1, 0, NUM_BATCHES - 1)
    assert len(error.names) == 1 and error.names[0].startswith("model.")
    assert error.last_finite_iter is None and "(no earlier check in this run)" in str(error)
    assert recorder.ended_with["stopped_on_error"] is True and "All good" not in caplog.text
    assert not np.isfinite(harness.weights(problem)[0]).all()
    # no checkpoint was written, and the log says so rather than naming a "last good" one (issue 25, item 8)
    assert not os.listdir(tmp_path)
    assert "Training stopped on non-finite weights" in caplog.text
    assert "no training checkpoint was written yet" in caplog.text and "last good" not in caplog.text


def test_non_finite_weights_are_found_before_a_checkpoint_write(harness, tmp_path, caplog):
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    manager, checkpoint_manager = masked_training(
        harness, problem, tmp_path, RecordingCallback(), batch_level=True, check_weights_every=None
    )
    error = run_logged(manager, caplog)
    assert (error.global_iter, error.epoch, error.batch_step, error.last_finite_iter) == (NAN_BATCH, 0, NAN_BATCH, 1)
    assert "after global iteration 2 (epoch 0, batch step 2)" in str(error)
    assert "the previous check, after global iteration 1, found every weight finite" in str(error)
    state = problem.mlp.load_training_checkpoint(checkpoint_manager.file_names.training)
    assert state["global_iter"] == NAN_BATCH and finite_weights(state["trainer"]["model_components"])
    assert "Not writing" not in caplog.text  # stopped before any write was tried
    assert f"the last good training checkpoint is {checkpoint_manager.file_names.training}" in caplog.text


def test_check_weights_every_n_steps_finds_them_between_checkpoints(harness, tmp_path, caplog):
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    manager, _ = masked_training(harness, problem, tmp_path, RecordingCallback(), check_weights_every=3)
    error = run_logged(manager, caplog)
    assert (error.global_iter, error.epoch, error.batch_step) == (2, 0, 2)  # after 3 steps, not at the epoch end


def test_a_nan_input_with_the_relu_problem_never_ends_all_good(harness, tmp_path, caplog):
    """Issue 25's case: one NaN input, the problem's ReLU network, its own loss. A backend whose loss turns NaN raises
    NonFiniteLossError; one whose ReLU hides the NaN row from the loss (TensorFlow) raises NonFiniteWeightsError."""
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    features, labels = make_numpy_data(NUM_BATCHES * BATCH_SIZE, seed=0)
    features[NAN_BATCH * BATCH_SIZE, 0] = np.nan  # one value of one input
    mlp = problem.mlp
    manager = mlp.trainers.TrainingManager(
        problem.trainer, harness.batches(features, labels, BATCH_SIZE), num_epochs=2,
        callbacks=[mlp.callbacks.CheckpointManager(checkpoints_path=str(tmp_path), metric_to_monitor=None)],
    )  # fmt: skip
    logging.getLogger("mlpug").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="mlpug"):
            with pytest.raises((NonFiniteLossError, NonFiniteWeightsError)):
                manager.start_training()
    finally:
        logging.getLogger("mlpug").propagate = False
    assert "All good" not in caplog.text


def test_bad_policy_is_refused_at_construction(harness):
    problem = harness.make_problem()
    with pytest.raises(
        ValueError, match=r"non_finite_loss must be one of \['raise', 'skip_step', 'warn'\], got 'skip'"
    ):
        problem.mlp.trainers.TrainingManager(problem.trainer, problem.training_batches, non_finite_loss="skip")


# ----- non-finite validation metrics (issue 25, item 4) -----
def nan_validation(harness, problem):
    """The problem's validation batches with one NaN input in the second batch; the NaN-propagating model gives a
    NaN validation loss on every backend (the training data stay finite)."""
    features, labels = make_numpy_data(3 * BATCH_SIZE, seed=1)
    features[BATCH_SIZE + 1] = np.nan
    problem.trainer.set_training_model(harness.nan_propagating_model(problem))
    return harness.batches(features, labels, BATCH_SIZE)


def validate(harness, problem, directory, caplog, metric_to_monitor, run_async=False, expect=None, **checkpoint_kwargs):
    mlp = problem.mlp
    validation = mlp.callbacks.TestMetricsLogger(
        nan_validation(harness, problem), "validation", mlp.evaluation.MetricEvaluator(trainer=problem.trainer),
        run_async=run_async,
    )  # fmt: skip
    checkpoint_manager = mlp.callbacks.CheckpointManager(
        checkpoints_path=str(directory), metric_to_monitor=metric_to_monitor, **checkpoint_kwargs
    )
    manager = mlp.trainers.TrainingManager(
        problem.trainer, problem.training_batches, num_epochs=3, callbacks=[validation, checkpoint_manager]
    )
    logging.getLogger("mlpug").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="mlpug"):
            if expect is None:
                manager.start_training()
                return None, checkpoint_manager
            with pytest.raises(expect) as caught:
                manager.start_training()
            return caught.value, checkpoint_manager
    finally:
        logging.getLogger("mlpug").propagate = False


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_a_nan_monitored_validation_metric_ends_the_run_with_an_error(harness, tmp_path, caplog, run_async):
    """Before: validation.dataset.loss NaN at every epoch, no best model file, no word, "All good"."""
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    error, checkpoint_manager = validate(
        harness, problem, tmp_path, caplog, "validation.dataset.loss", run_async, expect=NonFiniteMetricError
    )
    # the epoch of the evaluated weights: asynchronous results land later, tagged with it
    assert (error.metric, error.epoch) == ("validation.dataset.loss", 0) and np.isnan(error.value)
    assert "the monitored metric 'validation.dataset.loss' is nan at epoch 0" in str(error)
    assert "non_finite_metric='warn'" in str(error)
    assert "validation.dataset.loss = nan" in caplog.text and "weights of epoch 0" in caplog.text
    assert "All good" not in caplog.text
    assert not os.path.exists(checkpoint_manager.file_names.best_model)


def test_a_nan_validation_metric_without_a_monitor_is_a_warning_naming_it_and_its_epoch(harness, tmp_path, caplog):
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    validate(harness, problem, tmp_path, caplog, metric_to_monitor=None)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    for epoch in range(3):
        assert any(f"weights of epoch {epoch} " in w and "validation.dataset.loss = nan" in w for w in warnings)


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_non_finite_metric_warn_goes_on_and_says_no_best_model_was_written(harness, tmp_path, caplog, run_async):
    problem = harness.make_problem(batch_size=BATCH_SIZE)
    _, checkpoint_manager = validate(
        harness, problem, tmp_path, caplog, "validation.dataset.loss", run_async, non_finite_metric="warn"
    )
    assert "the monitored metric 'validation.dataset.loss' is nan at epoch 0" in caplog.text
    assert "was not finite at 3 check(s) of this run; no best model" in caplog.text
    assert not os.path.exists(checkpoint_manager.file_names.best_model)
    assert os.path.exists(checkpoint_manager.file_names.training)  # training went on and wrote its checkpoints


def test_bad_weights_and_metric_policies_are_refused_at_construction(harness, tmp_path):
    problem = harness.make_problem()
    mlp = problem.mlp
    with pytest.raises(ValueError, match=r"non_finite_weights must be one of \['raise', 'warn'\], got 'skip'"):
        mlp.trainers.TrainingManager(problem.trainer, problem.training_batches, non_finite_weights="skip")
    with pytest.raises(ValueError, match=r"check_weights_every must be an int >= 1 \(training steps\) or None, got 0"):
        mlp.trainers.TrainingManager(problem.trainer, problem.training_batches, check_weights_every=0)
    with pytest.raises(ValueError, match=r"non_finite_metric must be one of \['raise', 'warn'\], got 'ignore'"):
        mlp.callbacks.CheckpointManager(checkpoints_path=str(tmp_path), non_finite_metric="ignore")
