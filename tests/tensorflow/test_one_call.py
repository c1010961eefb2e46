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


@pytest.mark.timeout(300)
def test_a_distribution_strategy_passes_through_and_trains_like_one_device():
    """MirroredStrategy over 2 logical CPUs (its own process: the devices are set before TF starts): the global batch
    of 16 is split over the replicas, so the run follows the one-device run up to the order of the float sums."""
    script = str(Path(__file__).parent / "scripts" / "one_call_mirrored.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["iters"] == [8, 8] and measured["difference"] < 1e-3
    assert measured["losses"][0] == pytest.approx(measured["losses"][1], rel=1e-4)
