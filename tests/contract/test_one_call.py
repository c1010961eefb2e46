"""Contract tests of the one-call API ``mlp.Trainer`` on every backend: the same weights and rows as the full API,
checkpoints and exact resume through it, and early, named errors."""

import numpy as np
import pytest

from tests.contract.backends import make_numpy_data

BATCH_SIZE, NUM_EPOCHS = 8, 2
NON_TIMING = ("validation.dataset.loss", "validation.dataset.accuracy", "training.window_average.loss")


def arrays(seed, num_samples=4 * BATCH_SIZE + 3):  # a short last batch
    return make_numpy_data(num_samples, seed)


def one_call(harness, problem, **train_options):
    mlp = problem.mlp
    trainer = mlp.Trainer(
        problem.classifier,
        harness.loss_function(),
        problem.optimizer,
        metrics={"accuracy": mlp.metrics.accuracy},
        **harness.trainer_options(),
    )
    options = {"num_epochs": NUM_EPOCHS, "batch_size": BATCH_SIZE, "seed": 3, "progress": None, **train_options}
    return trainer, trainer.train(arrays(0), arrays(1), **options)


def full_api(harness, problem):
    """What ``mlp.Trainer.train`` stands for, written out with the parts (the README's full API)."""
    mlp = problem.mlp
    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=problem.trainer, batch_metric_funcs={"accuracy": mlp.metrics.accuracy}
    )
    training = mlp.data.ResumableArrayBatches(arrays(0), BATCH_SIZE, shuffle=True, seed=3)
    validation = mlp.data.ResumableArrayBatches(arrays(1), BATCH_SIZE, shuffle=False)
    history = mlp.callbacks.MetricsHistory()
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(validation, "validation", metric_evaluator=evaluator),
        history,
    ]
    mlp.trainers.TrainingManager(problem.trainer, training, num_epochs=NUM_EPOCHS, callbacks=callbacks).start_training()
    return history


def rows(history):
    return [[row[path] for path in NON_TIMING] for row in history.rows]


def test_the_one_call_api_gives_the_weights_and_rows_of_the_full_api(harness):
    written_out = harness.make_problem(seed=5)
    harness.apply_one_call_defaults(written_out)  # PyTorch: the fused optimizer that mlp.Trainer switches to
    history = full_api(harness, written_out)
    one = harness.make_problem(seed=5)
    trainer, one_history = one_call(harness, one)
    assert len(one_history.rows) == NUM_EPOCHS and trainer.manager.global_iter == NUM_EPOCHS * 5
    for a, b in zip(harness.weights(written_out), harness.weights(one)):
        np.testing.assert_array_equal(a, b)
    assert rows(one_history) == rows(history)
    assert all(0.0 <= row["validation.dataset.accuracy"] <= 1.0 for row in one_history.rows)


def test_checkpoints_and_an_exact_resume_pass_through(harness, tmp_path):
    straight = harness.make_problem(seed=6)
    one_call(harness, straight, checkpoints_path=str(tmp_path / "straight"))

    interrupted = harness.make_problem(seed=6)
    mlp = interrupted.mlp

    class StopAfterFirstEpoch(mlp.callbacks.Callback):
        stop = True

        def on_epoch_completed(self, logs):
            if self.stop:
                self.training_manager.stop_training()
            return True

    path = str(tmp_path / "interrupted")
    trainer, _ = one_call(harness, interrupted, checkpoints_path=path, callbacks=[StopAfterFirstEpoch("stop")])
    assert trainer.manager.epoch == 1
    resumed = harness.make_problem(seed=99)  # other initial weights: all of them must come from the checkpoint
    going_on = StopAfterFirstEpoch("stop")  # the same callbacks (a strict resume checks their names), not stopping
    going_on.stop = False
    trainer, history = one_call(harness, resumed, checkpoints_path=path, resume_from="latest", callbacks=[going_on])
    assert trainer.manager.global_iter == NUM_EPOCHS * 5 and [row["epoch"] for row in history.rows] == [0, 1]
    for a, b in zip(harness.weights(straight), harness.weights(resumed)):
        np.testing.assert_array_equal(a, b)


def test_batches_made_elsewhere_are_used_as_they_are(harness):
    problem = harness.make_problem(seed=7)
    mlp = problem.mlp
    trainer = mlp.Trainer(problem.classifier, harness.loss_function(), problem.optimizer, **harness.trainer_options())
    # training samples batched here, validation batches made by the user: batch_size applies to the first only
    history = trainer.train(arrays(0), problem.validation_batches, num_epochs=1, batch_size=BATCH_SIZE, progress=None)
    assert "epoch" in history.rows[0] and "validation.dataset.loss" in history.rows[0]
    history = trainer.train(problem.training_batches, num_epochs=1, progress=None)
    assert trainer.manager.global_iter == len(list(problem.training_batches))


def test_bad_arguments_are_named_before_anything_trains(harness):
    problem = harness.make_problem(seed=8)
    mlp = problem.mlp
    before = harness.weights(problem)
    with pytest.raises(TypeError, match="loss_func must be callable"):
        mlp.Trainer(problem.classifier, "cross-entropy", problem.optimizer)
    with pytest.raises(TypeError, match="metrics must map names"):
        mlp.Trainer(problem.classifier, harness.loss_function(), problem.optimizer, metrics={"accuracy": 1})
    with pytest.raises(TypeError, match="batch_chunk"):  # the DefaultTrainer's own check, at construction
        mlp.Trainer(problem.classifier, harness.loss_function(), problem.optimizer, batch_chunk="8")
    trainer = mlp.Trainer(problem.classifier, harness.loss_function(), problem.optimizer, **harness.trainer_options())
    with pytest.raises(ValueError, match=r"train_dataset \(.*\) already yields batches, so batch_size=8"):
        trainer.train(problem.training_batches, batch_size=8)
    with pytest.raises(ValueError, match="progress must be 'bar', 'log' or None, got 'tqdm'"):
        trainer.train(arrays(0), progress="tqdm")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        trainer.train(arrays(0), batch_size=0)
    with pytest.raises(ValueError, match="num_epochs"):
        trainer.train(arrays(0), num_epochs=0)
    with pytest.raises(TypeError, match="train_dataset must be a tuple of arrays"):
        trainer.train(42)
    features, labels = arrays(0)
    with pytest.raises(TypeError, match=r"train_dataset must be two arrays \(inputs, targets\), got a 3-tuple"):
        trainer.train((features, labels, labels))
    with pytest.raises(ValueError, match="train_dataset: arrays must all have the same number of samples"):
        trainer.train((features, labels[:-1]))
    with pytest.raises(ValueError, match=r"validation_batch_size=16 needs validation_dataset="):
        trainer.train(arrays(0), validation_batch_size=16)
    with pytest.raises(ValueError, match=r"metric_to_monitor='validation.dataset.accuracy' needs checkpoints_path="):
        trainer.train(arrays(0), arrays(1), metric_to_monitor="validation.dataset.accuracy")
    with pytest.raises(ValueError, match=r"resume_from='latest' needs checkpoints_path="):
        trainer.train(arrays(0), resume_from="latest")
    with pytest.raises(TypeError, match=r"metrics must map names to metric functions, e.g. \{'accuracy'"):
        mlp.Trainer(problem.classifier, harness.loss_function(), problem.optimizer, metrics=[mlp.metrics.accuracy])
    for a, b in zip(before, harness.weights(problem)):
        np.testing.assert_array_equal(a, b)


def test_the_default_progress_bar_writes_one_line_per_epoch_off_a_terminal(harness, capsys):
    problem = harness.make_problem(seed=9)
    mlp = problem.mlp
    trainer = mlp.Trainer(
        problem.classifier, harness.loss_function(), problem.optimizer, metrics={"accuracy": mlp.metrics.accuracy},
        **harness.trainer_options(),
    )  # fmt: skip
    trainer.train(arrays(0), arrays(1), num_epochs=2, batch_size=BATCH_SIZE)
    lines = [line for line in capsys.readouterr().out.splitlines() if "| Epoch: " in line]
    assert [line.split("| Epoch: ")[1].split(" ")[0] for line in lines] == ["1/2", "2/2"]
    assert all("Acc: " in line and "Loss: " in line and "5/5 batches" in line for line in lines), lines


# ----- first-batch checks: one batch, no optimizer step -----


def mae(y_true, y_pred):  # a metric of the Keras / scikit-learn form: not an mlpug metric function
    return abs(y_true - y_pred).mean()


def test_a_metric_of_another_signature_fails_before_the_first_step_in_the_one_call_and_the_full_api(harness):
    one = harness.make_problem(seed=7)
    before = harness.weights(one)
    trainer = one.mlp.Trainer(
        one.classifier, harness.loss_function(), one.optimizer, metrics={"mae": mae}, **harness.trainer_options()
    )
    expected = r"metric function 'mae' is mae\(y_true, y_pred\), but metric functions take one argument, an "
    with pytest.raises(TypeError, match=expected + r".*\{'mae': lambda inputs: mae\(inputs.batch\[1\]"):
        trainer.train(arrays(0), batch_size=BATCH_SIZE, progress=None)
    assert trainer.manager.global_iter == 0
    for a, b in zip(before, harness.weights(one)):
        np.testing.assert_array_equal(a, b)

    full = harness.make_problem(seed=7)
    mlp = full.mlp
    logger = mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(batch_metric_funcs={"mae": mae}))
    manager = mlp.trainers.TrainingManager(full.trainer, full.training_batches, callbacks=[logger])
    with pytest.raises(TypeError, match=expected):
        manager.start_training()
    assert manager.global_iter == 0
    for a, b in zip(before, harness.weights(full)):
        np.testing.assert_array_equal(a, b)


def test_metric_functions_run_once_on_the_first_batch_before_its_step_and_errors_say_so(harness):
    problem = harness.make_problem(seed=8)
    mlp, calls = problem.mlp, []

    def fails_on_first_call(inputs):
        calls.append(harness.weights(problem))
        if len(calls) == 1:
            raise ValueError("cannot compute this metric")
        return problem.accuracy(inputs)

    evaluator = mlp.evaluation.MetricEvaluator(batch_metric_funcs={"metric": fails_on_first_call})
    manager = mlp.trainers.TrainingManager(
        problem.trainer, problem.training_batches, callbacks=[mlp.callbacks.TrainingMetricsLogger(evaluator)]
    )
    with pytest.raises(ValueError, match="cannot compute this metric") as raised:
        manager.start_training()
    assert "first-batch check of the metric functions" in "\n".join(raised.value.__notes__)
    manager.start_training()  # a new start checks again (the second call passes), then trains all batches
    num_batches = len(problem.training_batches)
    assert len(calls) == 2 + num_batches and manager.global_iter == num_batches
    for a, b in zip(calls[0], calls[1]):  # both checks saw the initial weights: no step before either
        np.testing.assert_array_equal(a, b)
