"""The one-call ``mlp.Trainer`` on JAX: a Flax NNX model and an optax loss ``(logits, labels)``; the model holds the
trained weights after ``train``; asynchronous validation gives the synchronous rows; the first-batch check finds
outputs that broadcast against the targets; gradient accumulation passes through."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlpug.jax as mlp
from tests.contract.backends import make_numpy_data


class MLP(nnx.Module):
    def __init__(self, seed=0, num_outputs=3):
        rngs = nnx.Rngs(seed)
        self.hidden = nnx.Linear(6, 16, rngs=rngs)
        self.output = nnx.Linear(16, num_outputs, rngs=rngs)

    def __call__(self, features):
        return self.output(nnx.relu(self.hidden(features)))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def kernels(model):
    return [np.array(model.hidden.kernel[...]), np.array(model.output.kernel[...])]


def train(seed=0, **options):
    model = MLP(seed)
    trainer = mlp.Trainer(model, cross_entropy, optax.adam(0.01), metrics={"accuracy": mlp.metrics.accuracy})
    history = trainer.train(
        make_numpy_data(35, 0), make_numpy_data(24, 1), num_epochs=2, batch_size=8, progress=None, **options
    )
    return model, history


def test_the_model_holds_the_trained_weights_and_predicts_with_them():
    before = kernels(MLP(0))
    model, history = train()
    assert [row["epoch"] for row in history.rows] == [0, 1]
    assert all(not np.array_equal(a, b) for a, b in zip(before, kernels(model)))
    features, labels = make_numpy_data(24, 1)
    accuracy = float(jnp.mean((jnp.argmax(model(features), axis=1) == labels).astype(jnp.float32)))
    assert accuracy == pytest.approx(history.rows[-1]["validation.dataset.accuracy"], abs=1e-6)


def test_asynchronous_validation_gives_the_rows_and_weights_of_synchronous_validation():
    sync_model, sync = train()
    async_model, asynchronous = train(run_async_validation=True)
    paths = ("validation.dataset.loss", "validation.dataset.accuracy", "training.window_average.loss")
    assert [[row[p] for p in paths] for row in asynchronous.rows] == [[row[p] for p in paths] for row in sync.rows]
    for a, b in zip(kernels(sync_model), kernels(async_model)):
        np.testing.assert_array_equal(a, b)


def test_outputs_that_broadcast_against_the_targets_fail_before_the_first_step():
    """Outputs [B, 1] and targets [B] in a mean squared error give [B, B]: named before any step."""
    model = MLP(0, num_outputs=1)
    before = kernels(model)

    def squared_error(outputs, targets):
        return jnp.mean(jnp.square(outputs - targets))

    trainer = mlp.Trainer(model, squared_error, optax.sgd(0.1))
    features, labels = make_numpy_data(16, 0)
    with pytest.raises(ValueError, match=r"broadcast"):
        trainer.train((features, labels.astype(np.float32)), batch_size=8, progress=None)
    assert trainer.manager.global_iter == 0
    for a, b in zip(before, kernels(model)):
        np.testing.assert_array_equal(a, b)
    aligned = mlp.Trainer(model, lambda outputs, targets: squared_error(outputs[:, 0], targets), optax.sgd(0.1))
    aligned.train((features, labels.astype(np.float32)), batch_size=8, progress=None)
    assert aligned.manager.global_iter == 2


def test_trainer_options_reach_the_default_trainer():
    model = MLP(0)
    trainer = mlp.Trainer(model, cross_entropy, optax.adam(0.01), batch_chunk_size=3)
    assert trainer.trainer.chunking.batch_chunk_size == 3
    trainer.train(make_numpy_data(16, 0), batch_size=8, progress=None)
    with pytest.raises(TypeError, match="optax.GradientTransformation|optimizer"):
        mlp.Trainer(model, cross_entropy, "adam")
