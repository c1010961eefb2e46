"""The neutral one-call facade (``mlpug.one_call``) on the fake pure-Python backend: datasets batched or
used as they are, the standard callbacks in their order, and a result equal to the parts written by hand."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

import mlpug.callbacks
import mlpug.data
import mlpug.evaluation
from mlpug.one_call import OneCallTrainer, check_targets_fit, split_batch
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import SGD, FakeScalar, FakeTrainer, LinearModel


def squared_error(outputs, targets):
    return float(np.mean((outputs - targets) ** 2))


class FakeLossModel:
    """``{"loss": loss_func(outputs, targets), ...}`` of a linear model, with the squared error's gradients."""

    def __init__(self, model, loss_func):
        self.model, self.loss_func = model, loss_func

    def __call__(self, batch, evaluate_settings=None, inference_mode=None):
        inputs, targets = split_batch(batch)
        outputs = self.model.w * inputs + self.model.b
        errors = outputs - targets
        grads = (float(np.mean(2 * errors * inputs)), float(np.mean(2 * errors)))
        return {
            "loss": FakeScalar(self.loss_func(outputs, targets)),
            "auxiliary_results": {"grads": grads, "outputs": outputs},
        }

    def check_targets(self, batch, outputs):
        predictions, targets = outputs.auxiliary_results["outputs"], np.asarray(split_batch(batch)[1])

        def loss(made_up, change):
            outputs, values = (predictions, targets)
            if made_up:
                outputs = np.linspace(0.1, 0.9, outputs.size).reshape(outputs.shape)
                values = np.linspace(0.9, 0.1, values.size).reshape(values.shape)
            if change == "targets":
                values = values.reshape(outputs.shape)
            elif change == "outputs":
                outputs = outputs.reshape(values.shape)
            elif change is not None:
                values = np.roll(values, 1, change)
            return self.loss_func(outputs, values)

        check_targets_fit(predictions.shape, targets.shape, loss)


class FakeOneCall(OneCallTrainer):
    backend = SimpleNamespace(
        trainers=SimpleNamespace(DefaultTrainer=FakeTrainer, TrainingManager=TrainingManager),
        evaluation=mlpug.evaluation,
        callbacks=mlpug.callbacks,
        data=mlpug.data,
    )

    def _training_model(self, model, loss_func):
        return FakeLossModel(model, loss_func)


def samples(num_samples=22, seed=0):
    inputs = np.random.default_rng(seed).uniform(-1, 1, size=num_samples)
    return inputs, 2.0 * inputs - 1.0


def test_arrays_are_batched_in_the_resumable_order_and_train_like_the_parts_written_by_hand():
    model = LinearModel()
    trainer = FakeOneCall(model, squared_error, SGD(0.1))
    history = trainer.train(samples(), samples(8, seed=1), num_epochs=3, batch_size=4, seed=5, progress=None)

    by_hand = LinearModel()
    default_trainer = FakeTrainer(optimizers=SGD(0.1), model_components=by_hand)
    default_trainer.set_training_model(FakeLossModel(by_hand, squared_error))
    evaluator = mlpug.evaluation.MetricEvaluator(trainer=default_trainer)
    validation = mlpug.data.ResumableArrayBatches(samples(8, seed=1), 4, shuffle=False)
    callbacks = [
        mlpug.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlpug.callbacks.TestMetricsLogger(validation, "validation", metric_evaluator=evaluator),
        mlpug.callbacks.MetricsHistory(),
    ]
    training = mlpug.data.ResumableArrayBatches(samples(), 4, shuffle=True, seed=5)
    TrainingManager(default_trainer, training, num_epochs=3, callbacks=callbacks).start_training()

    assert (model.w, model.b) == (by_hand.w, by_hand.b) and model.w != 0.0
    assert trainer.manager.global_iter == 3 * 6  # 22 samples: 6 batches of 4 (the last of 2)
    assert [row["validation.dataset.loss"] for row in history.rows] == [
        row["validation.dataset.loss"] for row in callbacks[-1].rows
    ]


@pytest.mark.parametrize(
    "progress, expected",
    [
        (None, ["TrainingMetricsLogger", "TestMetricsLogger[validation]", "MetricsHistory", "mine"]),
        ("log", ["TrainingMetricsLogger", "TestMetricsLogger[validation]", "LogProgress", "MetricsHistory", "mine"]),
    ],
)
def test_the_standard_callbacks_come_first_and_yours_last(progress, expected):
    trainer = FakeOneCall(LinearModel(), squared_error, SGD(0.1))
    mine = mlpug.callbacks.Callback("mine")
    trainer.train(samples(), samples(8), batch_size=4, progress=progress, callbacks=[mine])
    assert [callback.name for callback in trainer.manager.callbacks] == expected


def test_batches_made_elsewhere_are_used_as_they_are_and_batch_size_cannot_apply_to_them():
    inputs, targets = samples(8)
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    trainer = FakeOneCall(LinearModel(), squared_error, SGD(0.1))
    trainer.train(batches, batches, progress=None, batch_size=None, validation_batch_size=None)
    assert trainer.manager.global_iter == 2
    trainer.train(samples(), batches, batch_size=4, progress=None)  # batch_size is the training samples' only
    with pytest.raises(ValueError, match=r"validation_dataset \(list\) already yields batches, so batch_size=4"):
        trainer.train(samples(), batches, validation_batch_size=4)
    with pytest.raises(TypeError, match=r"needs batches \(inputs, targets\), got a list of 3 items"):
        trainer.train([[1, 2, 3]], progress=None)


def test_the_neutral_base_and_a_loss_named_metric_are_refused():
    with pytest.raises(TypeError, match="use a backend's mlp.Trainer"):
        OneCallTrainer(LinearModel(), squared_error, SGD(0.1))
    with pytest.raises(ValueError, match="'loss' is always logged"):
        FakeOneCall(LinearModel(), squared_error, SGD(0.1), metrics={"loss": squared_error})


# ----- first-batch checks: before the first optimizer step -----


def test_targets_that_broadcast_against_the_outputs_stop_training_before_the_first_step():
    inputs, targets = samples()
    model = LinearModel()
    trainer = FakeOneCall(model, squared_error, SGD(0.1))
    with pytest.raises(ValueError, match=r"outputs have shape \[4\] and the targets \[4, 1\]; in loss_func they "
                       r"broadcast to \[4, 4\].*targets\[\.\.\., 0\].*allow_broadcast=True"):  # fmt: skip
        trainer.train((inputs, targets[:, None]), batch_size=4, progress=None)
    assert (model.w, model.b) == (0.0, 0.0) and trainer.manager.global_iter == 0  # no step
    FakeOneCall(model, squared_error, SGD(0.1), allow_broadcast=True).train(
        (inputs, targets[:, None]), batch_size=4, progress=None
    )
    assert model.w != 0.0  # deliberately allowed

    def aligned_squared_error(outputs, targets):  # as Keras losses: the targets take the outputs' shape
        return squared_error(outputs, np.reshape(targets, np.shape(outputs)))

    model = LinearModel()
    FakeOneCall(model, aligned_squared_error, SGD(0.1)).train((inputs, targets[:, None]), batch_size=4, progress=None)
    assert model.w != 0.0  # no false alarm
    with pytest.raises(TypeError, match="allow_broadcast must be True or False, got 'yes'"):
        FakeOneCall(LinearModel(), squared_error, SGD(0.1), allow_broadcast="yes")


def test_a_metric_of_another_signature_fails_before_the_first_step_with_the_expected_one():
    def mae(y_true, y_pred):
        return float(np.mean(np.abs(y_true - y_pred)))

    model = LinearModel()
    trainer = FakeOneCall(model, squared_error, SGD(0.1), metrics={"mae": mae})
    with pytest.raises(TypeError, match=r"metric function 'mae' is .*mae\(y_true, y_pred\), but metric functions take "
                       r"one argument, an mlp.evaluation.MetricInputs.*lambda inputs"):  # fmt: skip
        trainer.train(samples(), batch_size=4, progress=None)
    assert (model.w, model.b) == (0.0, 0.0)


def test_metric_functions_are_called_once_on_the_first_batch_before_its_step_at_every_training_start():
    model = LinearModel()
    seen = []

    def weight_when_called(inputs):
        seen.append(model.w)
        return FakeScalar(0.0)

    trainer = FakeOneCall(model, squared_error, SGD(0.1), metrics={"w": weight_when_called})
    trainer.train(samples(), batch_size=4, progress=None)  # 6 batches
    assert len(seen) == 1 + 6 and seen[0] == 0.0 != seen[1]  # the check before the first step, then after each
    first_run_end = model.w
    trainer.train(samples(), batch_size=4, progress=None)
    assert len(seen) == 2 * (1 + 6) and seen[7] == first_run_end != seen[8]


def test_a_metric_that_cannot_run_on_the_outputs_fails_before_the_first_step_with_notes():
    def needs_logits(inputs):
        return inputs.auxiliary_results["logits"]

    model = LinearModel()
    trainer = FakeOneCall(model, squared_error, SGD(0.1), metrics={"needs_logits": needs_logits})
    with pytest.raises(KeyError) as raised:
        trainer.train(samples(), batch_size=4, progress=None)
    notes = "\n".join(raised.value.__notes__)
    assert "metric function 'needs_logits'" in notes and "before any optimizer step" in notes
    assert (model.w, model.b) == (0.0, 0.0)


@pytest.mark.parametrize(
    "loss_func",
    [
        lambda outputs, targets: squared_error(outputs[:, None], targets),  # the outputs take the targets' shape
        lambda outputs, targets: squared_error(outputs, targets[..., 0]),  # indexing, which reshaped targets break
    ],
    ids=["outputs_expanded", "targets_indexed"],
)
def test_a_loss_that_aligns_the_shapes_itself_either_way_passes(loss_func):
    inputs, targets = samples()
    model = LinearModel()
    FakeOneCall(model, loss_func, SGD(0.1)).train((inputs, targets[:, None]), batch_size=4, progress=None)
    assert model.w != 0.0  # no false alarm


def test_the_fix_for_targets_that_broadcast_names_both_ways_to_align_them():
    outputs, targets = np.linspace(0.1, 0.9, 4)[:, None], np.linspace(0.9, 0.1, 4)

    def loss(made_up, change):
        changed_outputs, changed_targets = outputs, targets
        if change == "targets":
            changed_targets = targets.reshape(outputs.shape)
        elif change == "outputs":
            changed_outputs = outputs.reshape(targets.shape)
        elif change is not None:
            changed_targets = np.roll(targets, 1, change)
        return squared_error(changed_outputs, changed_targets)

    expected = (
        r"outputs have shape \[4, 1\] and the targets \[4\]; in loss_func they broadcast to \[4, 4\].*Fix: reshape "
        r"one to the other's shape, either the targets to \[4, 1\] \(e.g. targets\[\.\.\., None\]\) or, in "
        r"loss_func, the outputs to \[4\] \(e.g. outputs\[\.\.\., 0\]\); or.*allow_broadcast=True"
    )
    with pytest.raises(ValueError, match=expected):
        check_targets_fit([4, 1], [4], loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check's own calls warn nobody

        def warning_loss(made_up, change):
            warnings.warn("a broadcast", UserWarning, stacklevel=2)
            return loss(made_up, change)

        with pytest.raises(ValueError, match="broadcast to"):
            check_targets_fit([4, 1], [4], warning_loss)
