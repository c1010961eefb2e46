"""Train an MLP classifier on Fashion-MNIST with mlpug and TensorFlow.

Reports the training loss and accuracy (batch and moving average) and the validation loss and accuracy
over the whole test set at every epoch end.

    python examples/fashion_mnist/tensorflow/train.py --num-epochs 1
    python examples/fashion_mnist/tensorflow/train.py --num-epochs 1 --mixed-precision bfloat16 --batch-chunk-size 16
    python examples/fashion_mnist/tensorflow/train.py --num-epochs 5 --lr-schedule cosine --clip-grad-norm 1.0 \\
        --early-stopping-patience 2 --tensorboard-dir runs        # then: tensorboard --logdir runs

Checkpoints go to ``--checkpoints-path`` (best model by validation loss, latest model, training checkpoint; see
mlpug.checkpointing for the file names). Stop with Ctrl-C or SIGTERM at any moment and continue exactly where
it stopped (also mid-epoch) with:

    python examples/fashion_mnist/tensorflow/train.py --num-epochs 3 --resume latest

Data-parallel on tf.distribute; the script is the same as for one device (the batch size is per process):

    python examples/fashion_mnist/tensorflow/train.py --distributed       # MirroredStrategy: all GPUs, or 2 CPU devices
    python examples/fashion_mnist/tensorflow/train.py --distributed 2     # MultiWorkerMirroredStrategy, 2 local workers
    TF_CONFIG='{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}' \
        python examples/fashion_mnist/tensorflow/train.py --distributed   # one worker of a cluster (on every host)
"""

import argparse
import contextlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import mlpug.tensorflow as mlp  # noqa: E402
from mlpug.datasets.fashion_mnist import load_fashion_mnist  # noqa: E402


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-epochs", type=int, default=3, help="number of epochs to train")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per training batch")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory with the Fashion-MNIST IDX files "
        "(default $MLPUG_FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist)",
    )
    parser.add_argument("--log-period", type=int, default=200, help="print progress every this many batches")
    parser.add_argument(
        "--progress", choices=["log", "bar"], default="log", help="progress as log blocks, or a tqdm bar per epoch"
    )
    parser.add_argument(
        "--async-eval",
        action="store_true",
        help="validate each epoch on a worker thread (1 intra-op thread) while the next epoch trains",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--tensorboard-dir", default=None, help="write every training and validation metric to TensorBoard here"
    )
    parser.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="learning rate schedule: constant, or cosine decay after a linear warm-up over the first 5%% of the steps",
    )
    parser.add_argument(
        "--early-stopping-patience",
        type=int,
        default=None,
        help="stop after this many epochs without a lower validation loss (default: train all epochs)",
    )
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradients to this global L2 norm")
    parser.add_argument("--eager", action="store_true", help="run the training step eagerly (default: tf.function)")
    parser.add_argument("--num-threads", type=int, default=None, help="TF intra-op CPU threads (default: TF's)")
    parser.add_argument(
        "--checkpoints-path", default="checkpoints", help="directory of the checkpoint files (default: checkpoints)"
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="PATH|latest",
        help="continue from a training checkpoint file, or from the latest one in --checkpoints-path (none yet: start)",
    )
    parser.add_argument(
        "--batch-chunk-size",
        type=int,
        default=None,
        help="gradient accumulation: process each batch in chunks of at most this many samples "
        "(also used to evaluate the validation batches); default: whole batches",
    )
    parser.add_argument(
        "--distributed",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="N",
        help="data-parallel training: with TF_CONFIG, a MultiWorkerMirroredStrategy over its cluster; else N local "
        "workers (MultiWorkerMirroredStrategy, started by mlp.distributed.launch), or without N a MirroredStrategy "
        "over the GPUs (2 logical CPU devices without GPUs)",
    )
    parser.add_argument(
        "--mixed-precision",
        nargs="?",
        const="bfloat16",
        default=None,
        choices=["bfloat16", "float16"],
        help="train with mixed precision: the Keras policy mixed_<dtype> (default when given without a value: "
        "bfloat16, which works on CPU; float16 adds loss scaling with a LossScaleOptimizer)",
    )
    return parser.parse_args(argv)


def create_datasets(data_dir, batch_size, seed):
    data = load_fashion_mnist(data_dir)

    def as_arrays(images, labels):
        return (images.astype("float32") / 255.0, labels.astype("int64"))

    # the shuffle depends only on (seed, epoch) and can start at any batch: resuming mid-epoch is exact
    training_dataset = mlp.data.ResumableArrayBatches(
        as_arrays(data.train_images, data.train_labels), batch_size, shuffle=True, seed=seed
    )
    validation_dataset = tf.data.Dataset.from_tensor_slices(as_arrays(data.test_images, data.test_labels)).batch(1024)
    return training_dataset, validation_dataset


class TrainModel(tf.keras.Model):
    """Turns a batch (images [B, 28, 28], labels [B]) into the loss, with the logits as auxiliary results."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_func = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        logits = self.classifier(images, training=not inference_mode)
        return {"loss": self.loss_func(labels, logits), "auxiliary_results": logits}


def create_strategy(args):
    """None (one device), or the tf.distribute strategy that ``--distributed`` asks for (before any tensor exists)."""
    if args.distributed is None:
        return None
    if os.environ.get("TF_CONFIG") or args.distributed:  # a cluster, or N local workers (N = 1: this process)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if tf.config.list_physical_devices("GPU"):
        return tf.distribute.MirroredStrategy()
    return mlp.distributed.mirrored_cpu_strategy(2)


def optional_callbacks(args, optimizer, trainer, training_dataset):
    """TensorBoard, the learning rate schedule and early stopping, as the flags ask."""
    callbacks = []
    if args.tensorboard_dir:
        callbacks += [
            mlp.callbacks.AutoTensorboard(name, log_dir=args.tensorboard_dir) for name in ("training", "validation")
        ]
    if args.lr_schedule == "cosine":  # Keras' own schedule: linear warm-up, then cosine decay, applied per batch
        steps = args.num_epochs * -(-len(training_dataset) // trainer.distributed_context().world_size)
        warm_up = max(steps // 20, 1)
        schedule = tf.keras.optimizers.schedules.CosineDecay(
            args.learning_rate / 10, decay_steps=max(steps - warm_up, 1), warmup_target=args.learning_rate,
            warmup_steps=warm_up,
        )  # fmt: skip
        callbacks.append(mlp.callbacks.LRSchedulerWrapper(schedule))
    if args.early_stopping_patience is not None:
        callbacks.append(mlp.callbacks.EarlyStopping("validation.dataset.loss", patience=args.early_stopping_patience))
    return callbacks


def main(argv=None):
    args = parse_arguments(argv)
    if args.distributed:  # N local workers, each running train() with its TF_CONFIG
        return mlp.distributed.launch(train, args, num_processes=args.distributed)
    return train(args)


def train(args):
    if args.num_threads:  # before TensorFlow initialises its devices
        tf.config.threading.set_intra_op_parallelism_threads(args.num_threads)
    strategy = create_strategy(args)
    mlp.set_random_seed(args.seed)  # Python, NumPy, TensorFlow and Keras

    try:
        training_dataset, validation_dataset = create_datasets(args.data_dir, args.batch_size, args.seed)
    except FileNotFoundError as error:
        sys.exit(f"ERROR: {error}")

    with strategy.scope() if strategy is not None else contextlib.nullcontext():  # variables mirrored over replicas
        classifier = tf.keras.Sequential(
            [
                tf.keras.Input(shape=(28, 28)),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(256, activation="relu"),
                tf.keras.layers.Dense(256, activation="relu"),
                tf.keras.layers.Dense(10),
            ]
        )
        optimizer = tf.keras.optimizers.Adam(learning_rate=args.learning_rate)
    trainer = mlp.trainers.DefaultTrainer(
        optimizers=optimizer,
        model_components=classifier,
        strategy=strategy,
        eager_mode=args.eager,
        batch_chunk_size=args.batch_chunk_size,
        use_mixed_precision=args.mixed_precision is not None,
        autocast_dtype=args.mixed_precision,
        clip_gradients_norm=args.clip_grad_norm,
    )

    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=trainer, batch_metric_funcs={"accuracy": mlp.metrics.accuracy}, batch_chunk_size=args.batch_chunk_size
    )
    history = mlp.callbacks.MetricsHistory()  # one row per epoch: printed, and saved as CSV and PNG at the end
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(
            validation_dataset,
            "validation",
            metric_evaluator=evaluator,
            run_async=args.async_eval,
            num_threads=1 if args.async_eval else None,
        ),
        mlp.callbacks.ProgressBar("FashionMNIST")
        if args.progress == "bar"
        else mlp.callbacks.LogProgress(log_period=args.log_period, set_names=["training", "validation"]),
        mlp.callbacks.CheckpointManager(
            checkpoints_path=args.checkpoints_path,
            base_checkpoint_filename="fashion-mnist-tensorflow",
            metric_to_monitor="validation.dataset.loss",
            model_hyper_parameters={"hidden_sizes": [256, 256], "learning_rate": args.learning_rate},
        ),
        history,
        *optional_callbacks(args, optimizer, trainer, training_dataset),
    ]
    try:
        manager = mlp.trainers.TrainingManager(
            trainer, training_dataset, num_epochs=args.num_epochs, callbacks=callbacks, resume_from=args.resume
        )
    except ValueError as error:
        sys.exit(f"ERROR: {error}")
    trainer.set_training_model(TrainModel(classifier))
    manager.start_training()

    validation = manager.logs["current"].get("validation", {}).get("dataset")
    if not manager.distributed.is_primary:
        return manager
    if validation is None:  # resumed from a checkpoint of a finished run: nothing left to train
        print(f"Nothing to train: the run already completed {manager.epoch} epoch(s)")
    else:
        print(history.table())
        csv_path, png_path = history.save(args.checkpoints_path, "fashion-mnist-tensorflow")
        print(f"Metrics history: {csv_path}, {png_path}")
        print(f"Final validation loss {validation['loss']:.4f}, accuracy {validation['accuracy']:.4f}")
    return manager


if __name__ == "__main__":
    main()
