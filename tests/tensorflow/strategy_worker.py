"""One process of the TensorFlow data-parallel tests (``tests/tensorflow/test_distributed.py``).

Run as a script by the tests (TensorFlow's devices are configured per process: two logical CPU devices for the
``MirroredStrategy``, ``TF_CONFIG`` for the workers of a ``MultiWorkerMirroredStrategy``). Only mlpug, numpy and
TensorFlow are imported: no test helpers.

    strategy_worker.py equivalence single|mirrored|multi_worker OUT_DIR [--variants NAME ...]
    strategy_worker.py mixed_loss mirrored|multi_worker OUT_DIR
    strategy_worker.py train OUT_DIR [--num-epochs E] [--resume] [--stop-at G --stop-how TERM|RAISE --stop-rank R]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import mlpug.tensorflow as mlp  # noqa: E402

NUM_FEATURES = 8
VALIDATION_SAMPLES = 10_001
BATCH_SIZE = 8  # per process: the global batch of the mirrored and single runs, per worker with two workers
NUM_BATCHES = 6


def make_data(num_samples: int, seed: int) -> tuple:
    generator = np.random.default_rng(seed)
    inputs = generator.standard_normal((num_samples, NUM_FEATURES)).astype(np.float32)
    targets = inputs @ np.linspace(-1.0, 1.0, NUM_FEATURES, dtype=np.float32)[:, None]
    return inputs, targets + 0.1 * generator.standard_normal((num_samples, 1)).astype(np.float32)


def make_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    return tf.keras.Sequential(
        [tf.keras.Input((NUM_FEATURES,)), tf.keras.layers.Dense(16, activation="tanh"), tf.keras.layers.Dense(1)]
    )


class TrainModel(tf.keras.Model):
    """The mean squared error: hand-written (``tf.reduce_mean``), or with ``loss_func`` (e.g. a Keras loss object,
    which Keras 3 scales by 1 / replicas in a replica context)."""

    def __init__(self, model: tf.keras.Model, loss_func=None):
        super().__init__()
        self.model = model
        self.loss_func = loss_func

    def call(self, batch_data, evaluate_settings=None, inference_mode=None):
        inputs, targets = batch_data
        predictions = self.model(inputs, training=not inference_mode)
        if self.loss_func is not None:
            return {"loss": self.loss_func(targets, predictions), "auxiliary_results": predictions}
        loss = tf.reduce_mean(tf.square(tf.cast(predictions, tf.float32) - tf.cast(targets, tf.float32)))
        return {"loss": loss, "auxiliary_results": predictions}


def mean_absolute_error(inputs):
    _, targets = inputs.batch
    return tf.reduce_mean(tf.abs(tf.cast(inputs.auxiliary_results, tf.float32) - tf.cast(targets, tf.float32)))


class Recorder(mlp.callbacks.Callback):
    """Reads the training batch loss and window average of every batch (as a consumer on every rank would)."""

    def __init__(self):
        super().__init__("Recorder")
        self.batch_losses, self.window_losses = [], []

    def on_batch_training_completed(self, training_batch, logs):
        training = logs["current"]["training"]
        self.batch_losses.append(float(training["batch"]["loss"]))
        window = training["window_average"]["loss"]  # None while the window holds skipped batches only
        self.window_losses.append(float("nan") if window is None else float(window))
        return True


EQUIVALENCE_VARIANTS = {
    # name: (data, DefaultTrainer options)
    "plain": ("resumable", {}),
    "tf_data": ("tf_data", {}),
    "accumulation": ("resumable", {"batch_chunk_size": 3}),
    "bf16": ("resumable", {"use_mixed_precision": True, "autocast_dtype": "bfloat16"}),
    "skip_non_finite": ("resumable", {}),  # one sample's target is NaN: its batch is skipped everywhere
    "uneven": ("resumable", {}),  # 101 samples: a last batch of 5, split 2 + 3 by a MirroredStrategy
    "clipping": ("resumable", {"batch_chunk_size": 3, "clip_gradients_norm": 0.05}),  # of the all-reduced gradients
    # 4 steps per call (calls of 4 and 2 batches), with accumulation: as "accumulation" with one step per call
    "steps_per_execution": ("resumable", {"batch_chunk_size": 3, "steps_per_execution": 4}),
    # the loss of tf.keras.losses.MeanSquaredError(), which Keras 3 scales by 1 / replicas in a replica context
    "keras_loss": ("resumable", {}),
    "keras_loss_sum_over_batch": ("tf_data", {"batch_chunk_size": 3}),  # the reduction named, with chunks
    # NaN targets in rows 0 and 8 (the probed shares of the first batch: replica 0's, and worker 0's and 1's) make
    # the first batch's loss NaN (skipped): the probe decides nothing, the second batch decides, the step is retraced
    "keras_loss_first_batch_nan": ("tf_data", {}),
    # trained and validated inside `with strategy.scope():`, where Keras scales the loss object too
    "keras_loss_in_scope": ("resumable", {}),
}
KERAS_LOSSES = {
    "keras_loss": lambda: tf.keras.losses.MeanSquaredError(),
    "keras_loss_sum_over_batch": lambda: tf.keras.losses.MeanSquaredError(reduction="sum_over_batch_size"),
    "keras_loss_first_batch_nan": lambda: tf.keras.losses.MeanSquaredError(),
    "keras_loss_in_scope": lambda: tf.keras.losses.MeanSquaredError(),
}
SKIPPING_VARIANTS = ("skip_non_finite", "keras_loss_first_batch_nan")  # trained with non_finite_loss="skip_step"
MIRRORED_ONLY = {"uneven"}  # several workers pad the last global batch (as on PyTorch): another step than one device's


def _strategy(kind: str):
    if kind == "mirrored":
        return mlp.distributed.mirrored_cpu_strategy(2)
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60)
        )
    return None


def run_equivalence(kind: str, strategy, variant: str) -> dict:
    """Train ``NUM_BATCHES`` global batches of 16 samples (shuffled by seed, or in order for ``tf_data``) with SGD
    and momentum, compiled; return the weights, the logged losses and the validation metrics over 10,001 samples."""
    data, options = EQUIVALENCE_VARIANTS[variant]
    workers = 2 if kind == "multi_worker" else 1
    batch_size = 16 // workers
    inputs, targets = make_data(16 * NUM_BATCHES + (5 if variant == "uneven" else 0), seed=1)
    if variant == "skip_non_finite":
        targets[7] = np.nan
    if variant == "keras_loss_first_batch_nan":
        targets[[0, 8]] = np.nan
    if data == "resumable":
        training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), batch_size, shuffle=True, seed=3)
    else:
        training_dataset = tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(batch_size)
    validation = mlp.data.ResumableArrayBatches(make_data(VALIDATION_SAMPLES, seed=2), 1000, shuffle=False)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = make_model()
        optimizer = tf.keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=strategy, **options)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer, batch_metric_funcs={"mae": mean_absolute_error})
    recorder = Recorder()
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.TestMetricsLogger(validation, "validation", evaluator),
        recorder,
    ]
    non_finite = {"non_finite_loss": "skip_step"} if variant in SKIPPING_VARIANTS else {}
    manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=1, callbacks=callbacks, **non_finite)
    loss_func = KERAS_LOSSES[variant]() if variant in KERAS_LOSSES else None
    trainer.set_training_model(TrainModel(model, loss_func))
    in_scope = variant == "keras_loss_in_scope" and strategy is not None
    with strategy.scope() if in_scope else contextlib.nullcontext():
        manager.start_training()
    dataset = manager.logs["current"]["validation"]["dataset"]
    return {
        "weights": [weight.tolist() for weight in model.get_weights()],
        "batch_losses": recorder.batch_losses,
        "window_losses": recorder.window_losses,
        "validation": {"loss": float(dataset["loss"]), "mae": float(dataset["mae"])},
        "num_batches_per_epoch": manager.num_batches_per_epoch,
    }


class StopAt(mlp.callbacks.Callback):
    """Ends this worker at global iteration ``at``: SIGTERM to itself, or an exception."""

    def __init__(self, at: int, how: str):
        super().__init__("StopAt")
        self.at, self.how = at, how

    def on_batch_training_completed(self, training_batch, logs):
        if logs["current"]["global_iter"] == self.at:
            if self.how == "RAISE":
                raise ValueError(f"worker {_rank()} fails on purpose at global iteration {self.at}")
            os.kill(os.getpid(), getattr(signal, f"SIG{self.how}"))
        return True

    def get_state(self):
        return {}


def run_training(out_dir: str, strategy, num_epochs: int, resume: bool, stop: tuple | None = None) -> None:
    """Two epochs of 12 batches of 4 samples per worker with epoch-level checkpoints in ``out_dir``, resumable
    from the latest training checkpoint; the final weights of every worker saved as JSON."""
    inputs, targets = make_data(4 * 12 * 2, seed=4)
    training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), 4, shuffle=True, seed=5)
    with strategy.scope():
        model = make_model()
        optimizer = tf.keras.optimizers.Adam(learning_rate=0.01)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=strategy)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.CheckpointManager(
            checkpoints_path=out_dir, metric_to_monitor="training.window_average.loss", write_in_background=False
        ),
    ]
    if stop is not None and _rank() == stop[2]:
        callbacks.append(StopAt(stop[0], stop[1]))
    else:
        callbacks.append(StopAt(-1, "RAISE"))  # the same callbacks in every checkpoint
    manager = mlp.trainers.TrainingManager(
        trainer, training_dataset, num_epochs=num_epochs, callbacks=callbacks, resume_from="latest" if resume else None
    )
    trainer.set_training_model(TrainModel(model))
    manager.start_training()
    with open(os.path.join(out_dir, f"final-rank{_rank()}.json"), "w") as file:
        json.dump({"weights": [w.tolist() for w in model.get_weights()], "global_iter": manager.global_iter}, file)


def slow_mean_absolute_error(inputs):
    """``mean_absolute_error``, 0.1 s slower per batch on worker 1's evaluation thread: the workers finish an
    asynchronous evaluation at different times (their landing must still be agreed)."""
    if _rank() == 1 and threading.current_thread() is not threading.main_thread():
        time.sleep(0.1)
    return mean_absolute_error(inputs)


def run_async_validation(kind: str, strategy) -> dict:
    """3 epochs of ``NUM_BATCHES`` batches, validated over 10,001 samples every epoch, synchronously and then
    asynchronously (``max_pending=2``, worker 1 slower); per mode the validation rows of ``MetricsHistory`` and the
    epochs whose results landed at each epoch end."""
    workers = 2 if kind == "multi_worker" else 1
    results = {}
    for run_async in (False, True):
        inputs, targets = make_data(16 * NUM_BATCHES, seed=1)
        training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), 16 // workers, shuffle=True, seed=3)
        validation = mlp.data.ResumableArrayBatches(make_data(VALIDATION_SAMPLES, seed=2), 1000, shuffle=False)
        scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with scope:
            model = make_model()
            optimizer = tf.keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
        trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=strategy)
        evaluator = mlp.evaluation.MetricEvaluator(
            trainer=trainer, batch_metric_funcs={"mae": slow_mean_absolute_error}
        )
        history, landed = mlp.callbacks.MetricsHistory(), []

        class Landed(mlp.callbacks.Callback):
            pending: list = []  # the epochs of the validation results published since the last epoch end

            def on_evaluation_result(self, result, logs):
                self.pending = [*self.pending, result.epoch]
                return True

            def on_epoch_completed(self, logs, landed=landed):
                landed.append(self.pending)
                self.pending = []
                return True

        logger = mlp.callbacks.TestMetricsLogger(
            validation, "validation", evaluator, run_async=run_async, max_pending=2
        )
        callbacks = [mlp.callbacks.TrainingMetricsLogger(evaluator), logger, history, Landed("Landed")]
        manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=3, callbacks=callbacks)
        trainer.set_training_model(TrainModel(model))
        manager.start_training()
        rows = [(row["validation.dataset.loss"], row["validation.dataset.mae"]) for row in history.rows]
        results["async" if run_async else "sync"] = {"rows": rows, "landed": landed}
    return results


class MixedLoss(tf.keras.Model):
    """A Keras loss object (scaled by 1 / replicas in a replica context) plus a hand-written mean (not scaled)."""

    def __init__(self, model: tf.keras.Model):
        super().__init__()
        self.model = model
        self.loss_func = tf.keras.losses.MeanSquaredError()

    def call(self, batch_data, evaluate_settings=None, inference_mode=None):
        inputs, targets = batch_data
        predictions = self.model(inputs, training=not inference_mode)
        return self.loss_func(targets, predictions) + tf.reduce_mean(tf.abs(predictions - targets))


def run_mixed_loss(kind: str, strategy) -> dict:
    """Train on a loss that mixes a Keras loss object and a hand-written mean: the error raised (on every worker)
    and how many optimizer steps ran."""
    workers = 2 if kind == "multi_worker" else 1
    inputs, targets = make_data(16 * NUM_BATCHES, seed=1)
    training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), 16 // workers, shuffle=True, seed=3)
    with strategy.scope():
        model = make_model()
        optimizer = tf.keras.optimizers.SGD(learning_rate=0.05)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=strategy)
    manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=1)
    trainer.set_training_model(MixedLoss(model))
    try:
        manager.start_training()
    except ValueError as error:
        return {"error": str(error), "iterations": int(optimizer.iterations.numpy())}
    return {"error": None, "iterations": int(optimizer.iterations.numpy())}


def _rank() -> int:
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    return int(config.get("task", {}).get("index", 0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["equivalence", "train", "mixed_loss"])
    parser.add_argument("kind", choices=["single", "mirrored", "multi_worker"])
    parser.add_argument("out_dir")
    parser.add_argument("--num-epochs", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--stop-how", choices=["TERM", "RAISE"], default="TERM")
    parser.add_argument("--stop-rank", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=None, help="equivalence: only these (default: all)")
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    strategy = _strategy(args.kind)
    if args.scenario == "equivalence":
        variants = [v for v in EQUIVALENCE_VARIANTS if args.kind != "multi_worker" or v not in MIRRORED_ONLY]
        variants = [v for v in variants if args.variants is None or v in args.variants]
        results = {variant: run_equivalence(args.kind, strategy, variant) for variant in variants}
        if args.variants is None or "async_validation" in args.variants:
            results["async_validation"] = run_async_validation(args.kind, strategy)
        with open(os.path.join(args.out_dir, f"{args.kind}-rank{_rank()}.json"), "w") as file:
            json.dump(results, file)
    elif args.scenario == "mixed_loss":
        with open(os.path.join(args.out_dir, f"mixed-{args.kind}-rank{_rank()}.json"), "w") as file:
            json.dump(run_mixed_loss(args.kind, strategy), file)
    else:
        stop = None if args.stop_at is None else (args.stop_at, args.stop_how, args.stop_rank)
        run_training(args.out_dir, strategy, args.num_epochs, args.resume, stop)


if __name__ == "__main__":
    sys.exit(main())
