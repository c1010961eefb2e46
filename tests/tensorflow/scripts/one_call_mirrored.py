"""``mlp.Trainer`` with ``distribution_strategy=`` a MirroredStrategy over 2 logical CPU devices, beside the same
training on one device: prints a JSON line with the largest weight difference and both validation losses."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mlpug.tensorflow as mlp  # noqa: E402

strategy = mlp.distributed.mirrored_cpu_strategy(2)  # before any tensor exists
rng = np.random.default_rng(1)
inputs = rng.normal(size=(96, 6)).astype("float32")
targets = (inputs[:, 0] > 0).astype("int64")


def train(strategy, batch_size):
    mlp.set_random_seed(0)
    with strategy.scope() if strategy is not None else tf.name_scope("one_device"):
        model = tf.keras.Sequential(
            [tf.keras.Input(shape=(6,)), tf.keras.layers.Dense(16, activation="relu"), tf.keras.layers.Dense(2)]
        )
        optimizer = tf.keras.optimizers.Adam(learning_rate=0.01)
    loss_func = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainer = mlp.Trainer(model, loss_func, optimizer, distribution_strategy=strategy)
    history = trainer.train(
        (inputs[:64], targets[:64]), (inputs[64:], targets[64:]), num_epochs=2, batch_size=batch_size, progress=None
    )
    return [w.numpy() for w in model.weights], history.rows[-1]["validation.dataset.loss"], trainer.manager.global_iter


mirrored, mirrored_loss, mirrored_iters = train(strategy, 16)
single, single_loss, single_iters = train(None, 16)
difference = max(float(np.abs(a - b).max()) for a, b in zip(mirrored, single))
print(
    json.dumps(
        {"difference": difference, "losses": [mirrored_loss, single_loss], "iters": [mirrored_iters, single_iters]}
    )
)
