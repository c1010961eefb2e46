"""Train an MLP classifier on Fashion-MNIST with mlpug and JAX (Flax NNX, optax).

Reports the training loss and accuracy (batch and moving average) and the validation loss and accuracy
over the whole test set at every epoch end.

    python examples/fashion_mnist/jax/train.py --num-epochs 1
    python examples/fashion_mnist/jax/train.py --num-epochs 1 --mixed-precision bfloat16 --batch-chunk-size 16
    python examples/fashion_mnist/jax/train.py --num-epochs 5 --lr-schedule cosine --clip-grad-norm 1.0 \\
        --early-stopping-patience 2 --tensorboard-dir runs        # then: tensorboard --logdir runs
    python examples/fashion_mnist/jax/train.py --num-epochs 2 --steps-per-execution 32 --async-eval

The training step is one ``jax.jit`` compiled function that donates the buffers of the weights and the optimizer
state; ``--steps-per-execution K`` trains up to K batches in one compiled call (``lax.scan`` over the stacked
batches; every batch callback still sees every batch's loss). ``--async-eval`` validates each epoch on a worker
thread, on a copy of the weights, while the next epoch trains.

Checkpoints go to ``--checkpoints-path`` (best model by validation loss, latest model, training checkpoint; see
mlpug.checkpointing for the file names). Stop with Ctrl-C or SIGTERM at any moment and continue exactly where
it stopped (also mid-epoch) with:

    python examples/fashion_mnist/jax/train.py --num-epochs 3 --resume latest

Data parallel (``DefaultTrainer(strategy="data_parallel")``): every global batch is sharded over a
``jax.sharding.Mesh`` of the devices, the weights replicated. Over the devices of this process (on a CPU-only
machine, XLA can make several host devices), ``--batch-size`` is the global batch, split over the devices; over N
local processes joined into one JAX run by mlpug's launcher (``jax.distributed.initialize``; the script is the
same), it is the batch of each process, as on the other backends (global batch N x 64):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/fashion_mnist/jax/train.py --distributed
    python examples/fashion_mnist/jax/train.py --distributed 2
"""

import argparse
import sys

import jax
import numpy as np
import optax
from flax import nnx

import mlpug.jax as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

HIDDEN_SIZES = (256, 256)


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
        help="validate each epoch on a worker thread, on a copy of the weights, while the next epoch trains",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (data order and the weights' nnx.Rngs)")
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
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        default=1,
        metavar="K",
        help="train up to K batches in one compiled call (lax.scan over the stacked batches; default 1)",
    )
    parser.add_argument(
        "--batch-chunk-size",
        type=int,
        default=None,
        help="gradient accumulation: process each batch in chunks of at most this many samples "
        "(also used to evaluate the validation batches); default: whole batches",
    )
    parser.add_argument(
        "--mixed-precision",
        nargs="?",
        const="bfloat16",
        default=None,
        choices=["bfloat16"],
        help="train with mixed precision: the forward pass in bfloat16, the weights, gradients and Adam state in "
        "float32 (bfloat16 needs no loss scaling; float16 is not offered on JAX)",
    )
    parser.add_argument(
        "--distributed",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="N",
        help='data parallel (strategy="data_parallel": each global batch sharded over a jax.sharding.Mesh, the '
        "weights replicated): without N over the devices of this process (see XLA_FLAGS above for a CPU-only "
        "machine); with N over N local processes joined by mlp.distributed.launch (jax.distributed)",
    )
    parser.add_argument(
        "--checkpoints-path", default="checkpoints", help="directory of the checkpoint files (default: checkpoints)"
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="PATH|latest",
        help="continue from a training checkpoint file, or from the latest one in --checkpoints-path (none yet: start)",
    )
    return parser.parse_args(argv)


def create_datasets(data_dir, batch_size, seed=0):
    data = load_fashion_mnist(data_dir)

    def as_arrays(images, labels):
        return images.astype(np.float32) / 255.0, labels.astype(np.int32)

    # NumPy batches sliced from in-memory arrays (the compiled step moves them to the device). The shuffle depends
    # only on (seed, epoch) and can start at any batch: resuming mid-epoch is exact. Validation: in order.
    training_dataset = mlp.data.ResumableArrayBatches(
        as_arrays(data.train_images, data.train_labels), batch_size, shuffle=True, seed=seed
    )
    validation_dataset = mlp.data.ResumableArrayBatches(
        as_arrays(data.test_images, data.test_labels), 1024, shuffle=False
    )
    return training_dataset, validation_dataset


class Classifier(nnx.Module):
    """MLP 784-256-256-10: images float32 [B, 28, 28] to logits float32 [B, 10]."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden_1 = nnx.Linear(28 * 28, HIDDEN_SIZES[0], rngs=rngs)
        self.hidden_2 = nnx.Linear(HIDDEN_SIZES[0], HIDDEN_SIZES[1], rngs=rngs)
        self.output = nnx.Linear(HIDDEN_SIZES[1], 10, rngs=rngs)

    def __call__(self, images):
        features = images.reshape((images.shape[0], -1))
        features = nnx.relu(self.hidden_1(features))
        features = nnx.relu(self.hidden_2(features))
        return self.output(features)


class TrainModel(nnx.Module):
    """Turns a batch (images [B, 28, 28], labels [B]) into the loss, with the logits as auxiliary results."""

    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        logits = self.classifier(images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return {"loss": loss, "auxiliary_results": logits}


def create_optimizer(args, num_batches_per_epoch):
    """optax Adam, its learning rate injected (logged, read and set by mlpug's callbacks); with ``--lr-schedule
    cosine`` the learning rate is optax's schedule, computed in the compiled step from the optimizer's step count
    (saved in the training checkpoint, so a resumed run continues the schedule)."""
    learning_rate = args.learning_rate
    if args.lr_schedule == "cosine":  # linear warm-up from lr / 10 over 5 % of the steps, then cosine decay to 0
        steps = args.num_epochs * -(-num_batches_per_epoch // jax.process_count())  # N processes: 1/N of the steps
        learning_rate = optax.warmup_cosine_decay_schedule(
            init_value=args.learning_rate / 10,
            peak_value=args.learning_rate,
            warmup_steps=max(steps // 20, 1),
            decay_steps=max(steps, 2),
        )
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def optional_callbacks(args):
    """TensorBoard and early stopping, as the flags ask (the learning rate schedule is part of the optimizer)."""
    callbacks = []
    if args.tensorboard_dir:
        callbacks += [
            mlp.callbacks.AutoTensorboard(name, log_dir=args.tensorboard_dir) for name in ("training", "validation")
        ]
    if args.early_stopping_patience is not None:
        callbacks.append(mlp.callbacks.EarlyStopping("validation.dataset.loss", patience=args.early_stopping_patience))
    return callbacks


def main(argv=None):
    args = parse_arguments(argv)
    if args.distributed and args.distributed > 1 and args.async_eval:
        # each evaluation batch is a program over every process's devices: on a worker thread it could hang
        print(
            "WARNING: --async-eval is not supported over several JAX processes; validating synchronously",
            file=sys.stderr,
        )
        args.async_eval = False
    if args.distributed:  # N local processes joined into one JAX run, each running train()
        return mlp.distributed.launch(train, args, num_processes=args.distributed)
    return train(args)


def train(args):
    mlp.set_random_seed(args.seed)  # Python and NumPy; the weights come from nnx.Rngs(args.seed)

    try:
        training_dataset, validation_dataset = create_datasets(args.data_dir, args.batch_size, args.seed)
    except FileNotFoundError as error:
        sys.exit(f"ERROR: {error}")

    classifier = Classifier(rngs=nnx.Rngs(args.seed))
    trainer = mlp.trainers.DefaultTrainer(
        optimizers=create_optimizer(args, len(training_dataset)),
        model_components=classifier,
        batch_chunk_size=args.batch_chunk_size,
        use_mixed_precision=args.mixed_precision is not None,
        autocast_dtype=args.mixed_precision,
        clip_gradients_norm=args.clip_grad_norm,
        steps_per_execution=args.steps_per_execution,
        strategy=None if args.distributed is None else "data_parallel",
    )

    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=trainer, batch_metric_funcs={"accuracy": mlp.metrics.accuracy}, batch_chunk_size=args.batch_chunk_size
    )
    history = mlp.callbacks.MetricsHistory()  # one row per epoch: printed, and saved as CSV and PNG at the end
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(
            validation_dataset, "validation", metric_evaluator=evaluator, run_async=args.async_eval
        ),
        mlp.callbacks.ProgressBar("FashionMNIST")
        if args.progress == "bar"
        else mlp.callbacks.LogProgress(log_period=args.log_period, set_names=["training", "validation"]),
        mlp.callbacks.CheckpointManager(
            checkpoints_path=args.checkpoints_path,
            base_checkpoint_filename="fashion-mnist-jax",
            metric_to_monitor="validation.dataset.loss",
            model_hyper_parameters={"hidden_sizes": list(HIDDEN_SIZES), "learning_rate": args.learning_rate},
        ),
        history,
        *optional_callbacks(args),
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
        csv_path, png_path = history.save(args.checkpoints_path, "fashion-mnist-jax")
        print(f"Metrics history: {csv_path}, {png_path}")
        print(f"Final validation loss {validation['loss']:.4f}, accuracy {validation['accuracy']:.4f}")
    return manager


if __name__ == "__main__":
    main()
