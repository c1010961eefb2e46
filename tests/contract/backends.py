"""One harness per backend, so that contract tests run the same scenario on every backend.

A harness builds a small classification problem (a 2-layer MLP, deterministic data from numpy) with the
backend's own ``mlp`` module, and reads weights back as numpy arrays. Add a backend by adding a harness
class to ``HARNESSES``; every contract test then runs on it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

NUM_FEATURES, NUM_CLASSES = 6, 3


def make_numpy_data(num_samples: int, seed: int) -> tuple:
    """Features float32 [N, 6] and labels int64 [N] from a fixed random linear rule."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_samples, NUM_FEATURES)).astype(np.float32)
    labels = (features @ rng.normal(size=(NUM_FEATURES, NUM_CLASSES))).argmax(axis=1).astype(np.int64)
    return features, labels


@dataclass
class Problem:
    mlp: Any  # the backend module, e.g. mlpug.pytorch
    trainer: Any
    train_model: Any
    classifier: Any
    training_batches: list
    validation_batches: list
    accuracy: Callable  # metric function of MetricInputs
    optimizer: Any = None


class PyTorchHarness:
    name = "pytorch"

    def __init__(self):
        self.torch = importlib.import_module("torch")
        self.mlp = importlib.import_module("mlpug.pytorch")

    def batches(self, features, labels, batch_size):
        torch = self.torch
        return [
            (torch.from_numpy(features[i : i + batch_size]), torch.from_numpy(labels[i : i + batch_size]))
            for i in range(0, len(features), batch_size)
        ]

    def make_problem(self, seed=0, num_batches=4, batch_size=8, fail_at_call=None) -> Problem:
        torch, mlp = self.torch, self.mlp
        torch.manual_seed(seed)
        classifier = torch.nn.Sequential(
            torch.nn.Linear(NUM_FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, NUM_CLASSES)
        )

        class TrainModel(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.classifier = classifier
                self.calls = 0

            def forward(self, batch_data, evaluate_settings, inference_mode=None):
                self.calls += 1
                if fail_at_call is not None and self.calls == fail_at_call:
                    raise FloatingPointError("injected failure in the training step")
                features, labels = batch_data
                logits = self.classifier(features)
                return {"loss": torch.nn.functional.cross_entropy(logits, labels), "auxiliary_results": logits}

        def accuracy(inputs):
            return (inputs.auxiliary_results.argmax(dim=1) == inputs.batch[1]).float().mean()

        optimizer = torch.optim.Adam(classifier.parameters(), lr=0.01)
        trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=classifier)
        train_model = TrainModel()
        trainer.set_training_model(train_model)
        features, labels = make_numpy_data(num_batches * batch_size, seed)
        validation_features, validation_labels = make_numpy_data(3 * batch_size, seed + 1)
        return Problem(
            mlp,
            trainer,
            train_model,
            classifier,
            self.batches(features, labels, batch_size),
            self.batches(validation_features, validation_labels, batch_size),
            accuracy,
            optimizer,
        )

    def weights(self, problem: Problem) -> list:
        return [p.detach().numpy().copy() for p in problem.classifier.parameters()]

    def sgd_trainer(self, problem: Problem, learning_rate: float, **kwargs) -> Any:
        """A DefaultTrainer of the problem's classifier with plain SGD (no momentum), with ``kwargs``."""
        optimizer = self.torch.optim.SGD(problem.classifier.parameters(), lr=learning_rate)
        trainer = self.mlp.trainers.DefaultTrainer(optimizer, problem.classifier, **kwargs)
        trainer.set_training_model(problem.train_model)
        return trainer

    def new_trainer(self, problem: Problem, **kwargs) -> Any:
        """Another DefaultTrainer of the problem's classifier and optimizer, with ``kwargs``."""
        trainer = self.mlp.trainers.DefaultTrainer(problem.optimizer, problem.classifier, **kwargs)
        trainer.set_training_model(problem.train_model)
        return trainer

    def structured_model(self, problem: Problem) -> Any:
        """A training model whose auxiliary results hold every kind of value of the chunk merge rule."""
        torch, classifier = self.torch, problem.classifier

        class StructuredModel(torch.nn.Module):
            def forward(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                logits = classifier(features)
                loss = torch.nn.functional.cross_entropy(logits, labels)
                auxiliary = {"logits": logits, "mean": logits.mean(), "count": 7, "tag": "x", "pair": (labels, None)}
                return {"loss": loss, "auxiliary_results": auxiliary}

        return StructuredModel()

    def loss_only_model(self, problem: Problem) -> Any:
        """A training model that returns only the loss (no auxiliary results)."""
        torch, classifier = self.torch, problem.classifier

        class LossOnlyModel(torch.nn.Module):
            def forward(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                return torch.nn.functional.cross_entropy(classifier(features), labels)

        return LossOnlyModel()

    def to_numpy(self, value: Any) -> Any:
        return value.detach().numpy() if isinstance(value, self.torch.Tensor) else value

    def loss_function(self) -> Any:
        """The problem's loss for ``mlp.Trainer``: ``loss(logits, labels)`` (torch's order)."""
        return self.torch.nn.CrossEntropyLoss()

    def trainer_options(self) -> dict:
        """``DefaultTrainer`` options of this harness (for ``mlp.Trainer``)."""
        return {}

    def apply_one_call_defaults(self, problem: Problem) -> None:
        """What ``mlp.Trainer`` changes in the problem's optimizer, done by hand for the full API: torch's fused
        implementation (``fused=True``, :func:`mlpug.pytorch.one_call.use_fused_implementation`)."""
        assert self.mlp.one_call.use_fused_implementation(problem.optimizer)

    def nan_propagating_model(self, problem: Problem) -> Any:
        """The problem's loss plus ``0 * mean(features)``: NaN features give a NaN loss on every backend."""
        torch, classifier = self.torch, problem.classifier

        class NanPropagatingModel(torch.nn.Module):
            def forward(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                loss = torch.nn.functional.cross_entropy(classifier(features), labels)
                return loss + 0.0 * features.mean()

        return NanPropagatingModel()

    def nan_gradient_model(self, problem: Problem) -> Any:
        """The problem's classifier with the non-finite rows of its hidden layer replaced by 0 (as a model that masks
        bad rows): NaN features give a finite loss, but the first layer's weight gets a NaN gradient."""
        torch, classifier = self.torch, problem.classifier

        class NanGradientModel(torch.nn.Module):
            def forward(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                hidden = classifier[1](classifier[0](features))
                hidden = torch.where(torch.isfinite(hidden), hidden, torch.zeros_like(hidden))
                return torch.nn.functional.cross_entropy(classifier[2](hidden), labels)

        return NanGradientModel()


class TensorFlowHarness:
    """The same problem with ``mlpug.tensorflow``: compiled steps (``tf.function``) fed by ``tf.data.Dataset`` s."""

    name = "tensorflow"
    eager_mode = False

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.tf = importlib.import_module("tensorflow")
        self.mlp = importlib.import_module("mlpug.tensorflow")

    def batches(self, features, labels, batch_size):
        return self.tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size)

    def make_problem(self, seed=0, num_batches=4, batch_size=8, fail_at_call=None) -> Problem:
        tf, mlp = self.tf, self.mlp
        tf.keras.utils.set_random_seed(seed)
        classifier = tf.keras.Sequential(
            [
                tf.keras.Input(shape=(NUM_FEATURES,)),
                tf.keras.layers.Dense(16, activation="relu"),
                tf.keras.layers.Dense(NUM_CLASSES),
            ]
        )
        loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        class TrainModel(tf.keras.Model):
            def __init__(self):
                super().__init__()
                self.classifier = classifier
                self.calls = 0

            def call(self, batch_data, evaluate_settings, inference_mode=None):
                # Python side effects run on every call in eager mode, but only while tracing when compiled.
                self.calls += 1
                if fail_at_call is not None and self.calls == fail_at_call:
                    raise FloatingPointError("injected failure in the training step")
                features, labels = batch_data
                logits = self.classifier(features)
                return {"loss": loss_function(labels, logits), "auxiliary_results": logits}

        def accuracy(inputs):
            predictions = tf.argmax(inputs.auxiliary_results, axis=1)
            return tf.reduce_mean(tf.cast(predictions == tf.cast(inputs.batch[1], predictions.dtype), tf.float32))

        # A Python exception in the model can only be raised from Python code, which a compiled step runs only
        # while tracing: the failure scenario runs eagerly (tests/tensorflow covers failures in compiled steps).
        eager_mode = self.eager_mode or fail_at_call is not None
        trainer = mlp.trainers.DefaultTrainer(
            optimizers=tf.keras.optimizers.Adam(learning_rate=0.01), model_components=classifier, eager_mode=eager_mode
        )
        train_model = TrainModel()
        trainer.set_training_model(train_model)
        features, labels = make_numpy_data(num_batches * batch_size, seed)
        validation_features, validation_labels = make_numpy_data(3 * batch_size, seed + 1)
        return Problem(
            mlp,
            trainer,
            train_model,
            classifier,
            self.batches(features, labels, batch_size),
            self.batches(validation_features, validation_labels, batch_size),
            accuracy,
            trainer.optimizers["optimizer"],
        )

    def weights(self, problem: Problem) -> list:
        return [variable.numpy().copy() for variable in problem.classifier.weights]

    def sgd_trainer(self, problem: Problem, learning_rate: float, **kwargs) -> Any:
        """A DefaultTrainer of the problem's classifier with plain SGD (no momentum), with ``kwargs``."""
        optimizer = self.tf.keras.optimizers.SGD(learning_rate=learning_rate)
        trainer = self.mlp.trainers.DefaultTrainer(optimizer, problem.classifier, eager_mode=self.eager_mode, **kwargs)
        trainer.set_training_model(problem.train_model)
        return trainer

    def new_trainer(self, problem: Problem, **kwargs) -> Any:
        """Another DefaultTrainer of the problem's classifier and optimizer, with ``kwargs``."""
        trainer = self.mlp.trainers.DefaultTrainer(
            problem.optimizer, problem.classifier, eager_mode=self.eager_mode, **kwargs
        )
        trainer.set_training_model(problem.train_model)
        return trainer

    def structured_model(self, problem: Problem) -> Any:
        """A training model whose auxiliary results hold every kind of value of the chunk merge rule."""
        tf, classifier = self.tf, problem.classifier
        loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        class StructuredModel(tf.keras.Model):
            def call(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                logits = classifier(features)
                auxiliary = {
                    "logits": logits, "mean": tf.reduce_mean(logits), "count": 7, "tag": "x", "pair": (labels, None)
                }  # fmt: skip
                return {"loss": loss_function(labels, logits), "auxiliary_results": auxiliary}

        return StructuredModel()

    def loss_only_model(self, problem: Problem) -> Any:
        """A training model that returns only the loss (no auxiliary results)."""
        tf, classifier = self.tf, problem.classifier
        loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        class LossOnlyModel(tf.keras.Model):
            def call(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                return loss_function(labels, classifier(features))

        return LossOnlyModel()

    def to_numpy(self, value: Any) -> Any:
        return value.numpy() if self.tf.is_tensor(value) else value

    def loss_function(self) -> Any:
        """The problem's loss for ``mlp.Trainer``: ``loss(labels, logits)`` (Keras' order)."""
        return self.tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def trainer_options(self) -> dict:
        """``DefaultTrainer`` options of this harness (for ``mlp.Trainer``)."""
        return {"eager_mode": self.eager_mode}

    def apply_one_call_defaults(self, problem: Problem) -> None:
        """What ``mlp.Trainer`` changes in the problem's optimizer, done by hand for the full API: nothing."""

    def nan_propagating_model(self, problem: Problem) -> Any:
        """The problem's loss plus ``0 * mean(features)``: NaN features give a NaN loss on every backend (Keras'
        sparse cross-entropy alone turns NaN logits into a finite loss)."""
        tf, classifier = self.tf, problem.classifier
        loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        class NanPropagatingModel(tf.keras.Model):
            def call(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                loss = loss_function(labels, classifier(features))
                return loss + 0.0 * tf.reduce_mean(tf.cast(features, loss.dtype))

        return NanPropagatingModel()

    def nan_gradient_model(self, problem: Problem) -> Any:
        """The problem's classifier with the non-finite rows of its hidden layer replaced by 0 (as a model that masks
        bad rows): NaN features give a finite loss, but the first layer's kernel gets a NaN gradient."""
        tf, classifier = self.tf, problem.classifier
        loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        class NanGradientModel(tf.keras.Model):
            def call(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                hidden = classifier.layers[0](features)
                hidden = tf.where(tf.math.is_finite(hidden), hidden, tf.zeros_like(hidden))
                return loss_function(labels, classifier.layers[1](hidden))

        return NanGradientModel()


class TensorFlowEagerHarness(TensorFlowHarness):
    """``mlpug.tensorflow`` in eager mode, fed by a plain Python list of numpy batches."""

    name = "tensorflow-eager"
    eager_mode = True

    def batches(self, features, labels, batch_size):
        return [(features[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(features), batch_size)]


HARNESSES = {
    "pytorch": PyTorchHarness,
    TensorFlowHarness.name: TensorFlowHarness,
    TensorFlowEagerHarness.name: TensorFlowEagerHarness,
}
