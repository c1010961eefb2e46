"""Contract tests of asynchronous dataset evaluation (``TestMetricsLogger(..., run_async=True)``) on every backend:
the same numbers as synchronous evaluation, late results tagged with the epoch of the weights they evaluated, the
best model checkpoint holding the evaluated snapshot, worker errors surfacing, the overflow policy, untouched random
streams and a resume with a pending evaluation."""

import logging
import random
import re
import threading

import numpy as np
import pytest

from mlpug.callbacks.lr_scheduler import LRSchedulerWrapper

NUM_EPOCHS = 4


def flat_weights(harness, model_components):
    """The classifier's arrays of a checkpoint's ``model_components``, in the order of ``harness.weights``."""
    (component,) = model_components.values()
    return harness.component_weights(component)


class Recorder:
    """Records, per epoch end, the live weights and what the validation section of ``logs.current`` holds."""

    def __init__(self, harness, problem, stop_at=None, fail_at=None, at_epoch_end=None):
        mlp = problem.mlp
        self.weights, self.tags, self.landed = {}, {}, {}
        recorder = self

        class Record(mlp.callbacks.Callback):
            pending: list = []  # the epochs of the validation results published since the last epoch end

            def on_evaluation_result(self, result, logs):
                if result.dataset_name == "validation":
                    self.pending = [*self.pending, result.epoch]
                return True

            def on_epoch_completed(self, logs):
                current = logs["current"]
                recorder.weights[current["epoch"]] = harness.weights(problem)
                recorder.tags[current["epoch"]] = current.get("validation", {}).get("evaluated_at")
                recorder.landed[current["epoch"]], self.pending = self.pending, []
                if stop_at is not None and current["epoch"] == stop_at:  # an int: at this epoch's end
                    self.training_manager.stop_training()
                if at_epoch_end is not None:
                    at_epoch_end(self.training_manager, current["epoch"])
                return True

            def on_batch_training_start(self, batch, logs):
                position = (logs["current"]["epoch"], logs["current"]["batch_step"])
                if fail_at is not None and position == fail_at:
                    raise RuntimeError("injected crash")
                if stop_at is not None and position == stop_at:
                    self.training_manager.stop_training()  # this batch trains, then training stops
                return True

        self.callback = Record("Record")


def run(
    harness,
    directory,
    run_async=True,
    num_epochs=NUM_EPOCHS,
    validation=None,
    metric_opt_mode="min",
    resume_from=None,
    fail_at=None,
    stop_at=None,
    evaluator_metrics=None,
    at_epoch_end=None,
    extra_callbacks=(),
    record_best_decisions=False,
    **logger_options,
):
    problem = harness.make_problem(num_batches=3)
    mlp = problem.mlp
    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=problem.trainer, batch_metric_funcs={"accuracy": mlp.metrics.accuracy}
    )
    validation_evaluator = evaluator
    if evaluator_metrics is not None:
        validation_evaluator = mlp.evaluation.MetricEvaluator(
            trainer=problem.trainer, batch_metric_funcs=evaluator_metrics
        )
    recorder = Recorder(harness, problem, stop_at=stop_at, fail_at=fail_at, at_epoch_end=at_epoch_end)
    history = mlp.callbacks.MetricsHistory()
    manager_callback = mlp.callbacks.CheckpointManager(
        checkpoints_path=str(directory), metric_opt_mode=metric_opt_mode, write_in_background=False
    )
    if record_best_decisions:
        manager_callback.improvement = RecordingRule(manager_callback.improvement)
    validation_dataset = problem.validation_batches if validation is None else validation(problem)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(
            validation_dataset,
            "validation",
            metric_evaluator=validation_evaluator,
            run_async=run_async,
            **logger_options,
        ),
        manager_callback,
        history,
        recorder.callback,
        *extra_callbacks,
    ]
    manager = mlp.trainers.TrainingManager(
        problem.trainer, problem.training_batches, num_epochs=num_epochs, callbacks=callbacks, resume_from=resume_from
    )
    manager.start_training()
    return problem, manager, history, recorder, manager_callback


def validation_rows(history):
    return {
        row["epoch"]: (row.get("validation.dataset.loss"), row.get("validation.dataset.accuracy"))
        for row in history.rows
    }


def test_asynchronous_results_equal_synchronous_ones_exactly_and_land_tagged_one_epoch_later(harness, tmp_path):
    _, _, sync_history, sync_recorder, _ = run(harness, tmp_path / "sync", run_async=False)
    _, manager, history, recorder, _ = run(harness, tmp_path / "async")
    assert validation_rows(history) == validation_rows(sync_history)  # bit-identical, every epoch
    assert all(value is not None for pair in validation_rows(history).values() for value in pair)
    # synchronous: each epoch's own result; asynchronous: epoch k's result lands at the end of epoch k + 1,
    # and at the last epoch its own result lands as well (nothing is left to train)
    assert sync_recorder.landed == {0: [0], 1: [1], 2: [2], 3: [3]}
    assert recorder.landed == {0: [], 1: [0], 2: [1], 3: [2, 3]}
    assert recorder.tags[0] is None
    assert [recorder.tags[epoch]["epoch"] for epoch in (1, 2, 3)] == [0, 1, 3]
    assert recorder.tags[1]["global_iter"] == 2  # the last batch of epoch 0 (3 batches per epoch)
    # the last epoch's validation is in the final logs, tagged with its own epoch
    final = manager.logs["current"]["validation"]
    assert final["evaluated_at"] == {"epoch": 3, "batch_step": 2, "global_iter": 11}
    assert final["dataset"]["loss"] == validation_rows(sync_history)[3][0]


def test_the_best_model_checkpoint_holds_the_evaluated_snapshot_not_the_live_weights(harness, tmp_path):
    _, _, sync_history, _, _ = run(harness, tmp_path / "sync", run_async=False)
    losses = [row["validation.dataset.loss"] for row in sync_history.rows]
    # a mode whose best epoch is not the last: that result lands one epoch late, after the weights moved on
    mode, best_epoch = min((("max", losses.index(max(losses))), ("min", losses.index(min(losses)))), key=lambda m: m[1])
    assert best_epoch < NUM_EPOCHS - 1
    problem, _, _, recorder, checkpoint_manager = run(harness, tmp_path / "async", metric_opt_mode=mode)
    assert checkpoint_manager.best_epoch == best_epoch
    assert checkpoint_manager.best_logs["landed_at"]["epoch"] == best_epoch + 1
    best = problem.mlp.load_model_checkpoint(checkpoint_manager.file_names.best_model)
    assert best["progress"]["epoch"] == best_epoch and best["progress"]["global_iter"] == 3 * best_epoch + 2
    saved = flat_weights(harness, best["model_components"])
    for saved_array, evaluated, live in zip(saved, recorder.weights[best_epoch], recorder.weights[best_epoch + 1]):
        np.testing.assert_array_equal(saved_array, evaluated)
        assert not np.array_equal(saved_array, live)


def test_an_exception_in_the_evaluation_worker_is_raised_in_the_training_loop(harness, tmp_path):
    def failing_metric(inputs):
        raise ZeroDivisionError("metric failed on the worker thread")

    with pytest.raises(ZeroDivisionError, match="worker thread") as raised:
        run(harness, tmp_path, evaluator_metrics={"bad": failing_metric})
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "asynchronous evaluation of 'validation' of the weights of epoch 0" in notes
    # at a batch boundary of the next epoch (or at its end, when the worker needed longer)
    assert re.search(r"training failed at (the end of )?epoch 1\b", notes), notes


class GatedDataset:
    """The validation batches, held back until ``gate`` is set (a slow evaluation)."""

    def __init__(self, batches, gate):
        self.batches, self.gate = batches, gate

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            assert self.gate.wait(30), "gate never opened"
            yield batch


def test_overflow_skip_skips_the_trigger_of_a_full_queue_and_says_which_epoch(harness, tmp_path, caplog):
    gate = threading.Event()

    def open_gate_after_epoch_1(manager, epoch):  # runs after the logger skipped epoch 1's evaluation
        if epoch == 1:
            gate.set()
            (logger,) = [c for c in manager.callbacks if c.name == "TestMetricsLogger[validation]"]
            logger._async._pending[0].future.result(timeout=60)  # epoch 0's evaluation finishes before epoch 2 ends

    with caplog.at_level(logging.WARNING, logger="mlpug"):
        try:
            _, _, history, recorder, _ = run(
                harness,
                tmp_path,
                validation=lambda p: GatedDataset(p.validation_batches, gate),
                at_epoch_end=open_gate_after_epoch_1,
                max_pending=1,
                overflow="skip",
            )
        finally:
            gate.set()
    rows = validation_rows(history)
    assert rows[1] == (None, None)  # the evaluation of epoch 1 was skipped: the queue held epoch 0's
    assert all(None not in rows[epoch] for epoch in (0, 2, 3))
    assert recorder.landed[2] == [0] and recorder.landed[3][-1] == 3  # the last epoch is never skipped
    assert "the evaluation of epoch 1 is skipped" in caplog.text


def test_overflow_wait_waits_for_the_oldest_and_evaluates_every_epoch(harness, tmp_path):
    gate = threading.Event()
    timer = threading.Timer(1.0, gate.set)
    timer.start()
    try:
        _, _, history, recorder, _ = run(
            harness, tmp_path, validation=lambda p: GatedDataset(p.validation_batches, gate), overflow="wait"
        )
    finally:
        timer.cancel()
        gate.set()
    _, _, sync_history, _, _ = run(harness, tmp_path / "sync", run_async=False)
    assert validation_rows(history) == validation_rows(sync_history)
    assert recorder.landed[1] == [0]  # epoch 1's trigger waited for epoch 0's evaluation, which landed then


class DrawingDataset:
    """Draws from Python's and NumPy's global generators when iterated, as ``iter(DataLoader)`` does from torch's."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        random.random()
        np.random.random()
        return iter(self.batches)


def test_the_evaluation_does_not_move_the_training_random_streams(harness, tmp_path):
    states = []
    for run_async in (True, False):
        random.seed(1)
        np.random.seed(1)
        problem, _, _, _, _ = run(
            harness,
            tmp_path / str(run_async),
            run_async=run_async,
            validation=lambda p: DrawingDataset(p.validation_batches),
        )
        states.append((random.random(), np.random.random()))
    assert states[0] == states[1]


def test_a_resume_with_a_pending_evaluation_redoes_it_and_ends_as_an_uninterrupted_run(harness, tmp_path):
    _, _, uninterrupted, _, _ = run(harness, tmp_path / "full")
    with pytest.raises(RuntimeError, match="injected crash"):
        run(harness, tmp_path / "resumed", fail_at=(2, 1))  # after the epoch-1 checkpoint, evaluation 1 pending
    problem, _, history, recorder, checkpoint_manager = run(harness, tmp_path / "resumed", resume_from="latest")
    state = problem.mlp.load_training_checkpoint(checkpoint_manager.training_checkpoint_path)
    assert state["epoch"] == NUM_EPOCHS
    assert validation_rows(history) == validation_rows(uninterrupted)
    assert recorder.landed == {2: [1], 3: [2, 3]}  # epoch 1's evaluation, redone from its saved weights


def test_a_checkpoint_holds_the_pending_evaluations_with_their_weights_and_a_stop_lands_them(harness, tmp_path):
    # stopped at the end of epoch 0: its epoch checkpoint (the last one) holds the pending evaluation of epoch 0
    problem, _, history, recorder, checkpoint_manager = run(harness, tmp_path / "epoch_end", num_epochs=3, stop_at=0)
    state = problem.mlp.load_training_checkpoint(checkpoint_manager.training_checkpoint_path)
    (pending,) = state["callbacks"]["TestMetricsLogger[validation]"]["pending"]
    assert (pending["epoch"], pending["global_iter"]) == (0, 2)
    for saved, live in zip(flat_weights(harness, pending["model_components"]), recorder.weights[0]):
        np.testing.assert_array_equal(saved, live)
    assert None not in validation_rows(history)[0]  # and the stop landed it before training ended
    # stopped in the middle of epoch 1: the final training checkpoint follows the landing, nothing is pending
    problem, manager, history, _, checkpoint_manager = run(
        harness, tmp_path / "mid_epoch", num_epochs=3, stop_at=(1, 1)
    )
    state = problem.mlp.load_training_checkpoint(checkpoint_manager.training_checkpoint_path)
    assert (state["epoch"], state["batch_step"]) == (1, 2)
    assert state["callbacks"]["TestMetricsLogger[validation]"] == {"pending": []}
    assert manager.logs["current"]["validation"]["evaluated_at"]["epoch"] == 0
    assert checkpoint_manager.best_epoch == 0 and None not in validation_rows(history)[0]


def test_bad_asynchronous_options_are_refused_at_construction(harness):
    problem = harness.make_problem()
    mlp = problem.mlp
    evaluator = mlp.evaluation.MetricEvaluator(trainer=problem.trainer)
    data = problem.validation_batches
    with pytest.raises(ValueError, match="batch_level=False"):
        mlp.callbacks.TestMetricsLogger(data, "validation", evaluator, batch_level=True, run_async=True)
    with pytest.raises(ValueError, match="max_pending"):
        mlp.callbacks.TestMetricsLogger(data, "validation", evaluator, run_async=True, max_pending=0)
    with pytest.raises(ValueError, match="overflow"):
        mlp.callbacks.TestMetricsLogger(data, "validation", evaluator, run_async=True, overflow="drop")
    with pytest.raises(ValueError, match="num_threads"):
        mlp.callbacks.TestMetricsLogger(data, "validation", evaluator, run_async=True, num_threads=0)
    with pytest.raises(TypeError, match="run_async"):
        mlp.callbacks.TestMetricsLogger(data, "validation", evaluator, run_async="yes")


class RecordingRule:
    """An improvement rule that records every value it is asked about, and answers as the rule it wraps."""

    def __init__(self, rule):
        self.rule, self.asked = rule, []
        self.mode, self.min_delta = rule.mode, rule.min_delta

    def is_improvement(self, value, best):
        self.asked.append(value)
        return self.rule.is_improvement(value, best)


def test_two_results_landing_in_one_hook_reach_every_consumer_in_order_once(harness, tmp_path):
    """At the last epoch end the results of epochs 2 and 3 land together: EarlyStopping, LR on plateau,
    MetricsHistory, TensorBoard and the CheckpointManager each get both, oldest first, once (the value of every
    evaluated epoch, as the synchronous run has them)."""
    from tests.contract.test_tensorboard import scalars

    _, _, sync_history, _, _ = run(harness, tmp_path / "sync", run_async=False)
    losses = [row["validation.dataset.loss"] for row in sync_history.rows]
    mlp = harness.make_problem(num_batches=3).mlp
    stopping = mlp.callbacks.EarlyStopping("validation.dataset.loss", patience=100)
    stopping.improvement = RecordingRule(stopping.improvement)
    stepped = []

    class PlateauWrapper(LRSchedulerWrapper):  # the neutral wrapper, with a scheduler that records its steps
        def check_scheduler(self, name, scheduler):
            pass

        def step_scheduler(self, name, scheduler, metric):
            stepped.append(metric)

        def scheduler_state(self, name, scheduler):
            return {}

        def load_scheduler_state(self, name, scheduler, state):
            pass

    plateau = PlateauWrapper(object(), batch_level=False, metric_to_monitor="validation.dataset.loss")
    board = mlp.callbacks.Tensorboard(["validation.dataset.loss"], log_dir=str(tmp_path / "tb"))

    _, _, history, recorder, checkpoints = run(
        harness, tmp_path / "async", extra_callbacks=[stopping, plateau, board], record_best_decisions=True
    )
    assert recorder.landed[NUM_EPOCHS - 1] == [NUM_EPOCHS - 2, NUM_EPOCHS - 1]  # two results in one hook
    assert stopping.improvement.asked == losses
    assert stepped == losses
    assert [row["validation.dataset.loss"] for row in history.rows] == losses
    assert checkpoints.improvement.asked == losses
    written = scalars(tmp_path / "tb" / "validation-dataset", "loss")
    assert [step for step, _ in written] == [2, 5, 8, 11]  # at the step of the evaluated weights
    assert [value for _, value in written] == pytest.approx(losses)


def test_a_resume_after_a_failed_epoch_end_evaluates_that_epoch_once(harness, tmp_path):
    """An epoch-end hook fails after the evaluation of that epoch was triggered: the emergency checkpoint holds it as
    pending; the resumed run repeats the epoch end and must not start a second evaluation of the same weights."""
    published = []

    class Published(harness.mlp.callbacks.Callback):
        def on_evaluation_result(self, result, logs):
            published.append(result.epoch)
            return True

    def fail_once(manager, epoch):
        if epoch == 1 and not published_fail_once:
            published_fail_once.append(True)
            raise RuntimeError("epoch-end hook failed")

    published_fail_once = []
    with pytest.raises(RuntimeError, match="epoch-end hook failed"):
        run(harness, tmp_path, at_epoch_end=fail_once, extra_callbacks=[Published("Published")])
    assert published == [0]
    emergency = harness.mlp.callbacks.CheckpointManager(checkpoints_path=str(tmp_path)).file_names.emergency_training
    published.clear()
    run(harness, tmp_path, resume_from=emergency, at_epoch_end=fail_once, extra_callbacks=[Published("Published")])
    assert published == [1, 2, 3]  # epoch 1 redone from the checkpoint, once
