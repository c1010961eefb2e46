"""mlpug's TensorFlow training gives the weights of a hand-written ``tf.function`` GradientTape loop.

Tolerance: exact equality is asserted for compiled mlpug vs the hand-written compiled loop (same ops, same
order). Eager vs compiled may differ by float32 round-off (Grappler may fuse ops differently in a graph):
``rtol=1e-5, atol=1e-6`` after 20 Adam steps (on our CPU machine they were bit-identical).
"""

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_mlp(initial_weights=None):
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(28, 28)),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(64, activation="relu"),
            tf.keras.layers.Dense(10),
        ]
    )
    if initial_weights is not None:
        model.set_weights(initial_weights)
    return model


def make_batches(num_batches, batch_size=32, seed=1):
    rng = np.random.default_rng(seed)
    return [
        (rng.random((batch_size, 28, 28), dtype=np.float32), rng.integers(0, 10, batch_size).astype(np.int64))
        for _ in range(num_batches)
    ]


class TrainModel(tf.keras.Model):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        return LOSS(labels, self.classifier(images, training=not inference_mode))


def train_with_mlpug(initial_weights, batches, eager_mode):
    classifier = make_mlp(initial_weights)
    trainer = mlp.trainers.DefaultTrainer(
        optimizers=tf.keras.optimizers.Adam(learning_rate=1e-3), model_components=classifier, eager_mode=eager_mode
    )
    losses = []

    class CollectLosses(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])

    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    manager = mlp.trainers.TrainingManager(
        trainer,
        batches,
        num_epochs=2,
        callbacks=[mlp.callbacks.TrainingMetricsLogger(evaluator), CollectLosses()],
    )
    trainer.set_training_model(TrainModel(classifier))
    manager.start_training()
    return classifier.get_weights(), losses


def train_by_hand(initial_weights, batches):
    model = make_mlp(initial_weights)
    optimizer = tf.keras.optimizers.Adam(learning_rate=1e-3)

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            loss = LOSS(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    losses = [float(train_step(images, labels)) for images, labels in batches * 2]
    return model.get_weights(), losses


@pytest.fixture(scope="module")
def setup():
    tf.keras.utils.set_random_seed(7)
    return make_mlp().get_weights(), make_batches(10)


def test_compiled_weights_identical_to_hand_written_tf_function_loop(setup):
    initial_weights, batches = setup
    mine, my_losses = train_with_mlpug(initial_weights, batches, eager_mode=False)
    theirs, their_losses = train_by_hand(initial_weights, batches)
    for a, b in zip(mine, theirs):
        np.testing.assert_array_equal(a, b)
    assert my_losses == their_losses
    assert all(type(loss) is float for loss in my_losses)
    assert not any(np.array_equal(a, b) for a, b in zip(mine, initial_weights))  # it did train


def test_eager_and_compiled_agree(setup):
    initial_weights, batches = setup
    compiled, compiled_losses = train_with_mlpug(initial_weights, batches, eager_mode=False)
    eager, eager_losses = train_with_mlpug(initial_weights, batches, eager_mode=True)
    for a, b in zip(compiled, eager):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
