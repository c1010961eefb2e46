"""Quickstart: Fashion-MNIST in one call, with validation, a progress bar and checkpoints (JAX: Flax NNX, optax)."""

import numpy as np
import optax
from flax import nnx

import mlpug.jax as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

mlp.set_random_seed(0)
data = load_fashion_mnist()  # NumPy arrays: images uint8 [N, 28, 28], labels [N]
train_set = (data.train_images.astype(np.float32) / 255, data.train_labels.astype(np.int32))
validation_set = (data.test_images.astype(np.float32) / 255, data.test_labels.astype(np.int32))

rngs = nnx.Rngs(0)
model = nnx.Sequential(
    lambda images: images.reshape((images.shape[0], -1)), nnx.Linear(784, 256, rngs=rngs), nnx.relu,
    nnx.Linear(256, 256, rngs=rngs), nnx.relu, nnx.Linear(256, 10, rngs=rngs),
)  # fmt: skip


def loss_func(logits, labels):  # optax's order: outputs, then targets
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)  # injected: the learning rate is logged
trainer = mlp.Trainer(model, loss_func, optimizer, metrics={"accuracy": mlp.metrics.accuracy})
history = trainer.train(train_set, validation_set, num_epochs=3, batch_size=64, checkpoints_path="checkpoints")
print(history.table())
