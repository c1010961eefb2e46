"""One harness per backend, so that contract tests run the same scenario on every backend.

A harness builds a small classification problem (a 2-layer MLP, deterministic data from numpy) with the
backend's own ``mlp`` module, and reads weights back as numpy arrays. Add a backend by adding a harness
class to ``HARNESSES``; every contract test then runs on it. The JAX harnesses are registered only when JAX, Flax
and optax are installed, so the suite runs without them.
"""

from __future__ import annotations

import importlib
import importlib.util
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

    def component_weights(self, state: Any) -> list:
        """The arrays of a model component's checkpoint state (a state_dict), in the order of :meth:`weights`."""
        return [np.asarray(value.detach().numpy()) for value in state.values()]

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

    def component_weights(self, state: Any) -> list:
        """The arrays of a model component's checkpoint state (a list of arrays), in the order of :meth:`weights`."""
        return [np.asarray(value) for value in state]

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


class JaxHarness:
    """The same problem with ``mlpug.jax``: a Flax NNX MLP, optax adam made with ``optax.inject_hyperparams`` (so its
    learning rate can be read and set), compiled steps (``jax.jit``) fed by a Python list of NumPy batches.

    Subclasses change how the trainer distributes the work through :meth:`trainer_options` (e.g. a mesh strategy);
    every ``DefaultTrainer`` the harness makes gets those options.
    """

    name = "jax"

    def __init__(self):
        self.jax = importlib.import_module("jax")
        self.jnp = importlib.import_module("jax.numpy")
        self.nnx = importlib.import_module("flax.nnx")
        self.optax = importlib.import_module("optax")
        self.mlp = importlib.import_module("mlpug.jax")

    def batches(self, features, labels, batch_size):
        return [(features[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(features), batch_size)]

    def trainer_options(self) -> dict:
        """``DefaultTrainer`` options of this harness (every trainer it makes, and ``mlp.Trainer``): none."""
        return {}

    def adam(self) -> Any:
        """optax adam, learning rate 0.01, made with ``optax.inject_hyperparams`` (its learning rate in its state)."""
        return self.optax.inject_hyperparams(self.optax.adam)(learning_rate=0.01)

    def _trainer_class(self, fail_at_call: Any) -> Any:
        """``DefaultTrainer``, or (``fail_at_call``) one whose steps run op by op under ``jax.disable_jit()``: a
        Python exception in the model can only be raised from Python code, which a compiled step runs only while
        tracing (as the TensorFlow harness runs that scenario eagerly)."""
        jax, default_trainer = self.jax, self.mlp.trainers.DefaultTrainer
        if fail_at_call is None:
            return default_trainer

        class OpByOpTrainer(default_trainer):
            def train_on(self, batch, training_settings=None):
                with jax.disable_jit():
                    return super().train_on(batch, training_settings)

            def evaluate_loss(self, batch, evaluate_settings=None, inference_mode=True):
                with jax.disable_jit():
                    return super().evaluate_loss(batch, evaluate_settings, inference_mode)

        return OpByOpTrainer

    def make_problem(self, seed=0, num_batches=4, batch_size=8, fail_at_call=None) -> Problem:
        jnp, nnx, optax, mlp = self.jnp, self.nnx, self.optax, self.mlp

        class Classifier(nnx.Module):
            def __init__(self, rngs):
                self.hidden = nnx.Linear(NUM_FEATURES, 16, rngs=rngs)
                self.output = nnx.Linear(16, NUM_CLASSES, rngs=rngs)

            def __call__(self, features):
                return self.output(nnx.relu(self.hidden(features)))

        classifier = Classifier(nnx.Rngs(seed))
        calls = [0]  # a counter outside the module: the compiled step runs a copy of the module rebuilt per call

        class TrainModel(nnx.Module):
            def __init__(self):
                self.classifier = classifier

            def __call__(self, batch_data, evaluate_settings, inference_mode=None):
                calls[0] += 1
                if fail_at_call is not None and calls[0] == fail_at_call:
                    raise FloatingPointError("injected failure in the training step")
                features, labels = batch_data
                logits = self.classifier(features)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                return {"loss": loss, "auxiliary_results": logits}

        def accuracy(inputs):
            predictions = jnp.argmax(inputs.auxiliary_results, axis=1)
            return jnp.mean((predictions == jnp.asarray(inputs.batch[1])).astype(jnp.float32))

        optimizer = self.adam()
        trainer = self._trainer_class(fail_at_call)(
            optimizers=optimizer, model_components=classifier, **self.trainer_options()
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
            optimizer,
        )

    #: The classifier's parameters as :meth:`weights` lists them: per layer the kernel, then the bias (the order of
    #: the other harnesses: the first layer's weight matrix first).
    WEIGHT_PATHS = (("hidden", "kernel"), ("hidden", "bias"), ("output", "kernel"), ("output", "bias"))

    def weights(self, problem: Problem) -> list:
        """The classifier's parameters as NumPy copies (order: :attr:`WEIGHT_PATHS`)."""
        return [np.array(getattr(getattr(problem.classifier, layer), name)[...]) for layer, name in self.WEIGHT_PATHS]

    def component_weights(self, state: Any) -> list:
        """The arrays of a model component's checkpoint state (a nested dict), in the order of :meth:`weights`."""
        return [np.asarray(state[layer][name]) for layer, name in self.WEIGHT_PATHS]

    def sgd_trainer(self, problem: Problem, learning_rate: float, **kwargs) -> Any:
        """A DefaultTrainer of the problem's classifier with plain SGD (no momentum), with ``kwargs``."""
        optimizer = self.optax.inject_hyperparams(self.optax.sgd)(learning_rate=learning_rate)
        trainer = self.mlp.trainers.DefaultTrainer(optimizer, problem.classifier, **self.trainer_options(), **kwargs)
        trainer.set_training_model(problem.train_model)
        return trainer

    def new_trainer(self, problem: Problem, **kwargs) -> Any:
        """Another DefaultTrainer of the problem's classifier and optimizer (a fresh optimizer state: on JAX the
        trainer owns it), with ``kwargs``."""
        trainer = self.mlp.trainers.DefaultTrainer(
            problem.optimizer, problem.classifier, **self.trainer_options(), **kwargs
        )
        trainer.set_training_model(problem.train_model)
        return trainer

    def _loss(self, logits: Any, labels: Any) -> Any:
        return self.optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def structured_model(self, problem: Problem) -> Any:
        """A training model whose auxiliary results hold every kind of value of the chunk merge rule."""
        nnx, loss_of = self.nnx, self._loss

        class StructuredModel(nnx.Module):
            def __init__(self):
                self.classifier = problem.classifier

            def __call__(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                logits = self.classifier(features)
                auxiliary = {"logits": logits, "mean": logits.mean(), "count": 7, "tag": "x", "pair": (labels, None)}
                return {"loss": loss_of(logits, labels), "auxiliary_results": auxiliary}

        return StructuredModel()

    def loss_only_model(self, problem: Problem) -> Any:
        """A training model that returns only the loss (no auxiliary results)."""
        nnx, loss_of = self.nnx, self._loss

        class LossOnlyModel(nnx.Module):
            def __init__(self):
                self.classifier = problem.classifier

            def __call__(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                return loss_of(self.classifier(features), labels)

        return LossOnlyModel()

    def to_numpy(self, value: Any) -> Any:
        return np.asarray(value) if isinstance(value, self.jax.Array) else value

    def loss_function(self) -> Any:
        """The problem's loss for ``mlp.Trainer``: ``loss(logits, labels)`` (optax's order), averaged."""
        return self._loss

    def apply_one_call_defaults(self, problem: Problem) -> None:
        """What ``mlp.Trainer`` changes in the problem's optimizer, done by hand for the full API: nothing."""

    def nan_propagating_model(self, problem: Problem) -> Any:
        """The problem's loss plus ``0 * mean(features)``: NaN features give a NaN loss on every backend."""
        nnx, jnp, loss_of = self.nnx, self.jnp, self._loss

        class NanPropagatingModel(nnx.Module):
            def __init__(self):
                self.classifier = problem.classifier

            def __call__(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                loss = loss_of(self.classifier(features), labels)
                return loss + 0.0 * jnp.mean(features).astype(loss.dtype)

        return NanPropagatingModel()

    def nan_gradient_model(self, problem: Problem) -> Any:
        """The problem's classifier with the non-finite rows of its hidden layer replaced by 0 (as a model that masks
        bad rows): NaN features give a finite loss, but the first layer's kernel gets a NaN gradient."""
        nnx, jnp, loss_of = self.nnx, self.jnp, self._loss

        class NanGradientModel(nnx.Module):
            def __init__(self):
                self.classifier = problem.classifier

            def __call__(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                hidden = nnx.relu(self.classifier.hidden(features))
                hidden = jnp.where(jnp.isfinite(hidden), hidden, jnp.zeros_like(hidden))
                return loss_of(self.classifier.output(hidden), labels)

        return NanGradientModel()


def _jax_available() -> bool:
    """Whether JAX, Flax and optax are installed (the contract suite runs without them, on the other backends)."""
    return all(importlib.util.find_spec(name) is not None for name in ("jax", "flax", "optax"))


HARNESSES: dict[str, type] = {
    "pytorch": PyTorchHarness,
    TensorFlowHarness.name: TensorFlowHarness,
    TensorFlowEagerHarness.name: TensorFlowEagerHarness,
}
if _jax_available():
    HARNESSES[JaxHarness.name] = JaxHarness


class JaxMeshHarness(JaxHarness):
    """:class:`JaxHarness` trained data parallel on a 4-device mesh (``mlp.strategies.DataParallelStrategy`` over
    the first 4 devices: ``JAX_NUM_CPU_DEVICES=4`` from the root conftest on a CPU); every batch of the contract
    tests is split 4 ways, the state replicated. Skipped with fewer than 4 JAX devices."""

    name = "jax-mesh"
    num_devices = 4

    def trainer_options(self) -> dict:
        """A new ``DataParallelStrategy`` over the first 4 devices for every trainer (the test is skipped with fewer
        devices). Asked when a trainer is made, never in ``__init__``: the crash test forks its children after
        making the harness, and JAX's runtime must not exist before a fork."""
        if self.jax.device_count() < self.num_devices:
            import pytest

            pytest.skip(f"jax-mesh needs {self.num_devices} JAX devices, found {self.jax.device_count()}")
        return {"strategy": self.mlp.strategies.DataParallelStrategy(self.jax.devices()[: self.num_devices])}


if _jax_available():
    HARNESSES[JaxMeshHarness.name] = JaxMeshHarness
