"""Contract tests: the same scenario gives the same hooks, logs and console structure on every backend."""

import re
import signal

import pytest

from tests.contract.backends import make_numpy_data
from tests.recording import RecordingCallback

NUM_EPOCHS = 2


def run(problem, callbacks, num_epochs=NUM_EPOCHS, **manager_kwargs):
    mlp = problem.mlp
    manager = mlp.trainers.TrainingManager(
        problem.trainer, problem.training_batches, num_epochs=num_epochs, callbacks=callbacks, **manager_kwargs
    )
    manager.start_training()
    return manager


def standard_callbacks(problem, log_lines, recorder):
    mlp = problem.mlp
    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=problem.trainer, batch_metric_funcs={"accuracy": problem.accuracy}
    )
    return [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(problem.validation_batches, "validation", metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(
            problem.validation_batches, "validation_batches", metric_evaluator=evaluator, batch_level=True
        ),
        mlp.callbacks.LogProgress(
            log_period=2, set_names=["training", "validation", "validation_batches"], write=log_lines.append
        ),
        recorder,
    ]


def test_hook_counts(harness):
    problem = harness.make_problem(num_batches=4)
    recorder = RecordingCallback()
    run(problem, standard_callbacks(problem, [], recorder))
    assert recorder.count("on_training_start") == 1
    assert recorder.count("on_epoch_start") == NUM_EPOCHS
    assert recorder.count("on_batch_training_start") == NUM_EPOCHS * 4
    assert recorder.count("on_batch_training_completed") == NUM_EPOCHS * 4
    assert recorder.count("on_epoch_completed") == NUM_EPOCHS
    assert recorder.count("on_batch_checkpoint") == NUM_EPOCHS * 4
    assert recorder.count("on_epoch_checkpoint") == NUM_EPOCHS
    assert recorder.count("on_training_checkpoint") == 1
    assert recorder.count("on_batch_training_failed") == 0
    assert recorder.ended_with == dict(
        stopped_early=False, stopped_on_error=False, interrupted=False, callback_calls_success=True
    )


def test_logs_keys_and_value_types(harness):
    problem = harness.make_problem(num_batches=4)
    recorder = RecordingCallback(snapshot_logs=True)
    run(problem, standard_callbacks(problem, [], recorder))
    kind, logs = recorder.snapshots[-1]
    assert kind == "epoch"
    current = logs["current"]
    assert set(logs) == {
        "epoch",
        "final_epoch",
        "final_batch_step",
        "cb_calls_success",
        "resumed_mid_epoch",
        "training_settings",
        "evaluate_settings",
        "best",
        "current",
    }
    assert (current["epoch"], current["batch_step"], current["global_iter"]) == (1, 3, 7)
    for section in ("batch", "window_average"):
        assert set(current["training"][section]) == {"loss", "accuracy"}
        assert set(current["validation_batches"][section]) == {"loss", "accuracy"}
        assert all(type(v) is float for v in current["training"][section].values())
    assert set(current["validation"]["dataset"]) == {"loss", "accuracy"}
    assert all(type(v) is float for v in current["validation"]["dataset"].values())
    assert 0.0 <= current["validation"]["dataset"]["accuracy"] <= 1.0
    params = current["training_params"]
    assert type(params["batch"]["duration"]) is float and params["batch"]["duration"] > 0
    assert type(params["batch"]["lr"]) is float and params["batch"]["lr"] == pytest.approx(0.01)
    assert type(params["batch"]["batch_size"]) is int and params["batch"]["batch_size"] == 8
    assert type(params["window_average"]["duration"]) is float
    assert type(params["epoch"]["duration"]) is float


def test_console_output_structure(harness):
    problem = harness.make_problem(num_batches=4)
    lines = []
    run(problem, standard_callbacks(problem, lines, RecordingCallback()))
    masked = re.sub(r"\d+(\.\d+)?", "#", "".join(lines))
    expected_batch_block = (
        "Epoch #/# - ETA #:#:# - Batch #/# - # ms/batch\n"
        "Batch:\n"
        "training       : loss          #  accuracy      #.\n"
        "validation_batches: loss          #  accuracy      #.\n"
        "Moving average:\n"
        "training       : loss          #  accuracy      #.\n"
        "validation_batches: loss          #  accuracy      #.\n"
    )
    expected_epoch_block = (
        "#" * 79 + "\n"
        "Epoch #/#\tREADY - Duration #:#:# - ETA #:#:#\n"
        "Moving average:\n"
        "training       : loss          #  accuracy      #.\n"
        "validation_batches: loss          #  accuracy      #.\n"
        "\n"
        "Computed over dataset:\n"
        "validation     : loss          #  accuracy      #.\n"
        "\n"
    )
    masked_rule = re.sub(r"\d+(\.\d+)?", "#", "#" * 79)
    expected_epoch_block = expected_epoch_block.replace("#" * 79, masked_rule, 1)
    assert masked == (expected_batch_block * 2 + expected_epoch_block) * NUM_EPOCHS


def test_stop_training_mid_epoch(harness):
    problem = harness.make_problem(num_batches=4)
    recorder = RecordingCallback(actions={("on_batch_training_completed", 1): lambda m: m.stop_training()})
    manager = run(problem, [recorder])
    assert recorder.count("on_batch_training_completed") == 2
    assert recorder.count("on_epoch_completed") == 0
    assert recorder.ended_with["stopped_early"] and not recorder.ended_with["stopped_on_error"]
    assert (manager.epoch, manager.batch_step, manager.global_iter) == (0, 2, 2)


def test_exception_in_step_runs_failure_path(harness):
    problem = harness.make_problem(num_batches=4, fail_at_call=3)
    recorder = RecordingCallback()
    with pytest.raises(FloatingPointError, match="injected failure") as raised:
        run(problem, [recorder])
    assert recorder.count("on_batch_training_failed") == 1
    assert recorder.hook_names()[-3:] == ["on_batch_training_failed", "on_training_checkpoint", "on_training_ended"]
    assert recorder.ended_with["stopped_on_error"]
    assert any("epoch 0, batch step 2" in note for note in raised.value.__notes__)


def test_sigterm_ends_cleanly_at_batch_boundary(harness):
    problem = harness.make_problem(num_batches=4)
    recorder = RecordingCallback(
        actions={("on_batch_training_start", 5): lambda m: signal.raise_signal(signal.SIGTERM)}
    )
    with pytest.raises(SystemExit) as raised:
        run(problem, [recorder])
    assert raised.value.code == 128 + signal.SIGTERM
    assert recorder.count("on_batch_training_completed") == 6  # the batch in progress finishes
    assert recorder.ended_with == dict(
        stopped_early=True, stopped_on_error=False, interrupted=True, callback_calls_success=True
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_empty_training_dataset_is_refused_at_construction(harness):
    """A DataLoader-style list / a tf.data dataset of length 0. Broken on purpose (the length checks as before), the
    error names num_batches_per_epoch, which was never passed: this test fails."""
    problem = harness.make_problem(num_batches=1)
    features, labels = make_numpy_data(0, 0)
    empty = harness.batches(features, labels, 8)
    with pytest.raises(ValueError, match=r"training_dataset \(\w+\) is empty: len\(\) is 0"):
        problem.mlp.trainers.TrainingManager(problem.trainer, empty, num_epochs=1)


def test_failure_note_names_the_batch_whose_hook_raised(harness):
    """A batch-end hook raising at global iteration 5 (epoch 1, batch step 1). Broken on purpose (the note made from
    the counters, which already point at the next batch), the note says "batch step 2": this test fails."""

    def fail(manager):
        raise RuntimeError("hook failed")

    problem = harness.make_problem(num_batches=4)
    recorder = RecordingCallback(actions={("on_batch_training_completed", 5): fail})
    with pytest.raises(RuntimeError, match="hook failed") as raised:
        run(problem, [recorder])
    assert "mlpug: training failed at epoch 1, batch step 1 (global iteration 5)" in raised.value.__notes__


def test_metric_reading_missing_auxiliary_results_names_the_metric(harness):
    """The accuracy metric reads auxiliary_results, but the model returns only the loss. Broken on purpose (no note in
    MetricEvaluator.gather), the error is only "'NoneType' object has no attribute 'argmax'" (PyTorch) or TF's
    argmax error, without the metric or the cause: this test fails. The exception type is kept."""
    problem = harness.make_problem(num_batches=2)
    mlp = problem.mlp
    problem.trainer.set_training_model(harness.loss_only_model(problem))
    metrics = {"accuracy": problem.accuracy}
    evaluator = mlp.evaluation.MetricEvaluator(trainer=problem.trainer, batch_metric_funcs=metrics)
    with pytest.raises(Exception) as raised:
        problem.accuracy(problem.mlp.evaluation.MetricInputs(None, None, None, None))
    expected_type = type(raised.value)
    with pytest.raises(expected_type) as raised:
        run(problem, [mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator)], num_epochs=1)
    notes = "\n".join(raised.value.__notes__)
    assert "raised by metric function 'accuracy'" in notes
    assert "the model returned no auxiliary_results" in notes
