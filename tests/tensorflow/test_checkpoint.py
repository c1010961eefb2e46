"""TensorFlow checkpoints: random state, tf.data fallback (skipping with a warning), safetensors files."""

import json
import logging
import os

import numpy as np
import pytest
import safetensors
import tensorflow as tf

import mlpug.tensorflow as mlp
from mlpug.checkpointing import CheckpointError, make_header
from mlpug.random_state import get_random_states, set_random_states
from tests.contract.backends import HARNESSES, make_numpy_data


def test_global_generator_state_round_trip():
    problem = HARNESSES["tensorflow"]().make_problem()
    providers = problem.trainer.random_state_providers()
    state = get_random_states(providers)
    assert set(state) == {"python", "numpy", "tensorflow"}
    expected = tf.random.get_global_generator().normal([4]).numpy()
    set_random_states(providers, state)
    assert np.array_equal(tf.random.get_global_generator().normal([4]).numpy(), expected)


def test_tf_data_resume_skips_batches_with_a_warning_and_stays_exact(tmp_path, caplog):
    harness = HARNESSES["tensorflow"]()
    features, labels = make_numpy_data(40, 2)

    def train(directory, stop_at=None, resume_from=None):
        problem = harness.make_problem(seed=0 if resume_from is None else 3)
        dataset = tf.data.Dataset.from_tensor_slices((features, labels)).batch(8)  # same order every pass
        losses = []

        class Record(mlp.callbacks.Callback):
            def on_batch_training_completed(self, training_batch, logs):
                losses.append(logs["current"]["training"]["batch"]["loss"])
                if logs["current"]["global_iter"] == stop_at:
                    self.training_manager.stop_training()

        callbacks = [
            mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=problem.trainer)),
            Record("Record"),
            mlp.callbacks.CheckpointManager(checkpoints_path=str(directory), metric_to_monitor=None),
        ]
        manager = mlp.trainers.TrainingManager(
            problem.trainer, dataset, num_epochs=2, callbacks=callbacks, resume_from=resume_from
        )
        manager.start_training()
        return [w.numpy() for w in problem.classifier.weights], losses

    straight_weights, straight_losses = train(tmp_path / "straight")
    train(tmp_path / "resumed", stop_at=6)
    with caplog.at_level(logging.WARNING, logger="mlpug.data"):
        weights, losses = train(tmp_path / "resumed", resume_from="latest")
    assert "2 batches of epoch 1 are skipped by loading and dropping them" in caplog.text
    assert losses == straight_losses[7:]
    assert all(np.array_equal(a, b) for a, b in zip(weights, straight_weights))


def test_checkpoints_are_safetensors_files_and_name_the_backend(tmp_path):
    saver = mlp.checkpointing.CheckpointSaver()
    path = str(tmp_path / "state.safetensors")
    assert saver.extension == "safetensors"
    saver.save(saver.snapshot({"mlpug": make_header("model", "tensorflow"), "w": tf.ones([2, 2])}), path)
    with safetensors.safe_open(path, framework="np") as file:  # a plain safetensors file: no pickle anywhere
        assert list(file.keys()) == ["a0"] and json.loads(file.metadata()["mlpug"])["backend"] == "tensorflow"
    assert np.array_equal(mlp.load_model_checkpoint(path)["w"], np.ones([2, 2], np.float32))
    with pytest.raises(CheckpointError, match="is a model checkpoint, expected a training checkpoint"):
        mlp.load_training_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        mlp.load_training_checkpoint(os.path.join(str(tmp_path), "missing.safetensors"))


def _train_with_dropout(directory, eager, stop_at=None, resume_from=None, seed=0):
    tf.keras.utils.set_random_seed(seed)
    classifier = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(6,)),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dropout(0.3),
            tf.keras.layers.Dense(3),
        ]
    )
    loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    class TrainModel(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def call(self, batch_data, evaluate_settings, inference_mode=None):
            features, labels = batch_data
            return loss_function(labels, self.classifier(features, training=not inference_mode))

    trainer = mlp.trainers.DefaultTrainer(
        optimizers=tf.keras.optimizers.Adam(0.01), model_components=classifier, eager_mode=eager
    )
    trainer.set_training_model(TrainModel())
    features, labels = make_numpy_data(40, 1)
    losses = []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])
            if logs["current"]["global_iter"] == stop_at:
                self.training_manager.stop_training()

    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=trainer)),
        Record("Record"),
        mlp.callbacks.CheckpointManager(checkpoints_path=str(directory), metric_to_monitor=None, batch_level=True),
    ]
    data = mlp.data.ResumableArrayBatches((features, labels), 8, seed=3)
    manager = mlp.trainers.TrainingManager(trainer, data, num_epochs=2, callbacks=callbacks, resume_from=resume_from)
    manager.start_training()
    return [w.numpy() for w in classifier.weights], losses


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_exact_resume_with_dropout_restores_keras_seed_generators(tmp_path, eager):
    straight_weights, straight_losses = _train_with_dropout(tmp_path / "straight", eager)
    _, first_losses = _train_with_dropout(tmp_path / "resumed", eager, stop_at=6)
    weights, second_losses = _train_with_dropout(tmp_path / "resumed", eager, resume_from="latest", seed=5)
    assert first_losses + second_losses == straight_losses
    assert all(np.array_equal(a, b) for a, b in zip(weights, straight_weights))
