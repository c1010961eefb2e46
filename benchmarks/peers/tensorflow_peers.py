"""Process (c) of the peer benchmark: mlpug's TensorFlow backend and Keras 3 ``model.fit`` (TensorFlow backend,
``tf.keras``) against a raw ``tf.function`` loop over the same Keras model, in one process.

Job and rounds: see ``common.py``; 1 intra-op and 1 inter-op thread. Model and optimizer:
``overhead_tensorflow.make_model`` (``tf.keras.Sequential`` MLP, ``set_random_seed(0)``, Keras ``Adam(1e-3)``), so
all three start from the same weights. Data pipeline, the same for all three: the training set in a fixed
permutation (``np.random.default_rng(0)``, as ``overhead_tensorflow.make_batches``) as one
``tf.data.Dataset.from_tensor_slices(...).batch(64)`` (938 batches; no parallel stages, so it runs in the one
inter-op thread; measured: a private tf.data thread pool of 1 thread was no faster).

* raw (floor): the ``tf.function(reduce_retracing=True)`` GradientTape step of ``overhead_tensorflow.run_raw``,
  iterated in Python over the dataset, the loss summed as a tensor and its mean printed every 200 batches; unlike
  there, the optimizer's variables are built before the first call (``optimizer.build``, as mlpug's
  ``DefaultTrainer`` and Keras' ``fit`` do), else ``tf.function`` traces the step twice (measured: 2 traces,
  ~0.3 s more per run).
* mlpug lean: ``DefaultTrainer`` (compiled) + ``TrainingManager``, no callbacks; default: the standard callbacks
  (``TrainingMetricsLogger`` + ``LogProgress(log_period=200)``), as ``overhead_tensorflow.py``.
* Keras lean: ``model.compile(optimizer, loss)`` then ``model.fit(dataset, epochs=1, verbose=0)``; default: the
  same with the default ``verbose="auto"`` (the progress bar). ``jit_compile="auto"`` resolves to no XLA on a
  CPU-only machine; ``steps_per_execution=1`` (the default).
* K=32: several steps per compiled call, mlpug ``DefaultTrainer(steps_per_execution=32)`` with the standard
  callbacks (every batch hook still runs for every batch) and Keras ``model.compile(steps_per_execution=32)`` with
  its default progress bar (Keras calls its batch callbacks once per 32 steps).

Timed: the call that trains (first trace included for every variant, as in ``overhead_tensorflow.py``).

    .venv-peers/bin/python benchmarks/peers/tensorflow_peers.py --rounds 8 --out /tmp/tensorflow_peers.json
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import BATCH_SIZE, LOG_PERIOD, Run, Variant  # noqa: E402
from overhead_tensorflow import LOSS, TrainModel, make_model, raw_train_step  # noqa: E402

import mlpug.tensorflow as mlp  # noqa: E402
from mlpug.datasets.fashion_mnist import load_fashion_mnist  # noqa: E402


class TFData:
    def __init__(self, max_batches=None):
        data = load_fashion_mnist()
        images = (data.train_images.astype(np.float32) / 255.0).reshape(-1, 784)
        labels = data.train_labels.astype(np.int64)
        order = np.random.default_rng(0).permutation(len(labels))
        if max_batches is not None:
            order = order[: max_batches * BATCH_SIZE]
        self.train_images, self.train_labels = images[order], labels[order]
        self.test_images = (data.test_images.astype(np.float32) / 255.0).reshape(-1, 784)
        self.test_labels = data.test_labels.astype(np.int64)
        self.num_batches = -(-len(self.train_labels) // BATCH_SIZE)

    def dataset(self):
        return tf.data.Dataset.from_tensor_slices((self.train_images, self.train_labels)).batch(BATCH_SIZE)

    def evaluate(self, model):
        loss = float(LOSS(self.train_labels, model(self.train_images, training=False)))
        predictions = np.argmax(model(self.test_images, training=False).numpy(), axis=1)
        return loss, float(np.mean(predictions == self.test_labels))


def raw_floor(data):
    def setup():
        model, optimizer = make_model()
        optimizer.build(model.trainable_variables)  # as mlpug's DefaultTrainer: no variables created in the trace
        dataset = data.dataset()
        train_step = raw_train_step(model, optimizer)

        def train():
            running_loss, count = tf.zeros(()), 0
            for step, (images, labels) in enumerate(dataset, start=1):
                running_loss += train_step(images, labels)
                count += 1
                if step % LOG_PERIOD == 0:
                    print(f"batch {step}: mean loss {running_loss.numpy() / count:.3f}")
                    running_loss, count = tf.zeros(()), 0

        return Run(train, lambda: data.evaluate(model))

    return Variant(
        "raw tf.function",
        "floor",
        "tf.function GradientTape step, mean loss printed every 200 batches (one .numpy() each)",
        setup,
    )


def mlpug_variants(data):
    def make(standard_callbacks, steps_per_execution=1):
        def setup():
            model, optimizer = make_model()
            trainer = mlp.trainers.DefaultTrainer(
                optimizers=optimizer, model_components=model, steps_per_execution=steps_per_execution
            )
            evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
            callbacks = []
            if standard_callbacks:
                callbacks = [
                    mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
                    mlp.callbacks.LogProgress(log_period=LOG_PERIOD, set_names=["training"]),
                ]
            manager = mlp.trainers.TrainingManager(trainer, data.dataset(), num_epochs=1, callbacks=callbacks)
            trainer.set_training_model(TrainModel(model))
            return Run(manager.start_training, lambda: data.evaluate(model))

        return setup

    return [
        Variant("mlpug (TF)", "lean", "DefaultTrainer (compiled) + TrainingManager, no callbacks", make(False)),
        Variant(
            "mlpug (TF)",
            "default",
            "standard callbacks: TrainingMetricsLogger + LogProgress(log_period=200)",
            make(True),
        ),
        Variant(
            "mlpug (TF)",
            "default, K=32",
            "standard callbacks, DefaultTrainer(steps_per_execution=32)",
            make(True, steps_per_execution=32),
        ),
    ]


def keras_variants(data):
    def make(fit_kwargs, steps_per_execution=1):
        def setup():
            model, optimizer = make_model()
            model.compile(optimizer=optimizer, loss=LOSS, steps_per_execution=steps_per_execution)
            dataset = data.dataset()
            return Run(lambda: model.fit(dataset, epochs=1, **fit_kwargs), lambda: data.evaluate(model))

        return setup

    return [
        Variant("Keras (TF)", "lean", "model.fit(verbose=0)", make({"verbose": 0})),
        Variant("Keras (TF)", "default", 'model.fit() (verbose="auto": progress bar)', make({})),
        Variant(
            "Keras (TF)",
            "default, K=32",
            'model.compile(steps_per_execution=32); model.fit() (verbose="auto")',
            make({}, steps_per_execution=32),
        ),
    ]


def main():
    args = common.parse_args(__doc__)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    mlp.logging.set_level("WARNING")
    data = TFData(args.max_batches)
    floor = raw_floor(data)
    variants = [floor] + common.select(mlpug_variants(data) + keras_variants(data), args.only)
    common.progress(
        f"process (c) TensorFlow: {len(variants)} variants, {data.num_batches} batches, 1 + {args.rounds} rounds"
    )
    common.run_rounds(variants, args.rounds)
    common.write_results(
        args,
        "TensorFlow",
        floor,
        variants,
        {
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "keras_backend": tf.keras.backend.backend(),
            "num_batches": data.num_batches,
        },
    )


if __name__ == "__main__":
    main()
