"""``mlp.Trainer`` with ``strategy=`` a MirroredStrategy over 2 logical CPU devices, beside the same
training on one device with the global batch, for several Keras loss objects (SGD: a loss off by a factor changes
the step); prints one JSON line: per variant the largest weight difference, both runs' batch and validation losses
and iterations (or the error the strategy run raised), the number of replica loss probes and mlpug's warnings."""

import json
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mlpug.tensorflow as mlp  # noqa: E402

strategy = mlp.distributed.mirrored_cpu_strategy(2)  # before any tensor exists
rng = np.random.default_rng(1)
features = rng.normal(size=(96, 6)).astype("float32")
regression_targets = (features @ np.linspace(1.0, 2.0, 6)).astype("float32")

# name: (loss object, targets [B] or [B, 1], output units (None: [B] outputs), a zero last kernel (outputs 0))
VARIANTS = {
    "sparse_categorical": (
        lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        (features[:, 0] > 0).astype("int64"),
        2,
        False,
    ),
    "mse_column": (lambda: tf.keras.losses.MeanSquaredError(), regression_targets[:, None], 1, False),  # [B, 1]
    "mse_1d": (lambda: tf.keras.losses.MeanSquaredError(), regression_targets, None, False),  # [B]: 0-d values
    "binary_1d": (
        lambda: tf.keras.losses.BinaryCrossentropy(from_logits=True),
        (features[:, 0] > 0).astype("float32"),
        None,
        False,
    ),
    # the first 12 of 16 training batches have the loss 0 (zero outputs and targets): no probe can tell
    "zero_loss_first_batches": (
        lambda: tf.keras.losses.MeanSquaredError(),
        np.concatenate([np.zeros(12 * 16, "float32"), np.resize(regression_targets, 4 * 16 + 32)]),
        None,
        True,
    ),
}


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


warnings = Warnings()
logging.getLogger("mlpug").addHandler(warnings)


class Recorder(mlp.callbacks.Callback):
    def __init__(self):
        super().__init__("Recorder")
        self.batch_losses = []

    def on_batch_training_completed(self, training_batch, logs):
        self.batch_losses.append(float(logs["current"]["training"]["batch"]["loss"]))
        return True


def train(variant, strategy):
    make_loss, targets, units, zeros = VARIANTS[variant]
    inputs = np.resize(features, (len(targets), 6))
    split = len(targets) - 32
    mlp.set_random_seed(0)
    with strategy.scope() if strategy is not None else tf.name_scope("one_device"):
        layers = [
            tf.keras.Input(shape=(6,)),
            tf.keras.layers.Dense(16, activation="relu"),
            tf.keras.layers.Dense(units or 1, kernel_initializer="zeros" if zeros else "glorot_uniform"),
        ]
        model = tf.keras.Sequential(layers + ([tf.keras.layers.Reshape(())] if units is None else []))
        optimizer = tf.keras.optimizers.SGD(learning_rate=0.05)
    trainer = mlp.Trainer(model, make_loss(), optimizer, strategy=strategy)
    recorder = Recorder()
    history = trainer.train(
        (inputs[:split], targets[:split]), (inputs[split:], targets[split:]), num_epochs=1 if zeros else 2,
        batch_size=16, shuffle=not zeros, progress=None, callbacks=[recorder],
    )  # fmt: skip
    return {
        "weights": [w.numpy() for w in model.weights],
        "batch_losses": recorder.batch_losses,
        "validation_loss": history.rows[-1]["validation.dataset.loss"],
        "iters": trainer.manager.global_iter,
        "probes": trainer.trainer.replica_loss.probed_batches,
    }


results = {}
for variant in VARIANTS:
    warnings.messages = []
    try:
        mirrored = train(variant, strategy)
    except ValueError as error:
        results[variant] = {"error": str(error)}
        continue
    mirrored_warnings = warnings.messages
    single = train(variant, None)
    results[variant] = {
        "difference": max(float(np.abs(a - b).max()) for a, b in zip(mirrored["weights"], single["weights"])),
        "batch_losses": [mirrored["batch_losses"], single["batch_losses"]],
        "validation_losses": [mirrored["validation_loss"], single["validation_loss"]],
        "iters": [mirrored["iters"], single["iters"]],
        "probes": mirrored["probes"],
        "warnings": mirrored_warnings,
    }
print(json.dumps(results))
