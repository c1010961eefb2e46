"""The neutral one-call facade (``mlpug.trainers.one_call``) on the fake pure-Python backend: datasets batched or
used as they are, the standard callbacks in their order, and a result equal to the parts written by hand."""

from types import SimpleNamespace

import numpy as np
import pytest

import mlpug.data
import mlpug.evaluation
import mlpug.trainers.callbacks
from mlpug.trainers.one_call import OneCallTrainer, split_batch
from mlpug.trainers.training import TrainingManager
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
        return {"loss": FakeScalar(self.loss_func(outputs, targets)), "auxiliary_results": {"grads": grads}}


class FakeOneCall(OneCallTrainer):
    backend = SimpleNamespace(
        trainers=SimpleNamespace(DefaultTrainer=FakeTrainer, TrainingManager=TrainingManager),
        evaluation=mlpug.evaluation,
        callbacks=mlpug.trainers.callbacks,
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
        mlpug.trainers.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlpug.trainers.callbacks.TestMetricsLogger(validation, "validation", metric_evaluator=evaluator),
        mlpug.trainers.callbacks.MetricsHistory(),
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
    mine = mlpug.trainers.callbacks.Callback("mine")
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
