"""MetricEvaluator(batch_chunk_size=...): big batches evaluated in chunks give the sample-weighted batch values."""

import pytest

from mlpug.evaluation import MetricEvaluator
from tests.core.fake_backend import SGD, FakeTrainer, LinearModel, TrainModel


class FloatLossTrainer(FakeTrainer):
    """The fake backend with Python-float losses (which support the arithmetic of combining chunks)."""

    def _is_scalar_loss(self, loss):
        return isinstance(loss, float)


class FloatLossModel(TrainModel):
    def __init__(self, model):
        super().__init__(model)
        self.batch_sizes = []

    def __call__(self, batch, evaluate_settings, inference_mode=None):
        self.batch_sizes.append(len(batch))
        results = super().__call__(batch, evaluate_settings, inference_mode)
        return {**results, "loss": results["loss"].value}


def make_evaluator(batch_chunk_size, metric_funcs=None):
    model = LinearModel(w=1.5, b=-0.5)
    trainer = FloatLossTrainer(optimizers=SGD(), model_components=model)
    train_model = FloatLossModel(model)
    trainer.set_training_model(train_model)
    evaluator = MetricEvaluator(trainer=trainer, batch_metric_funcs=metric_funcs, batch_chunk_size=batch_chunk_size)
    return evaluator, train_model


def make_batch(size, offset=0):
    return [((offset + i) / 5.0, (offset + i) % 3 - 1.0) for i in range(size)]


def large_error_mean(inputs):  # a mean over a data-dependent subset, with its own weight
    large = [abs(e) for e in inputs.auxiliary_results["errors"] if abs(e) > 1.0]
    return (sum(large) / len(large) if large else 0.0, len(large))


def test_chunked_batch_metrics_equal_whole_batch_metrics():
    batch = make_batch(11)
    funcs = {"large_error": large_error_mean}
    whole, whole_model = make_evaluator(None, funcs)
    chunked, chunked_model = make_evaluator(4, funcs)
    expected, got = whole.evaluate_batch(batch), chunked.evaluate_batch(batch)
    assert chunked_model.batch_sizes == [4, 4, 3] and whole_model.batch_sizes == [11]
    assert got["loss"][0] == pytest.approx(expected["loss"][0], rel=1e-12)
    assert got["loss"][1] == expected["loss"][1] == 11
    assert got["large_error"][0] == pytest.approx(expected["large_error"][0], rel=1e-12)
    assert got["large_error"][1] == expected["large_error"][1] > 0


def test_chunked_dataset_evaluation_is_sample_weighted():
    dataset = [make_batch(7), make_batch(3, offset=7), make_batch(10, offset=10)]
    whole, _ = make_evaluator(None)
    chunked, model = make_evaluator(3)
    assert chunked.evaluate_dataset(dataset)["loss"] == pytest.approx(whole.evaluate_dataset(dataset)["loss"])
    assert model.batch_sizes == [3, 3, 1, 3, 3, 3, 3, 1]


def test_zero_total_weight_keeps_a_value_with_weight_zero():
    chunked, _ = make_evaluator(2, {"large_error": large_error_mean})
    small_errors = [(0.0, -0.5), (0.1, -0.3), (0.2, -0.2)]  # prediction 1.5x - 0.5: every |error| <= 1
    value, weight = chunked.evaluate_batch(small_errors)["large_error"]
    assert (value, weight) == (0.0, 0)


def test_chunk_size_is_validated_at_construction():
    with pytest.raises(ValueError, match="batch_chunk_size .* got 0"):
        MetricEvaluator(batch_chunk_size=0)
    assert MetricEvaluator(batch_chunk_size=8).batch_chunk_size == 8
    assert MetricEvaluator().batch_chunk_size is None


def test_unsplittable_batch_is_a_clear_error():
    chunked, _ = make_evaluator(2)
    with pytest.raises(TypeError, match="batch is a str"):
        chunked.evaluate_batch("not a batch")
