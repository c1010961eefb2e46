"""Gradient accumulation (``batch_chunk_size``) on TensorFlow, eager and compiled.

Tolerance: accumulated gradients of a batch of B=10 in chunks of C=4 (4 + 4 + 2) equal the full-batch
gradients to float32 round-off (``rtol=1e-5, atol=1e-6``): the sums are taken in another order.
"""

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp
from mlpug.chunking import BatchChunking, ChunkResult
from mlpug.logs import to_number
from mlpug.tensorflow.chunking import ChunkedBatch
from mlpug.trainers.trainer import ModelOutputs

TOLERANCE = dict(rtol=1e-5, atol=1e-6)
BATCH_SIZE, CHUNK_SIZE = 10, 4


def make_classifier(weights=None):
    model = tf.keras.Sequential(
        [tf.keras.Input(shape=(5,)), tf.keras.layers.Dense(8, activation="tanh"), tf.keras.layers.Dense(3)]
    )
    if weights is not None:
        model.set_weights(weights)
    return model


class TrainModel(tf.keras.Model):
    """Takes a tuple batch ``(features, labels)`` or a dict batch ``{"features", "labels"}``."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        if isinstance(batch_data, dict):
            features, labels = batch_data["features"], batch_data["labels"]
        else:
            features, labels = batch_data
        logits = self.classifier(features)
        return {"loss": self.loss_function(labels, logits), "auxiliary_results": {"logits": logits}}


@pytest.fixture(scope="module")
def data():
    tf.keras.utils.set_random_seed(3)
    weights = make_classifier().get_weights()
    rng = np.random.default_rng(0)
    features = rng.normal(size=(BATCH_SIZE, 5)).astype(np.float32)
    labels = rng.integers(0, 3, BATCH_SIZE).astype(np.int64)
    return weights, features, labels


def gradients_with(policy, weights, batch, compiled):
    classifier = make_classifier(weights)
    model = TrainModel(classifier)

    def chunk_step(chunk):
        with tf.GradientTape() as tape:
            outputs = model(chunk.data, evaluate_settings=None, inference_mode=False)
            loss = policy.weigh_loss(outputs["loss"], chunk)
        num_samples = tf.shape(tf.nest.flatten(chunk.data)[0])[0]
        gradients = tape.gradient(loss, classifier.trainable_variables)
        return ChunkResult(ModelOutputs(outputs["loss"], num_samples, outputs["auxiliary_results"]), gradients)

    def run(batch):
        return policy.run(chunk_step, batch)

    result = (tf.function(run) if compiled else run)(batch)
    return [g.numpy() for g in result.gradients], result.outputs


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_accumulated_gradients_equal_full_batch_gradients(data, compiled, form):
    weights, features, labels = data
    batch = (features, labels) if form == "tuple" else {"features": features, "labels": labels}
    full, full_result = gradients_with(BatchChunking(), weights, batch, compiled)
    chunked, chunked_result = gradients_with(ChunkedBatch(CHUNK_SIZE), weights, batch, compiled)
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(b, a, **TOLERANCE)
    assert max(np.abs(g).max() for g in full) > 1e-3  # the gradients are not trivially zero
    np.testing.assert_allclose(chunked_result.loss.numpy(), full_result.loss.numpy(), **TOLERANCE)
    assert int(chunked_result.num_samples) == BATCH_SIZE
    np.testing.assert_allclose(
        chunked_result.auxiliary_results["logits"].numpy(), full_result.auxiliary_results["logits"].numpy(), **TOLERANCE
    )


def train_one_step(weights, batch, eager_mode, batch_chunk_size):
    classifier = make_classifier(weights)
    trainer = mlp.trainers.DefaultTrainer(
        tf.keras.optimizers.Adam(learning_rate=0.01),
        classifier,
        eager_mode=eager_mode,
        batch_chunk_size=batch_chunk_size,
    )
    trainer.set_training_model(TrainModel(classifier))
    outputs = trainer.train_on(batch)
    return classifier.get_weights(), outputs, trainer


@pytest.mark.parametrize("eager_mode", [False, True])
def test_one_optimizer_step_gives_the_same_weights(data, eager_mode):
    weights, features, labels = data
    full, full_outputs, _ = train_one_step(weights, (features, labels), eager_mode, None)
    chunked, chunked_outputs, trainer = train_one_step(weights, (features, labels), eager_mode, CHUNK_SIZE)
    assert trainer.batch_chunk_size == CHUNK_SIZE
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(b, a, **TOLERANCE)
    assert not any(np.array_equal(a, b) for a, b in zip(chunked, weights))  # it did train
    np.testing.assert_allclose(float(chunked_outputs.loss), float(full_outputs.loss), **TOLERANCE)
    assert to_number(chunked_outputs.num_samples) == BATCH_SIZE
    assert chunked_outputs.auxiliary_results["logits"].shape == (BATCH_SIZE, 3)
    assert int(trainer.optimizers["optimizer"].iterations) == 1  # one optimizer step per batch


def test_compiled_chunked_step_traces_once_for_all_batch_sizes(data):
    weights, features, labels = data
    classifier = make_classifier(weights)
    signature = (tf.TensorSpec((None, 5), tf.float32), tf.TensorSpec((None,), tf.int64))
    trainer = mlp.trainers.DefaultTrainer(
        tf.keras.optimizers.SGD(0.1), classifier, batch_data_signature=signature, batch_chunk_size=CHUNK_SIZE
    )
    trainer.set_training_model(TrainModel(classifier))
    for size in (10, 3, 4, 9):  # 3 chunks, 1 chunk, exactly 1 chunk, 3 chunks
        outputs = trainer.train_on((features[:size], labels[:size]))
        assert to_number(outputs.num_samples) == size
        assert outputs.auxiliary_results["logits"].shape == (size, 3)
    assert trainer._train_step.num_traces == 1


def test_logged_batch_loss_is_the_sample_weighted_batch_loss(data):
    weights, features, labels = data
    classifier = make_classifier(weights)
    model = TrainModel(classifier)
    expected = float(model((features, labels), evaluate_settings=None)["loss"])
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), classifier, batch_chunk_size=CHUNK_SIZE)
    trainer.set_training_model(model)
    logged = []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            logged.append((logs["current"]["training"]["batch"]["loss"], logs["current"]["training_params"]["batch"]))

    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    manager = mlp.trainers.TrainingManager(
        trainer, [(features, labels)], callbacks=[mlp.callbacks.TrainingMetricsLogger(evaluator), Record()]
    )
    manager.start_training()
    ((loss, params),) = logged
    assert loss == pytest.approx(expected, rel=1e-5)
    assert params["batch_size"] == BATCH_SIZE and params["optimizer_step_skipped"] is False


def test_batch_that_cannot_be_split_is_a_clear_error(data):
    weights, features, labels = data
    _, _, trainer = train_one_step(weights, (features, labels), True, CHUNK_SIZE)
    with pytest.raises(TypeError, match=r"cannot split the batch into chunks: batch\[2\] is a str"):
        trainer.train_on((features, labels, "not splittable"))
    with pytest.raises(ValueError, match="batch_chunk_size must be None .* got 0"):
        mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), make_classifier(weights), batch_chunk_size=0)


def test_metric_evaluator_evaluates_big_batches_in_chunks(data):
    weights, features, labels = data
    classifier = make_classifier(weights)
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), classifier)
    trainer.set_training_model(TrainModel(classifier))
    whole = mlp.evaluation.MetricEvaluator(trainer=trainer).evaluate_dataset([(features, labels)])
    chunked = mlp.evaluation.MetricEvaluator(trainer=trainer, batch_chunk_size=CHUNK_SIZE).evaluate_dataset(
        [(features, labels)]
    )
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6)


class MaskedTrainModel(tf.keras.Model):
    """A mean over a mask's valid rows, with the mask count as num_samples (as for valid tokens)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        mask = tf.cast(labels > 0, tf.float32)
        errors = tf.keras.losses.sparse_categorical_crossentropy(labels, self.classifier(features), from_logits=True)
        return {"loss": tf.reduce_sum(errors * mask) / tf.reduce_sum(mask), "num_samples": tf.reduce_sum(mask)}


@pytest.mark.parametrize("eager_mode", [False, True])
def test_chunking_refuses_a_model_that_returns_its_own_num_samples(data, eager_mode):
    weights, features, labels = data
    classifier = make_classifier(weights)
    trainer = mlp.trainers.DefaultTrainer(
        tf.keras.optimizers.SGD(learning_rate=0.1), classifier, eager_mode=eager_mode, batch_chunk_size=4
    )
    trainer.set_training_model(MaskedTrainModel(classifier))
    with pytest.raises(ValueError, match="returned num_samples=.* for a chunk of .* without batch_chunk_size"):
        trainer.train_on((features, labels))
    assert all(np.array_equal(a, b) for a, b in zip(weights, classifier.get_weights()))


@pytest.mark.parametrize("signature", [False, True], ids=["static_shapes", "unknown_batch_dimension"])
def test_parts_with_different_sample_counts_are_refused(data, signature):
    """Slicing parts of different lengths would silently misalign samples and labels; with a signature of unknown
    batch dimension the check is an assertion op of the compiled graph."""
    weights, features, labels = data
    signature_kwargs = (
        dict(batch_data_signature=(tf.TensorSpec([None, 5], tf.float32), tf.TensorSpec([None], tf.int64)))
        if signature
        else {}
    )
    classifier = make_classifier(weights)
    trainer = mlp.trainers.DefaultTrainer(
        tf.keras.optimizers.SGD(0.1), classifier, batch_chunk_size=CHUNK_SIZE, **signature_kwargs
    )
    trainer.set_training_model(TrainModel(classifier))
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="different first dim|another first dim"):
        trainer.train_on((features, labels[:-1]))
