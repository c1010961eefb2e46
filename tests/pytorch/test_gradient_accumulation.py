"""PyTorch gradient accumulation: a batch of B in chunks of C (C not dividing B) equals the full batch.

Tolerances: float32 gradients and weights agree to ``rtol=1e-5, atol=1e-6`` (only the order of the float
additions differs between the two); with float64 models to ``rtol=1e-12, atol=1e-14``.
"""

import copy

import pytest
import torch

import mlpug.pytorch as mlp
from mlpug.trainers.gradient_sync import GradientSync

BATCH_SIZE, CHUNK_SIZE = 10, 4  # chunks of 4, 4 and 2 samples
F32 = dict(rtol=1e-5, atol=1e-6)
F64 = dict(rtol=1e-12, atol=1e-14)


def make_classifier(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).to(dtype)


def make_batch(size=BATCH_SIZE, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 6, generator=generator, dtype=dtype), torch.randint(0, 3, (size,), generator=generator)


class TupleModel(torch.nn.Module):
    """Batch ``(features [B, 6], labels [B])``; returns the mean cross entropy and the logits [B, 3]."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.calls = []

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        self.calls.append(len(features))
        logits = self.classifier(features)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "auxiliary_results": logits}


class DictModel(torch.nn.Module):
    """Batch ``{"features": [B, 6], "labels": [B]}``; returns ``(loss, num_samples, auxiliary_results)``."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        logits = self.classifier(batch_data["features"])
        loss = torch.nn.functional.cross_entropy(logits, batch_data["labels"])
        return loss, len(logits), {"logits": logits, "num_chunks": 1}


def make_trainer(batch_chunk_size, model_class=TupleModel, optimizer="sgd", dtype=torch.float32, **kwargs):
    classifier = make_classifier(dtype=dtype)
    if optimizer == "sgd":
        opt = torch.optim.SGD(classifier.parameters(), lr=0.5, momentum=0.9)
    else:
        opt = torch.optim.Adam(classifier.parameters(), lr=0.01)
    trainer = mlp.trainers.DefaultTrainer(opt, classifier, batch_chunk_size=batch_chunk_size, **kwargs)
    model = model_class(classifier)
    trainer.set_training_model(model)
    return trainer, classifier, model


def grads(module):
    return [p.grad.clone() for p in module.parameters()]


def assert_all_close(actual, expected, tolerance):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tolerance)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, F32), (torch.float64, F64)])
def test_chunked_gradients_and_step_equal_full_batch(optimizer, dtype, tolerance):
    batch = make_batch(dtype=dtype)
    full, full_classifier, _ = make_trainer(None, optimizer=optimizer, dtype=dtype)
    chunked, chunked_classifier, chunked_model = make_trainer(CHUNK_SIZE, optimizer=optimizer, dtype=dtype)
    start = copy.deepcopy(chunked_classifier.state_dict())

    full_outputs = full.train_on(batch)
    chunked_outputs = chunked.train_on(batch)

    assert chunked_model.calls == [4, 4, 2]
    assert_all_close(grads(chunked_classifier), grads(full_classifier), tolerance)  # .grad is kept after the step
    assert_all_close(list(chunked_classifier.parameters()), list(full_classifier.parameters()), tolerance)
    assert any(not torch.equal(p, start[name]) for name, p in chunked_classifier.named_parameters())  # it stepped
    # the reported batch loss is the sample-weighted loss of the whole batch, detached, without .item()
    assert isinstance(chunked_outputs.loss, torch.Tensor) and not chunked_outputs.loss.requires_grad
    torch.testing.assert_close(chunked_outputs.loss, full_outputs.loss, **tolerance)
    assert chunked_outputs.num_samples == BATCH_SIZE
    torch.testing.assert_close(chunked_outputs.auxiliary_results, full_outputs.auxiliary_results, **tolerance)
    assert not chunked_outputs.auxiliary_results.requires_grad


def test_several_steps_follow_the_full_batch_trajectory():
    full, full_classifier, _ = make_trainer(None, optimizer="adam")
    chunked, chunked_classifier, _ = make_trainer(3, optimizer="adam")
    for seed in range(5):
        batch = make_batch(size=8 + seed, seed=seed)
        full.train_on(batch)
        chunked.train_on(batch)
    assert_all_close(
        list(chunked_classifier.parameters()), list(full_classifier.parameters()), dict(rtol=1e-4, atol=1e-5)
    )


def test_dict_batches_and_structured_auxiliary_results():
    features, labels = make_batch()
    batch = {"features": features, "labels": labels}
    full, full_classifier, _ = make_trainer(None, DictModel)
    chunked, chunked_classifier, _ = make_trainer(CHUNK_SIZE, DictModel)
    full_outputs, chunked_outputs = full.train_on(batch), chunked.train_on(batch)
    assert_all_close(grads(chunked_classifier), grads(full_classifier), F32)
    torch.testing.assert_close(chunked_outputs.loss, full_outputs.loss, **F32)
    torch.testing.assert_close(chunked_outputs.auxiliary_results["logits"], full_outputs.auxiliary_results["logits"])
    assert chunked_outputs.auxiliary_results["num_chunks"] == 1  # not a tensor, the same in every chunk: kept once
    assert chunked_outputs.num_samples == BATCH_SIZE


def test_list_batches_are_split_too():
    features, labels = make_batch()
    full, full_classifier, _ = make_trainer(None)
    chunked, chunked_classifier, model = make_trainer(CHUNK_SIZE)
    full.train_on([features, labels])
    chunked.train_on([features, labels])
    assert model.calls == [4, 4, 2]
    assert_all_close(grads(chunked_classifier), grads(full_classifier), F32)


def test_unsplittable_batch_raises_naming_its_type():
    trainer, _, _ = make_trainer(CHUNK_SIZE)
    features, labels = make_batch()
    with pytest.raises(TypeError, match=r"batch\[1\] is a str"):
        trainer.train_on((features, "labels"))
    with pytest.raises(ValueError, match=r"batch\[0\]: 10, batch\[1\]: 9"):
        trainer.train_on((features, labels[:9]))


@pytest.mark.parametrize("bad", [0, -1, 2.0, "4", True])
def test_bad_batch_chunk_size_is_rejected_at_construction(bad):
    classifier = make_classifier()
    with pytest.raises(ValueError, match=f"batch_chunk_size .* got {bad!r}"):
        mlp.trainers.DefaultTrainer(torch.optim.SGD(classifier.parameters(), lr=0.1), classifier, batch_chunk_size=bad)


def test_gradient_sync_hook_is_entered_around_every_chunk():
    trainer, classifier, _ = make_trainer(CHUNK_SIZE)
    events = []

    class RecordingSync(GradientSync):
        def chunk_context(self, chunk):
            events.append(("enter", chunk.num_samples, chunk.is_last, classifier[0].weight.grad is None))
            return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)  # any context manager

    trainer.gradient_sync = RecordingSync()
    trainer.train_on(make_batch())
    # gradients accumulate over the chunks: none before the first chunk, present before the later ones
    assert events == [("enter", 4, False, True), ("enter", 4, False, False), ("enter", 2, True, False)]


def test_logged_batch_metrics_are_those_of_the_whole_batch():
    batches = [make_batch(seed=seed) for seed in range(3)]

    def accuracy(inputs):
        return (inputs.auxiliary_results.argmax(dim=1) == inputs.batch[1]).float().mean()

    def run(batch_chunk_size):
        trainer, _, _ = make_trainer(batch_chunk_size)
        evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer, batch_metric_funcs={"accuracy": accuracy})
        logged = []

        class Collect(mlp.callbacks.Callback):
            def on_batch_training_completed(self, training_batch, logs):
                batch_logs = logs["current"]["training"]["batch"]
                logged.append((batch_logs["loss"], batch_logs["accuracy"], logs["current"]["training_params"]))

        callbacks = [mlp.callbacks.TrainingMetricsLogger(evaluator), Collect()]
        mlp.trainers.TrainingManager(trainer, batches, callbacks=callbacks, handle_signals=False).start_training()
        return logged

    full, chunked = run(None), run(CHUNK_SIZE)
    for (full_loss, full_accuracy, _), (loss, accuracy_value, params) in zip(full, chunked):
        assert loss == pytest.approx(full_loss, rel=1e-5)
        assert accuracy_value == full_accuracy
        assert params["batch"]["batch_size"] == BATCH_SIZE
        assert params["batch"]["optimizer_step_skipped"] is False


def test_chunked_evaluation_with_pytorch_tensors():
    trainer, _, _ = make_trainer(None)
    dataset = [make_batch(size=size, seed=size) for size in (10, 7, 13)]
    whole = mlp.evaluation.MetricEvaluator(trainer=trainer)
    chunked = mlp.evaluation.MetricEvaluator(trainer=trainer, batch_chunk_size=4)
    gathered = chunked.evaluate_batch(dataset[0])
    assert isinstance(gathered["loss"][0], torch.Tensor) and gathered["loss"][1] == 10  # still a tensor: no sync
    assert chunked.evaluate_dataset(dataset)["loss"] == pytest.approx(whole.evaluate_dataset(dataset)["loss"], rel=1e-6)


def test_chunking_refuses_a_model_that_returns_its_own_num_samples():
    """Row-share chunk weights would be wrong for e.g. a masked mean: a clear error instead of wrong gradients."""

    class MaskedModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, batch_data, evaluate_settings, inference_mode=None):
            x, y, mask = batch_data
            errors = (self.linear(x).squeeze(1) - y) ** 2 * mask
            return {"loss": errors.sum() / mask.sum(), "num_samples": mask.sum()}

    model = MaskedModel()
    batch = (torch.randn(10, 3), torch.randn(10), (torch.arange(10) % 3 == 0).float())
    unchunked = mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    unchunked.set_training_model(model)
    assert unchunked.train_on(batch).num_samples == 4  # without chunks, the model's own count is used
    chunked = mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.1), model, batch_chunk_size=4)
    chunked.set_training_model(model)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=r"returned num_samples=tensor\(2\.\) for a chunk of 4 rows.*without batch_chunk_size"
    ):
        chunked.train_on(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no step was taken
