"""TensorFlow specifics of the one-call API ``mlp.Trainer``: tf.data datasets and the quickstart example."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp
from tests.contract.backends import make_numpy_data

ROOT = Path(__file__).resolve().parents[2]


def train(dataset, batch_size=8, **options):
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [tf.keras.Input(shape=(6,)), tf.keras.layers.Dense(16, activation="relu"), tf.keras.layers.Dense(3)]
    )
    loss_func = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainer = mlp.Trainer(model, loss_func, tf.keras.optimizers.Adam(learning_rate=0.01))
    trainer.train(dataset, num_epochs=2, batch_size=batch_size, seed=4, progress=None, **options)
    return [variable.numpy() for variable in model.weights]


def assert_same(weights, others):
    for a, b in zip(weights, others):
        np.testing.assert_array_equal(a, b)


def test_a_dataset_of_samples_is_batched_and_a_batched_one_is_used_as_it_is():
    features, labels = make_numpy_data(37, seed=0)
    samples = tf.data.Dataset.from_tensor_slices((features, labels))
    from_arrays = train((features, labels), shuffle=False)
    assert_same(from_arrays, train(samples, shuffle=False))
    assert_same(from_arrays, train(samples.batch(8), batch_size=None))
    unbatched = samples.batch(5).unbatch()  # samples again (of unknown cardinality)
    assert_same(from_arrays, train(unbatched, shuffle=False, num_batches_per_epoch=5))
    assert_same(
        train((features, labels), batch_size=None, shuffle=False), train(samples, batch_size=None, shuffle=False)
    )
    with pytest.raises(ValueError, match=r"already yields batches, so batch_size=8"):
        train(samples.batch(8).prefetch(1))


def test_the_shuffle_of_a_dataset_of_samples_depends_on_the_seed_only():
    samples = tf.data.Dataset.from_tensor_slices(make_numpy_data(37, seed=0))
    shuffled = train(samples)
    assert_same(shuffled, train(samples))
    assert not all(np.array_equal(a, b) for a, b in zip(shuffled, train(samples, shuffle=False)))


def test_a_validation_dataset_of_samples_is_batched_with_the_training_batch_size():
    validation = tf.data.Dataset.from_tensor_slices(make_numpy_data(20, seed=1))
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input(shape=(6,)), tf.keras.layers.Dense(3)])
    loss_func = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainer = mlp.Trainer(model, loss_func, tf.keras.optimizers.Adam())
    history = trainer.train(make_numpy_data(16, seed=0), validation, batch_size=8, progress=None)
    assert np.isfinite(history.rows[0]["validation.dataset.loss"])


@pytest.mark.timeout(600)
def test_the_quickstart_reaches_85_percent_validation_accuracy_in_3_epochs(fashion_mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLPUG_FASHION_MNIST_DIR", fashion_mnist_dir)
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(ROOT / "examples/quickstart/tensorflow/train.py"), run_name="__main__")
    rows = names["history"].rows
    assert len(rows) == 3 and rows[-1]["validation.dataset.accuracy"] >= 0.85
    assert (tmp_path / "checkpoints" / "model-best-model-checkpoint.safetensors").exists()


@pytest.fixture(scope="module")
def mirrored_runs():
    """``scripts/one_call_mirrored.py``: per loss variant, a MirroredStrategy over 2 logical CPUs (its own process:
    the devices are set before TF starts) beside one device with the global batch of 16 (SGD)."""
    script = str(Path(__file__).parent / "scripts" / "one_call_mirrored.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_trains_like_one_device(run, iterations):
    """The same weights, batch losses and validation loss as one device, to float32 sums in another order."""
    assert "error" not in run, run.get("error")
    assert run["iters"] == [iterations, iterations] and run["difference"] < 1e-5
    np.testing.assert_allclose(*run["batch_losses"], rtol=1e-5, atol=1e-5)
    assert run["validation_losses"][0] == pytest.approx(run["validation_losses"][1], rel=1e-5)


@pytest.mark.timeout(450)
def test_a_distribution_strategy_passes_through_and_trains_like_one_device(mirrored_runs):
    """The global batch of 16 is split over the replicas, so the run follows the one-device run up to the order of
    the float sums; the Keras loss object (scaled by 1/2 in a replica context) is found scaled once and undone (SGD:
    a loss of 1/2 would halve the steps; Adam would hide it)."""
    run = mirrored_runs["sparse_categorical"]
    assert_trains_like_one_device(run, 8)
    assert run["probes"] == 1 and run["warnings"] == []


# ----- first-batch checks: one batch, no optimizer step -----


def regression(num_samples=40):
    features = np.random.default_rng(0).normal(size=(num_samples, 3)).astype(np.float32)
    return features, features @ np.array([1.0, 2.0, 3.0], np.float32)


def mean_squared_error(targets, outputs):  # written by hand: broadcasts [B] against [B, 1]
    return tf.reduce_mean((targets - outputs) ** 2)


def regression_trainer(model=None, loss_func=mean_squared_error, **options):
    tf.keras.utils.set_random_seed(0)
    model = model if model is not None else tf.keras.Sequential([tf.keras.Input(shape=(3,)), tf.keras.layers.Dense(1)])
    return model, mlp.Trainer(model, loss_func, tf.keras.optimizers.SGD(learning_rate=0.05), **options)


def assert_unchanged(before, model):
    assert_same(before, [variable.numpy() for variable in model.weights])


@pytest.mark.parametrize("options", [{}, {"steps_per_execution": 4}, {"eager_mode": True}])
def test_targets_that_broadcast_against_the_outputs_fail_before_the_first_step(options):
    features, targets = regression()
    model, trainer = regression_trainer(**options)
    before = [variable.numpy() for variable in model.weights]
    expected = (
        r"outputs have shape \[8, 1\] and the targets \[8\]; in loss_func they broadcast to \[8, 8\].*"
        r"targets\[\.\.\., None\].*allow_broadcast=True"
    )
    with pytest.raises(ValueError, match=expected):
        trainer.train((features, targets), batch_size=8, progress=None)
    assert_unchanged(before, model)
    # the fixes train: targets of the outputs' shape, or the broadcast allowed on purpose
    regression_trainer(**options)[1].train((features, targets[:, None]), batch_size=8, progress=None)
    model, allowed = regression_trainer(allow_broadcast=True, **options)
    allowed.train((features, targets), batch_size=8, progress=None)
    assert not all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.weights))
    # no false alarm: a Keras loss aligns [B] with [B, 1] itself; class indices [B] or [B, 1] against logits [B, C]
    model, keras_loss = regression_trainer(loss_func=tf.keras.losses.MeanSquaredError(), **options)
    keras_loss.train((features, targets), batch_size=8, progress=None)
    assert not all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.weights))
    classifier = tf.keras.Sequential([tf.keras.Input(shape=(3,)), tf.keras.layers.Dense(8)])
    loss_func = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for classes in (np.arange(40) % 8, (np.arange(40) % 8)[:, None]):
        regression_trainer(classifier, loss_func, **options)[1].train((features, classes), batch_size=8, progress=None)


@pytest.mark.parametrize(
    "loss_func",
    [
        lambda targets, outputs: tf.reduce_mean((targets - tf.squeeze(outputs, -1)) ** 2),
        lambda targets, outputs: tf.reduce_mean((targets - tf.reshape(outputs, [-1])) ** 2),
        lambda targets, outputs: tf.reduce_mean((targets[:, None] - outputs) ** 2),
    ],
    ids=["outputs_squeezed", "outputs_reshaped", "targets_expanded"],
)
def test_a_loss_that_aligns_the_shapes_itself_either_way_trains(loss_func):
    features, targets = regression()
    model, trainer = regression_trainer(loss_func=loss_func)
    trainer.train((features, targets), batch_size=8, progress=None)
    assert any(np.any(v.numpy() != 0) for v in model.weights[1:])  # the bias moved: it trained


def test_the_fix_for_targets_that_broadcast_names_both_ways_to_align_them():
    features, targets = regression()
    expected = (
        r"Fix: reshape one to the other's shape, either the targets to \[8, 1\] \(e.g. targets\[\.\.\., None\]\) "
        r"or, in loss_func, the outputs to \[8\] \(e.g. outputs\[\.\.\., 0\]\)"
    )
    with pytest.raises(ValueError, match=expected):
        regression_trainer()[1].train((features, targets), batch_size=8, progress=None)


def test_a_model_that_returns_a_tuple_gets_an_error_naming_what_it_returned():
    class OutputsAndFeatures(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = tf.keras.layers.Dense(1)

        def call(self, features, training=None):
            return self.dense(features), features

    features, targets = regression()
    model, trainer = regression_trainer(OutputsAndFeatures())
    model(features[:1])  # built, so that its weights can be compared
    before = [variable.numpy() for variable in model.weights]
    expected = (
        r"raised by loss_func\(targets, outputs\) of mlp.Trainer, with the model's outputs tuple of 2 "
        r"\(\w*Tensor\[8, 1\] float32, \w*Tensor\[8, 3\] float32\) and the targets \w+\[8, 1\] float32.*"
        r"make the model return one tensor"
    )
    with pytest.raises(TypeError, match=expected):
        trainer.train((features, targets[:, None]), batch_size=8, progress=None)
    assert_unchanged(before, model)


def test_metric_functions_fail_before_the_first_step():
    def mae(y_true, y_pred):
        return tf.reduce_mean(tf.abs(y_true - y_pred))

    features, targets = regression()
    for metrics, error, expected in (
        ({"mae": mae}, TypeError, r"metric function 'mae' is .*mae\(y_true, y_pred\), but metric functions take"),
        ({"top_5": mlp.metrics.top_k_accuracy(5)}, ValueError, r"k=5 exceeds the 1 classes of the logits"),
    ):
        model, trainer = regression_trainer(metrics=metrics)
        before = [variable.numpy() for variable in model.weights]
        with pytest.raises(error, match=expected):
            trainer.train((features, targets[:, None]), batch_size=8, progress=None)
        assert_unchanged(before, model)


# ----- Keras' replica scaling of a loss object under a strategy (scripts/one_call_mirrored.py) -----


@pytest.mark.timeout(450)
@pytest.mark.parametrize("variant", ["mse_column", "mse_1d", "binary_1d"])
def test_a_keras_loss_object_trains_like_one_device_whether_keras_scales_it_or_not(mirrored_runs, variant):
    """Outputs and targets ``[B, 1]`` (``mse_column``: Keras scales the mean by 1/2 in a replica context) and ``[B]``
    (``mse_1d``, ``binary_1d``: 0-d per-sample values, which Keras leaves unscaled): the same weights and losses as
    one device. The ``[B]`` runs raised ValueError ("mixes scaled and unscaled terms") while the one-call loss
    wrapper divided every mean-reduced loss object by 1/2 itself."""
    run = mirrored_runs[variant]
    assert_trains_like_one_device(run, 8)
    assert run["probes"] == 1 and run["warnings"] == []


@pytest.mark.timeout(450)
def test_the_replica_loss_probe_stops_after_10_batches_whose_loss_is_0(mirrored_runs):
    """The loss is 0 on the first 12 of 16 batches (zero outputs and targets), which tells nothing about Keras'
    scaling: 10 batches are probed (every batch was, before the cap), then one warning and factor 1 (right for this
    ``[B]`` loss: the run equals one device)."""
    run = mirrored_runs["zero_loss_first_batches"]
    assert_trains_like_one_device(run, 16)
    assert run["probes"] == 10
    assert len(run["warnings"]) == 1 and "cannot tell whether Keras 3 scales it" in run["warnings"][0]
