"""Mixed precision on TensorFlow: the Keras mixed_bfloat16 policy, and float16 with a LossScaleOptimizer."""

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp


def make_classifier():
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential(
        [tf.keras.Input(shape=(4,)), tf.keras.layers.Dense(8, activation="relu"), tf.keras.layers.Dense(3)]
    )


class TrainModel(tf.keras.Model):
    """Cross entropy; ``inject_inf`` (a variable, so it also works in a compiled step) makes the loss inf."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.inject_inf = tf.Variable(False, trainable=False)

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        logits = self.classifier(features)
        loss = self.loss_function(labels, logits)
        return {"loss": loss * tf.where(self.inject_inf, np.inf, 1.0), "auxiliary_results": logits}


def batch(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(size, 4)).astype(np.float32), rng.integers(0, 3, size).astype(np.int64)


def make_trainer(autocast_dtype, eager_mode=False, **kwargs):
    classifier = make_classifier()
    trainer = mlp.trainers.DefaultTrainer(
        tf.keras.optimizers.Adam(0.01),
        classifier,
        eager_mode=eager_mode,
        use_mixed_precision=True,
        autocast_dtype=autocast_dtype,
        **kwargs,
    )
    model = TrainModel(classifier)
    trainer.set_training_model(model)
    return trainer, model, classifier


@pytest.mark.parametrize("eager_mode", [False, True])
def test_bfloat16_computes_in_bfloat16_with_float32_variables(eager_mode):
    trainer, model, classifier = make_trainer("bfloat16", eager_mode=eager_mode, batch_chunk_size=5)
    assert [layer.dtype_policy.name for layer in classifier.layers] == ["mixed_bfloat16"] * 2
    assert not isinstance(trainer.optimizers["optimizer"], tf.keras.optimizers.LossScaleOptimizer)
    losses = [float(trainer.train_on(batch()).loss) for _ in range(30)]
    outputs = trainer.train_on(batch())
    assert outputs.auxiliary_results.dtype == tf.bfloat16 and outputs.auxiliary_results.shape == (16, 3)
    assert all(variable.dtype == "float32" for variable in classifier.weights)
    assert losses[-1] < 0.7 * losses[0]  # it trains
    assert outputs.optimizer_step_skipped is False  # the Python constant: no loss scaling, no tensor op


@pytest.mark.parametrize("eager_mode", [False, True])
def test_float16_skips_the_step_on_an_inf_gradient_and_lowers_the_scale(eager_mode):
    trainer, model, classifier = make_trainer("float16", eager_mode=eager_mode)
    optimizer = trainer.optimizers["optimizer"]
    assert isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer)
    assert [layer.compute_dtype for layer in classifier.layers] == ["float16"] * 2
    skipped = []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            skipped.append(logs["current"]["training_params"]["batch"]["optimizer_step_skipped"])
            model.inject_inf.assign(logs["current"]["global_iter"] == 0)  # the second batch gets an inf loss

    weights = []

    class Weights(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            weights.append([w.copy() for w in classifier.get_weights()])

    # The inf is injected into the loss, which the default policy (non_finite_loss="raise") would end training
    # on; "warn" lets the loss scaler handle it, which is what this test is about.
    manager = mlp.trainers.TrainingManager(
        trainer, [batch(0), batch(1), batch(2)], callbacks=[Record(), Weights()], non_finite_loss="warn"
    )
    manager.start_training()
    scale_before = optimizer.initial_scale
    assert skipped == [False, True, False]
    assert all(np.array_equal(a, b) for a, b in zip(weights[0], weights[1]))  # the skipped step changed nothing
    assert not any(np.array_equal(a, b) for a, b in zip(weights[1], weights[2]))
    assert float(optimizer.dynamic_scale) == scale_before / 2
    assert int(optimizer.inner_optimizer.iterations) == 2
    assert trainer.get_learning_rate() == pytest.approx(0.01)


def test_float16_loss_scale_is_part_of_the_optimizer_state():
    trainer, model, _ = make_trainer("float16")
    model.inject_inf.assign(True)
    trainer.train_on(batch())
    state = trainer.get_state()
    scale = float(trainer.optimizers["optimizer"].dynamic_scale)
    assert any(np.shape(v) == () and float(v) == scale for v in state["optimizers"]["optimizer"])

    restored, _, _ = make_trainer("float16")
    restored.get_state()  # builds the optimizer (its loss scale variable is created by build)
    assert float(restored.optimizers["optimizer"].dynamic_scale) != scale
    restored.set_state(state)
    assert float(restored.optimizers["optimizer"].dynamic_scale) == scale


def test_bad_mixed_precision_arguments_are_clear_errors():
    classifier = make_classifier()
    optimizer = tf.keras.optimizers.Adam(0.01)
    with pytest.raises(ValueError, match="autocast_dtype must be one of .* got 'int8'"):
        mlp.trainers.DefaultTrainer(optimizer, classifier, use_mixed_precision=True, autocast_dtype="int8")
    with pytest.raises(TypeError, match="use_mixed_precision must be a bool"):
        mlp.trainers.DefaultTrainer(optimizer, classifier, use_mixed_precision="yes")
    with pytest.raises(ValueError, match="has no effect without use_mixed_precision=True"):
        mlp.trainers.DefaultTrainer(optimizer, classifier, autocast_dtype="bfloat16")


@pytest.mark.parametrize("eager_mode", [False, True])
def test_float16_composes_with_chunking_and_several_optimizers(eager_mode):
    """Precision x accumulation x several optimizers (each with its own loss scale) in one step."""
    classifier = make_classifier()
    first, second = classifier.layers
    optimizers = {"first": tf.keras.optimizers.SGD(0.1), "second": tf.keras.optimizers.SGD(0.1)}
    trainer = mlp.trainers.DefaultTrainer(
        optimizers,
        classifier,
        eager_mode=eager_mode,
        trainable_variables={"first": first, "second": second},
        batch_chunk_size=6,
        use_mixed_precision=True,
        autocast_dtype="float16",
    )
    model = TrainModel(classifier)
    trainer.set_training_model(model)
    before = [w.copy() for w in classifier.get_weights()]
    outputs = trainer.train_on(batch(size=16))  # chunks of 6, 6, 4
    assert outputs.auxiliary_results.shape == (16, 3) and outputs.auxiliary_results.dtype == tf.float16
    assert bool(outputs.optimizer_step_skipped) is False
    after = classifier.get_weights()
    assert not any(np.array_equal(a, b) for a, b in zip(before, after))  # both optimizers stepped
    model.inject_inf.assign(True)
    skipped = trainer.train_on(batch(size=16)).optimizer_step_skipped
    assert tf.is_tensor(skipped) and bool(skipped) is True
    assert all(np.array_equal(a, b) for a, b in zip(after, classifier.get_weights()))
    assert [float(o.dynamic_scale) for o in trainer.optimizers.values()] == [2.0**14, 2.0**14]


@pytest.mark.parametrize("eager_mode", [False, True])
def test_float16_follows_float32_training_closely(eager_mode):
    """The same 20 steps in float16 (with loss scaling) and float32 from the same weights: the losses agree to
    float16 precision and the weights end close (a deliberate break, gradients not unscaled, i.e. apply_gradients
    of the inner optimizer on the scaled gradients, makes them diverge by orders of magnitude)."""

    def sgd_trainer(**precision):  # SGD, not Adam: Adam would hide scaled gradients (it is scale invariant)
        classifier = make_classifier()  # the same initial weights (same seed)
        trainer = mlp.trainers.DefaultTrainer(
            tf.keras.optimizers.SGD(0.1), classifier, eager_mode=eager_mode, **precision
        )
        trainer.set_training_model(TrainModel(classifier))
        return trainer, classifier

    float16, float16_classifier = sgd_trainer(use_mixed_precision=True, autocast_dtype="float16")
    float32, classifier = sgd_trainer()
    losses16, losses32 = [], []
    for step in range(20):
        losses16.append(float(float16.train_on(batch(step)).loss))
        losses32.append(float(float32.train_on(batch(step)).loss))
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2, atol=2e-3)
    for a, b in zip(float16_classifier.get_weights(), classifier.get_weights()):
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=1e-2)
    assert losses32[-1] < losses32[0]  # it trained
