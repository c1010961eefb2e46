"""Training-loop overhead of mlpug's TensorFlow backend: compiled vs eager mlpug, and vs a hand-written loop.

Job (the same as ``overhead_pytorch.py``): MLP 784-256-256-10, Adam, batch 64, one epoch of the real
Fashion-MNIST training set (938 batches, the last one of 32 samples), 1 intra-op and 1 inter-op CPU thread.
Every variant iterates the same pre-built list of batches (eager tensors), so data loading costs nothing and
only the loop itself is compared; every variant starts from a fresh model, so tracing time is included:

* raw: a hand-written ``tf.function`` GradientTape step (``tf.function(reduce_retracing=True)``, like mlpug),
  the loss accumulated as a tensor and its mean printed every 200 batches (one ``.numpy()`` per print).
* mlpug: ``DefaultTrainer`` (compiled, the default) + ``TrainingManager`` with ``TrainingMetricsLogger`` and
  ``LogProgress(log_period=200)``.
* mlpug_eager: the same with ``eager_mode=True``.

The variants run side by side in one process, in rotating order within every repetition, each with the
garbage collector as users run it (the headline) and frozen (see ``timing.py``); the script reports the min and
median epoch time (seconds) of each and the ratios (targets: mlpug / raw <= 1.05; mlpug_eager / mlpug >= 2).

    .venv/bin/python benchmarks/overhead_tensorflow.py --repetitions 5
"""

import argparse
import contextlib
import io
import os
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from timing import clock, elapsed, interleaved, report  # noqa: E402

import mlpug.tensorflow as mlp  # noqa: E402
from mlpug.datasets.fashion_mnist import load_fashion_mnist  # noqa: E402

LOG_PERIOD = 200
LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def training_arrays():
    """The Fashion-MNIST training set as float32 images (N, 784) in [0, 1] and int64 labels (N,), in the fixed
    permutation of ``np.random.default_rng(0)`` that every TensorFlow benchmark trains in."""
    data = load_fashion_mnist()
    images = (data.train_images.astype(np.float32) / 255.0).reshape(-1, 784)
    labels = data.train_labels.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order], labels[order]


def make_batches(batch_size):
    images, labels = training_arrays()
    return [
        (tf.constant(images[i : i + batch_size]), tf.constant(labels[i : i + batch_size]))
        for i in range(0, len(labels), batch_size)
    ]


def make_model():
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(784,)),
            tf.keras.layers.Dense(256, activation="relu"),
            tf.keras.layers.Dense(256, activation="relu"),
            tf.keras.layers.Dense(10),
        ]
    )
    return model, tf.keras.optimizers.Adam(learning_rate=1e-3)


def raw_train_step(model, optimizer):
    """The hand-written reference step of the TensorFlow benchmarks: a ``tf.function(reduce_retracing=True)``
    GradientTape step, ``train_step(images, labels) -> loss`` (a scalar tensor)."""

    @tf.function(reduce_retracing=True)
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            loss = LOSS(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    return train_step


def run_raw(batches):
    model, optimizer = make_model()
    train_step = raw_train_step(model, optimizer)

    start = clock()
    running_loss, count = tf.zeros(()), 0
    for step, (images, labels) in enumerate(batches, start=1):
        running_loss += train_step(images, labels)
        count += 1
        if step % LOG_PERIOD == 0:
            print(f"batch {step}: mean loss {running_loss.numpy() / count:.3f}")
            running_loss, count = tf.zeros(()), 0
    return elapsed(start)


class TrainModel(tf.keras.Model):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        return LOSS(labels, self.classifier(images, training=not inference_mode))


def run_mlpug(batches, eager_mode=False):
    model, optimizer = make_model()
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model, eager_mode=eager_mode)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.LogProgress(log_period=LOG_PERIOD, set_names=["training"]),
    ]
    manager = mlp.trainers.TrainingManager(trainer, batches, num_epochs=1, callbacks=callbacks)
    trainer.set_training_model(TrainModel(model))
    start = clock()
    manager.start_training()
    return elapsed(start)


VARIANTS = {"raw": run_raw, "mlpug": run_mlpug, "mlpug_eager": lambda batches: run_mlpug(batches, eager_mode=True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    batches = make_batches(args.batch_size)
    mlp.logging.set_level("WARNING")
    with contextlib.redirect_stdout(io.StringIO()):
        for run in VARIANTS.values():
            run(batches[:50])  # warm-up
    times = interleaved(VARIANTS, batches, args.repetitions)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, tensorflow {tf.__version__}, "
        f"1 intra-op + 1 inter-op thread, {len(batches)} batches of {args.batch_size}, {args.repetitions} repetitions"
    )
    report(times, [("mlpug", "raw"), ("mlpug_eager", "mlpug")])


if __name__ == "__main__":
    main()
