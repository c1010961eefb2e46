"""The TensorFlow DefaultTrainer: return forms, compiled vs eager, state, learning rate, variables and bad input."""

import logging

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp
from mlpug.logs import to_number

SIGNATURE = (tf.TensorSpec((None, 3), tf.float32), tf.TensorSpec((None,), tf.float32))


class Model(tf.keras.Model):
    """Linear regression; the return form is chosen per test."""

    def __init__(self, form="loss", linear=None):
        super().__init__()
        self.linear = linear or tf.keras.layers.Dense(1)
        self.form = form

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        x, y = batch_data
        predictions = tf.squeeze(self.linear(x), axis=1)
        loss = tf.reduce_mean((predictions - y) ** 2)
        return {
            "loss": lambda: loss,
            "tuple2": lambda: (loss, predictions),
            "tuple3": lambda: (loss, 5, predictions),
            "dict": lambda: {"loss": loss, "num_samples": 7, "auxiliary_results": predictions},
            "no_loss": lambda: {"predictions": predictions},
            "vector": lambda: (predictions - y) ** 2,
            "tuple4": lambda: (loss, 4, predictions, y),
            "swapped": lambda: (predictions, loss),
        }[self.form]()


class ScaledLoss(tf.keras.Model):
    """Mean squared error times ``evaluate_settings["scale"]`` (a trace constant unless a settings signature)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        x, y = batch_data
        return tf.reduce_mean((self.model(x)[:, 0] - y) ** 2) * evaluate_settings["scale"]


def batch(num_samples=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_samples, 3)).astype(np.float32), rng.normal(size=num_samples).astype(np.float32)


def make(form="loss", build=True, **kwargs):
    tf.keras.utils.set_random_seed(0)
    linear = tf.keras.layers.Dense(1)
    if build:
        linear.build((None, 3))
    model = Model(form, linear)
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(learning_rate=0.1), linear, **kwargs)
    trainer.set_training_model(model)
    return trainer, model


@pytest.mark.parametrize("eager_mode", [False, True])
@pytest.mark.parametrize(
    "form,num_samples,has_aux", [("loss", 4, False), ("tuple2", 4, True), ("tuple3", 5, True), ("dict", 7, True)]
)
def test_model_return_forms(form, num_samples, has_aux, eager_mode):
    trainer, _ = make(form, eager_mode=eager_mode)
    outputs = trainer.train_on(batch())
    assert to_number(outputs.num_samples) == num_samples and type(to_number(outputs.num_samples)) is int
    assert outputs.loss.shape == () and outputs.loss.dtype == tf.float32
    if has_aux:
        assert outputs.auxiliary_results.shape == (4,)
    else:
        assert outputs.auxiliary_results is None


@pytest.mark.parametrize(
    "form,error,match",
    [
        ("no_loss", ValueError, r"returned a dict without a 'loss' key \(keys: \['predictions'\]\)"),
        ("vector", TypeError, "must return a scalar loss tensor .*got .*Tensor"),
    ],
)
def test_model_without_scalar_loss_is_a_clear_error(form, error, match):
    trainer, _ = make(form)
    with pytest.raises(error, match=match):
        trainer.train_on(batch())


@pytest.mark.parametrize("eager_mode", [False, True])
@pytest.mark.parametrize(
    "form,error,match",
    [
        (
            "tuple4",
            ValueError,
            r"returned a tuple of 4 items: tuple of 4 \(\w*Tensor\[\] float32, int 4, \w*Tensor\[(4|None)\] float32, "
            r"\w*Tensor\[(4|None)\] float32\); expected loss, \(loss,\), \(loss, auxiliary_results\)",
        ),
        (
            "swapped",
            TypeError,
            r"as the loss: \w*Tensor\[(4|None)\] float32, in tuple of 2 \(\w*Tensor\[(4|None)\] float32, \w*Tensor\[\] "
            r"float32\); item 1 is a scalar: the loss comes first",
        ),
        (
            "vector",
            TypeError,
            r"as the loss: \w*Tensor\[(4|None)\] float32.*must be reduced to its mean over the batch",
        ),
    ],
)
def test_a_return_value_without_a_scalar_loss_names_its_types_and_shapes_before_any_step(
    form, error, match, eager_mode
):
    trainer, model = make(form, eager_mode=eager_mode)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(error, match=match):
        trainer.train_on(batch())
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("eager_mode", [False, True])
def test_one_sgd_step_matches_the_formula(eager_mode):
    trainer, model = make(eager_mode=eager_mode)
    x, y = batch()
    kernel, bias = (w.copy() for w in model.linear.get_weights())
    trainer.train_on((x, y))
    error = (x @ kernel)[:, 0] + bias[0] - y
    expected_kernel = kernel - 0.1 * (2 * x.T @ error / len(y))[:, None]
    expected_bias = bias - 0.1 * 2 * error.mean()
    new_kernel, new_bias = model.linear.get_weights()
    np.testing.assert_allclose(new_kernel, expected_kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_bias, expected_bias, rtol=1e-5, atol=1e-6)


def test_evaluate_loss_does_not_train_and_passes_inference_mode():
    seen = []

    class Recording(Model):
        def call(self, batch_data, evaluate_settings, inference_mode=None):
            seen.append((inference_mode, evaluate_settings))
            return super().call(batch_data, evaluate_settings, inference_mode)

    tf.keras.utils.set_random_seed(0)
    linear = tf.keras.layers.Dense(1)
    linear.build((None, 3))
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), linear)
    trainer.set_training_model(Recording(linear=linear))
    before = [w.copy() for w in linear.get_weights()]
    outputs = trainer.evaluate_loss(batch(), evaluate_settings="eval")
    assert all(np.array_equal(a, b) for a, b in zip(before, linear.get_weights()))
    assert float(outputs.loss) > 0
    assert seen == [(True, "eval")]  # traced once, with inference_mode=True and the settings as a constant


def test_smaller_last_batch_retraces_once_and_logs_it(caplog):
    trainer, _ = make()
    with caplog.at_level(logging.DEBUG, logger="mlpug.tensorflow.DefaultTrainer"):
        for size in (8, 8, 3, 8, 3, 5):
            trainer.train_on(batch(size))
    assert trainer._train_step.num_traces == 2
    retraces = [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()]
    assert len(retraces) == 1 and "train step" in retraces[0] and "float32[None, 3]" in retraces[0]


def test_batch_data_signature_traces_once():
    trainer, _ = make(batch_data_signature=SIGNATURE)
    for size in (8, 3, 5):
        trainer.train_on(batch(size))
    assert trainer._train_step.num_traces == 1


@pytest.mark.parametrize(
    "bad_batch,message",
    [
        ((np.zeros((4, 3), np.float64), np.zeros(4, np.float32)), r"item \[0\] is float64 with shape \[4, 3\]"),
        ((np.zeros((4, 2), np.float32), np.zeros(4, np.float32)), r"item \[0\] is float32 with shape \[4, 2\]"),
        (np.zeros((4, 3), np.float32), "structure differs"),
    ],
)
def test_batch_not_matching_the_signature_is_a_clear_error(bad_batch, message):
    trainer, _ = make(batch_data_signature=SIGNATURE)
    with pytest.raises(ValueError, match="does not match batch_data_signature") as raised:
        trainer.train_on(bad_batch)
    assert raised.match(message)
    trainer.train_on(batch())  # a matching batch still trains
    # After the first batch, tf.function itself converts numpy arrays to the signature's dtype; tensors of
    # another dtype or shape are rejected, and reported with the same clear message.
    with pytest.raises(ValueError, match="does not match batch_data_signature") as raised:
        trainer.train_on(tf.nest.map_structure(tf.constant, bad_batch))
    assert raised.match(message)


def test_wrong_call_signature_is_a_clear_error():
    class OneArgument(tf.keras.Model):
        def call(self, batch_data):
            return tf.constant(0.0)

    class StarArgs(tf.keras.Model):
        def call(self, *args):
            return tf.constant(0.0)

    trainer, _ = make()
    with pytest.raises(TypeError, match=r"OneArgument.call must accept \(batch_data, evaluate_settings"):
        trainer.set_training_model(OneArgument())
    with pytest.raises(TypeError, match="StarArgs.call must name its parameters"):
        trainer.set_training_model(StarArgs())
    with pytest.raises(TypeError, match="training_model must be a tf.keras.Model"):
        trainer.set_training_model(lambda batch, settings: 0.0)


def test_two_argument_call_without_inference_mode_works():
    class TwoArguments(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.linear = tf.keras.layers.Dense(1)

        def call(self, data, settings):
            x, y = data
            return tf.reduce_mean((tf.squeeze(self.linear(x), 1) - y) ** 2)

    model = TwoArguments()
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), model)
    trainer.set_training_model(model)
    first = float(trainer.train_on(batch()).loss)
    for _ in range(20):
        last = float(trainer.train_on(batch()).loss)
    assert last < first


def test_bad_constructor_arguments_are_clear_errors():
    import torch

    linear = tf.keras.layers.Dense(1)
    with pytest.raises(TypeError, match="Keras 3 optimizers .* got a torch.optim.sgd.SGD"):
        mlp.trainers.DefaultTrainer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), linear)
    with pytest.raises(TypeError, match="model_components"):
        mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), torch.nn.Linear(1, 1))
    # TensorFlow's default strategy is one device, the same as None (other strategies: test_distributed.py)
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), linear, strategy=tf.distribute.get_strategy())
    assert trainer.strategy.name == "single_process" and trainer.strategy.tf_strategy is None
    with pytest.raises(TypeError, match="batch_data_signature must be a tf.TensorSpec"):
        mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), linear, batch_data_signature=((None, 3), "float"))
    with pytest.raises(TypeError, match="eager_mode must be a bool"):
        mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), linear, eager_mode="yes")
    with pytest.raises(ValueError, match="With several optimizers"):
        mlp.trainers.DefaultTrainer([tf.keras.optimizers.SGD(0.1), tf.keras.optimizers.SGD(0.1)], linear)


def test_several_optimizers_each_update_their_own_variables():
    tf.keras.utils.set_random_seed(0)
    first, second = tf.keras.layers.Dense(4), tf.keras.layers.Dense(1)

    class TwoParts(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.first, self.second = first, second

        def call(self, batch_data, evaluate_settings, inference_mode=None):
            x, y = batch_data
            return tf.reduce_mean((tf.squeeze(self.second(self.first(x)), 1) - y) ** 2)

    optimizers = {"first": tf.keras.optimizers.SGD(0.1), "second": tf.keras.optimizers.SGD(0.0)}
    trainer = mlp.trainers.DefaultTrainer(optimizers, {"first": first, "second": second})
    trainer.set_training_model(TwoParts())
    trainer.train_on(batch())  # builds the unbuilt layers with an eager forward pass first
    second_before = [w.copy() for w in second.get_weights()]
    first_before = [w.copy() for w in first.get_weights()]
    trainer.train_on(batch())
    assert all(np.array_equal(a, b) for a, b in zip(second_before, second.get_weights()))  # lr 0
    assert not any(np.array_equal(a, b) for a, b in zip(first_before, first.get_weights()))
    assert [int(o.iterations) for o in optimizers.values()] == [2, 2]

    # the same split given explicitly, as a callable returning a dict
    trainer2 = mlp.trainers.DefaultTrainer(
        list(optimizers.values()),
        [first, second],
        trainable_variables=lambda: {"optimizer_0": first.trainable_variables, "optimizer_1": second},
    )
    trainer2.set_training_model(TwoParts())
    trainer2.train_on(batch())
    assert all(np.array_equal(a, b) for a, b in zip(second_before, second.get_weights()))


def test_variable_given_to_two_optimizers_is_an_error():
    linear = tf.keras.layers.Dense(1)
    linear.build((None, 3))
    trainer = mlp.trainers.DefaultTrainer(
        {"a": tf.keras.optimizers.SGD(0.1), "b": tf.keras.optimizers.SGD(0.1)},
        linear,
        trainable_variables={"a": linear, "b": linear.trainable_variables[:1]},
    )
    trainer.set_training_model(Model(linear=linear))
    with pytest.raises(ValueError, match="updated by two optimizers"):
        trainer.train_on(batch())


def test_learning_rate_get_and_set():
    trainer, _ = make()
    assert trainer.get_learning_rate() == pytest.approx(0.1)
    trainer.set_learning_rate(0.05)
    assert trainer.get_learning_rate() == pytest.approx(0.05) and type(trainer.get_learning_rate()) is float
    with pytest.raises(ValueError, match="optimizer_name 'nope' unknown"):
        trainer.set_learning_rate(0.1, "nope")


def train_steps(trainer, num_steps, seed=0):
    return [float(trainer.train_on(batch(8, seed + step)).loss) for step in range(num_steps)]


@pytest.mark.parametrize("restore_into", ["built", "unbuilt_with_signature", "unbuilt_without_signature"])
def test_state_round_trip_continues_identically(restore_into):
    def adam_trainer(build, **kwargs):
        tf.keras.utils.set_random_seed(0)
        linear = tf.keras.layers.Dense(1)
        if build:
            linear.build((None, 3))
        trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.Adam(0.01), linear, **kwargs)
        trainer.set_training_model(Model(linear=linear))
        return trainer, linear

    trainer, _ = adam_trainer(build=True)
    train_steps(trainer, 3)
    state = trainer.get_state()
    assert set(state) == {"model_components", "optimizers", "seed_generators"} and state["seed_generators"] == []
    assert all(isinstance(a, np.ndarray) for a in state["model_components"]["model"] + state["optimizers"]["optimizer"])
    assert int(state["optimizers"]["optimizer"][0]) == 3  # iterations
    expected = train_steps(trainer, 3, seed=10)

    kwargs = {"batch_data_signature": SIGNATURE} if restore_into == "unbuilt_with_signature" else {}
    restored, linear = adam_trainer(build=restore_into == "built", **kwargs)
    restored.set_state(state)
    if restore_into == "unbuilt_with_signature":  # built from the signature and restored at once
        np.testing.assert_array_equal(linear.get_weights()[0], state["model_components"]["model"][0])
    if restore_into == "unbuilt_without_signature":  # nothing to restore into yet: the state waits, unapplied
        assert restored.get_state() is state
    else:  # applied at once: the trainer's own state equals the saved one
        restored_state = restored.get_state()
        assert restored_state is not state
        for key in ("model_components", "optimizers"):
            saved, now = state[key], restored_state[key]
            assert all(np.array_equal(a, b) for name in saved for a, b in zip(saved[name], now[name]))
    assert train_steps(restored, 3, seed=10) == expected


class DropoutModel(tf.keras.Model):
    """Regression through a Dropout layer in the model component and one in the training model itself."""

    def __init__(self, component):
        super().__init__()
        self.component = component
        self.dropout = tf.keras.layers.Dropout(0.5, seed=11)

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        x, y = batch_data
        hidden = self.dropout(self.component(x, training=not inference_mode), training=not inference_mode)
        return tf.reduce_mean((tf.reduce_sum(hidden, axis=1) - y) ** 2)


def dropout_trainer(seed, eager_mode, build=True):
    tf.keras.utils.set_random_seed(seed)
    component = tf.keras.Sequential([tf.keras.layers.Dense(16, activation="relu"), tf.keras.layers.Dropout(0.3)])
    if build:
        component.build((None, 3))
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.Adam(0.01), component, eager_mode=eager_mode)
    trainer.set_training_model(DropoutModel(component))
    return trainer, component


@pytest.mark.parametrize("restore_into", ["built", "unbuilt_without_signature"])
@pytest.mark.parametrize("eager_mode", [True, False], ids=["eager", "compiled"])
def test_state_round_trip_with_dropout_continues_bit_identically(eager_mode, restore_into):
    """get_state -> set_state on a new trainer (other seed), no CheckpointManager: the same dropout masks."""
    trainer, _ = dropout_trainer(seed=0, eager_mode=eager_mode)
    train_steps(trainer, 3)
    state = trainer.get_state()
    # one seed generator in the component, one in the training model; int64 [seed, counter] arrays
    assert len(state["seed_generators"]) == 2
    assert all(isinstance(a, np.ndarray) and a.dtype == np.int64 and a.shape == (2,) for a in state["seed_generators"])
    expected_losses = train_steps(trainer, 4, seed=10)
    expected_weights = trainer.get_state()["model_components"]["model"]

    restored, component = dropout_trainer(seed=5, eager_mode=eager_mode, build=restore_into == "built")
    restored.set_state(state)
    assert train_steps(restored, 4, seed=10) == expected_losses
    assert all(np.array_equal(a, b) for a, b in zip(component.get_weights(), expected_weights))

    # the seed generator states are what makes this exact: without them the masks (and losses) differ
    without, _ = dropout_trainer(seed=5, eager_mode=eager_mode, build=restore_into == "built")
    without.set_state({key: value for key, value in state.items() if key != "seed_generators"})
    assert train_steps(without, 4, seed=10) != expected_losses


def test_seed_generator_state_of_another_model_is_a_clear_error():
    trainer, _ = dropout_trainer(seed=0, eager_mode=True)
    state = trainer.get_state()
    with pytest.raises(ValueError, match="holds 1 Keras seed generator states .* have 2"):
        trainer.set_state({**state, "seed_generators": state["seed_generators"][:1]})


def test_state_that_does_not_fit_is_a_clear_error():
    trainer, _ = make()
    trainer.train_on(batch())
    state = trainer.get_state()
    with pytest.raises(ValueError, match=r"model_components in state \['other'\]"):
        trainer.set_state({"model_components": {"other": []}, "optimizers": state["optimizers"]})
    bad = {"model_components": {"model": [np.zeros((2, 1)), np.zeros(1)]}, "optimizers": state["optimizers"]}
    with pytest.raises(ValueError, match=r"array 0 has shape \(2, 1\), but variable .* has shape \(3, 1\)"):
        trainer.set_state(bad)


def test_failure_in_a_compiled_step_runs_the_failure_path():
    class FailsOnLargeLoss(Model):
        def call(self, batch_data, evaluate_settings, inference_mode=None):
            loss = super().call(batch_data, evaluate_settings, inference_mode)
            tf.debugging.assert_less(loss, 1e6, message="injected failure: loss too large")
            return loss

    tf.keras.utils.set_random_seed(0)
    linear = tf.keras.layers.Dense(1)
    linear.build((None, 3))
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.01), linear)
    trainer.set_training_model(FailsOnLargeLoss(linear=linear))
    failures, ended = [], []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_failed(self, exception, logs):
            failures.append(type(exception))

        def on_training_ended(self, stopped_early, stopped_on_error, interrupted, callback_calls_success):
            ended.append(stopped_on_error)

    x, y = batch(8)
    batches = [(x, y), (x, y), (x, y * 1e5), (x, y)]
    manager = mlp.trainers.TrainingManager(trainer, batches, callbacks=[Record()])
    with pytest.raises(tf.errors.InvalidArgumentError, match="injected failure") as raised:
        manager.start_training()
    assert failures == [tf.errors.InvalidArgumentError] and ended == [True]
    assert any("epoch 0, batch step 2" in note for note in raised.value.__notes__)


def test_metric_evaluator_weighted_sums_in_one_conversion():
    evaluator = mlp.evaluation.MetricEvaluator()
    values = [tf.constant(1.0), tf.constant(2.0, tf.bfloat16), tf.constant(4.0)]
    weights = [1, tf.constant(3), 4]
    weighted_sum, weight_sum = evaluator._weighted_sums(values, weights)
    assert (weighted_sum, weight_sum) == (1.0 + 6.0 + 16.0, 8.0)
    assert type(weighted_sum) is float and type(weight_sum) is float


@pytest.mark.parametrize("with_signature", [False, True])
def test_settings_changed_in_place_reach_the_compiled_step(with_signature):
    """Settings are trace constants: a changed value (also changed in place) must retrace, not be ignored."""

    signature = (tf.TensorSpec((None, 3), tf.float32), tf.TensorSpec((None,), tf.float32)) if with_signature else None
    model = tf.keras.Sequential([tf.keras.Input(shape=(3,)), tf.keras.layers.Dense(1, kernel_initializer="ones")])
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.0), model, batch_data_signature=signature)
    trainer.set_training_model(ScaledLoss(model))
    batch = (np.ones((4, 3), np.float32), np.zeros(4, np.float32))
    settings = {"scale": 1.0}
    assert float(trainer.train_on(batch, settings).loss) == pytest.approx(9.0)
    settings["scale"] = 10.0  # e.g. a callback changing logs["training_settings"] in place
    assert float(trainer.train_on(batch, settings).loss) == pytest.approx(90.0)


@pytest.mark.parametrize("schedule", [False, True])
def test_logged_learning_rate_follows_set_learning_rate_and_schedules(schedule):
    model = tf.keras.Sequential([tf.keras.Input(shape=(3,)), tf.keras.layers.Dense(1)])
    learning_rate = (
        tf.keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5) if schedule else 0.1
    )
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(learning_rate), model)

    class Loss(tf.keras.Model):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def call(self, batch_data, evaluate_settings, inference_mode=None):
            x, y = batch_data
            return tf.reduce_mean((self.model(x)[:, 0] - y) ** 2)

    trainer.set_training_model(Loss(model))
    kept = []

    class Keep(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            kept.append(logs["current"]["training_params"]["batch"]["lr"])  # read at its step
            if not schedule and logs["current"]["global_iter"] == 1:
                trainer.set_learning_rate(0.01)

    batches = [(np.ones((4, 3), np.float32), np.zeros(4, np.float32))] * 4
    mlp.trainers.TrainingManager(trainer, batches, callbacks=[Keep()]).start_training()
    assert all(type(value) is float for value in kept)
    expected = [0.1 * 0.5**step for step in range(1, 5)] if schedule else [0.1, 0.1, 0.01, 0.01]
    assert kept == pytest.approx(expected)


def _unknown_length_datasets():
    x, y = batch(24)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 6 batches of known length
    return {
        "filter": batches.filter(lambda features, labels: tf.shape(labels)[0] > 0),
        "repeat": batches.repeat(),
        "from_generator": tf.data.Dataset.from_generator(
            lambda: ((x[i : i + 4], y[i : i + 4]) for i in range(0, 24, 4)), output_signature=SIGNATURE
        ),
    }


@pytest.mark.parametrize("kind", ["filter", "repeat", "from_generator"])
def test_tf_data_of_unknown_length_trains_with_num_batches_per_epoch(kind):
    """``len()`` of these datasets raises TypeError ("length is unknown" / "is infinite"). Broken on purpose (the
    construction check calling ``len()`` whenever ``__len__`` exists, as before), TrainingManager construction
    raises that TypeError even with num_batches_per_epoch given: this test fails."""
    dataset = _unknown_length_datasets()[kind]
    trainer, _ = make()
    with pytest.raises(ValueError, match=r"no known length \(The dataset (length is unknown|is infinite)\.\); give"):
        mlp.trainers.TrainingManager(trainer, dataset)
    losses = []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])

    callbacks = [mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=trainer)), Record()]
    manager = mlp.trainers.TrainingManager(trainer, dataset, num_batches_per_epoch=5, callbacks=callbacks)
    manager.start_training()
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert (manager.epoch, manager.global_iter) == (1, 5)


def test_tf_config_with_several_workers_is_refused_at_trainer_construction(monkeypatch):
    """A multi-worker TF_CONFIG without a MultiWorkerMirroredStrategy. Broken on purpose (no check_cluster in
    DefaultTrainer.__init__), every worker would train alone without a word: this test fails."""
    import json

    linear = tf.keras.layers.Dense(1)
    cluster = {"chief": ["host0:2222"], "worker": ["host1:2222", "host2:2222"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(RuntimeError, match=r"TF_CONFIG describes a cluster of 3 tasks \(chief: 1, worker: 2\), but "
                       r"the strategy is one device \(None\): every process would train alone"):  # fmt: skip
        mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), linear)
    from mlpug.trainers.strategy import SingleProcess

    for strategy in ("single_process", SingleProcess()):  # one device by name or by the neutral object: refused too
        with pytest.raises(RuntimeError, match=r"TF_CONFIG describes a cluster of 3 tasks"):
            mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), linear, strategy=strategy)
    monkeypatch.setenv("TF_CONFIG", "not json")
    with pytest.raises(ValueError, match="TF_CONFIG is 'not json', not a JSON object with a cluster"):
        mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), linear)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["host1:2222"]}}))  # one worker: fine
    mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.1), linear)


@pytest.mark.parametrize("eager_mode", [False, True])
def test_no_host_transfer_per_step_when_nothing_reads(monkeypatch, eager_mode):
    """Tensors become numbers only at the log period. Counted at TensorFlow's lowest conversion point, which
    numpy(), float(), int(), bool() and index() of an eager tensor all go through (``_EagerTensorBase._numpy``); a
    deliberate break (the manager converting the batch loss at every step) makes every batch show a transfer.
    Only floating-point tensors count: TensorFlow's own eager gradient of a mean reads its int32 axes."""
    from tensorflow.python.framework import ops

    trainer, _ = make(eager_mode=eager_mode)
    trainer.train_on(batch())  # build and trace first: that converts, once
    conversions = []
    original = ops._EagerTensorBase._numpy

    def counting(self):  # floating-point values (losses, metrics); TF's own gradients read int axis constants
        if self.dtype.is_floating:
            conversions.append(1)
        return original(self)

    monkeypatch.setattr(ops._EagerTensorBase, "_numpy", counting)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    per_batch = []

    class CountTransfers(mlp.callbacks.Callback):
        def on_batch_checkpoint(self, logs):
            per_batch.append(len(conversions))

    data = tf.data.Dataset.from_tensor_slices(batch(40)).batch(4)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.LogProgress(log_period=5, set_names=["training"], write=lambda text: None),
        CountTransfers(),
    ]
    mlp.trainers.TrainingManager(trainer, data, num_epochs=1, callbacks=callbacks).start_training()
    transfers = [after - before for before, after in zip([0, *per_batch], per_batch)]
    assert [count > 0 for count in transfers] == [False] * 4 + [True] + [False] * 4 + [True], transfers


def test_non_finite_indices_of_scalars_of_one_dtype_and_of_mixed_ones():
    trainer, _ = make()
    nan, inf = float("nan"), float("inf")
    same = [tf.constant(1.0), tf.constant(nan), tf.constant(2.0), tf.constant(-inf)]
    assert trainer.non_finite_indices(same) == [1, 3]
    mixed = [tf.constant([1.0]), tf.constant(inf, tf.float16), 3.0, nan, tf.constant(0.5, tf.float64)]
    assert trainer.non_finite_indices(mixed) == [1, 3]
    assert trainer.non_finite_indices([]) == []


def test_a_multi_worker_strategy_without_tf_config_is_one_worker_and_trains_as_one_device(monkeypatch):
    """``tf.distribute.MultiWorkerMirroredStrategy()`` without ``TF_CONFIG`` (one worker, e.g. on a laptop): rank 0
    of a world of 1 worker, and 3 steps give the weights and losses of the same steps without a strategy. Broke at
    construction with ``TypeError: unsupported operand type(s) for +: 'NoneType' and 'int'`` (the resolver's
    task id is None without a cluster)."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    results = {}
    for name, scope in (("multi_worker", strategy.scope()), ("one_device", tf.name_scope("one_device"))):
        tf.keras.utils.set_random_seed(0)
        with scope:
            linear = tf.keras.layers.Dense(1)
            linear.build((None, 3))
            optimizer = tf.keras.optimizers.SGD(learning_rate=0.1)
        trainer = mlp.trainers.DefaultTrainer(optimizer, linear, strategy=strategy if name == "multi_worker" else None)
        context = trainer.distributed_context()
        assert (context.rank, context.world_size, context.is_primary) == (0, 1, True)
        trainer.set_training_model(Model("loss", linear))
        losses = [float(trainer.train_on(batch(4, seed)).loss) for seed in range(3)]
        results[name] = (losses, [weight.copy() for weight in linear.get_weights()])
    np.testing.assert_allclose(results["multi_worker"][0], results["one_device"][0], rtol=1e-6)
    for actual, expected in zip(results["multi_worker"][1], results["one_device"][1]):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_a_batch_dtype_that_changes_is_a_warning_that_names_the_step_and_both_batch_specs(caplog):
    """Batches whose input dtype changes (float32, float64, float16, bfloat16), then a batch of another size: each
    new dtype compiles the train step again, and mlpug's warning (at trace time, nothing per step) names the step,
    the batch spec before and after and what to do (cast the inputs, or batch_data_signature); TensorFlow's own
    warning about retracing ``CompiledStep._traced`` (a name the user cannot act on, counted over every step of the
    process) is not issued."""
    trainer, _ = make()
    tensorflow_records: list = []
    handler = logging.Handler()
    handler.emit = tensorflow_records.append  # type: ignore[method-assign]
    tensorflow_logger = logging.getLogger("tensorflow")
    tensorflow_logger.addHandler(handler)
    dtypes = [np.float32, np.float64, np.float16, tf.bfloat16.as_numpy_dtype]
    try:
        with caplog.at_level(logging.WARNING, logger="mlpug"):
            for dtype in dtypes:
                x, y = batch(4)
                trainer.train_on((x.astype(dtype), y))
            trainer.train_on(batch(5))
    finally:
        tensorflow_logger.removeHandler(handler)
    assert trainer._train_step.num_traces == 5
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    changed = [message for message in warnings if "dtypes or structure changed" in message]
    assert len(changed) == 3, warnings
    assert changed[0].startswith(
        "train step: compiled again (trace 2) because the batch's dtypes or structure changed: "
        "('float32[4, 3]', 'float32[4]') before, now ('float64[4, 3]', 'float32[4]')"
    )
    assert all("tf.cast" in message and "batch_data_signature" in message for message in changed)
    assert any("train step: compiled 5 times" in message for message in warnings), warnings
    assert not [r.getMessage() for r in tensorflow_records if "_traced" in r.getMessage()]
