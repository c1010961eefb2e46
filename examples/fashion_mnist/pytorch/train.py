"""Train an MLP classifier on Fashion-MNIST with mlpug and PyTorch.

Reports the training loss and accuracy (batch and moving average) and the validation loss and accuracy
over the whole test set at every epoch end.

    python examples/fashion_mnist/pytorch/train.py --num-epochs 1
    python examples/fashion_mnist/pytorch/train.py --num-epochs 1 --mixed-precision bfloat16 --batch-chunk-size 16
    python examples/fashion_mnist/pytorch/train.py --num-epochs 5 --lr-schedule cosine --clip-grad-norm 1.0 \\
        --early-stopping-patience 2 --tensorboard-dir runs        # then: tensorboard --logdir runs
    python examples/fashion_mnist/pytorch/train.py --num-epochs 1 --compile-step   # torch.compile of the step

The fast defaults (docs/guide/performance.md): batches sliced from in-memory tensors (mlp.data.ResumableArrayBatches,
no per-sample collation) and Adam's fused implementation (fused=True: one kernel per step).

Checkpoints go to ``--checkpoints-path`` (best model by validation loss, latest model, training checkpoint; see
mlpug.checkpointing for the file names). Stop with Ctrl-C or SIGTERM at any moment and continue exactly where
it stopped (also mid-epoch) with:

    python examples/fashion_mnist/pytorch/train.py --num-epochs 3 --resume latest

Data-parallel on 2 processes (CPU: gloo; GPUs: NCCL, one GPU per process), either with torchrun or with mlpug's
launcher; the script is the same as for one process (batch size per process, global batch 2 x 64):

    torchrun --nproc_per_node 2 examples/fashion_mnist/pytorch/train.py --distributed
    python examples/fashion_mnist/pytorch/train.py --distributed 2

Sharded (FSDP2: every rank holds a shard of the weights, gradients and Adam state; sharded training checkpoints):

    torchrun --nproc_per_node 2 examples/fashion_mnist/pytorch/train.py --distributed --strategy fsdp
    python examples/fashion_mnist/pytorch/train.py --distributed 2 --strategy fsdp
"""

import argparse
import sys

import torch

import mlpug.pytorch as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist


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
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--compile-step",
        action="store_true",
        help="compile the training step and the evaluation forward with torch.compile (the first steps compile)",
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
        choices=["bfloat16", "float16"],
        help="train with mixed precision: torch.autocast with this dtype (default when given without a value: "
        "bfloat16, which works on CPU; float16 adds loss scaling with a GradScaler)",
    )
    parser.add_argument(
        "--distributed",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="N",
        help="data-parallel training: under torchrun, on its processes; else on N local processes started by "
        "mlp.distributed.launch (default N: one per GPU, one without GPUs)",
    )
    parser.add_argument(
        "--strategy",
        choices=["ddp", "fsdp"],
        default=None,
        help="with --distributed: DDP (default) or FSDP2 (each Linear layer a unit of its own, sharded checkpoints)",
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

    def as_tensors(images, labels):
        return torch.from_numpy(images).float().div_(255.0), torch.from_numpy(labels).long()

    # Batches sliced from in-memory tensors (faster than a DataLoader's per-sample collation: about 20 % of an
    # epoch here, the same batches as mlp.data.resumable_data_loader over a TensorDataset). The shuffle depends
    # only on (seed, epoch) and can start at any batch: resuming mid-epoch is exact. Validation: in order.
    training_dataset = mlp.data.ResumableArrayBatches(
        as_tensors(data.train_images, data.train_labels), batch_size, shuffle=True, seed=seed
    )
    validation_dataset = mlp.data.ResumableArrayBatches(
        as_tensors(data.test_images, data.test_labels), 1024, shuffle=False
    )
    return training_dataset, validation_dataset


class TrainModel(torch.nn.Module):
    """Turns a batch (images [B, 28, 28], labels [B]) into the loss, with the logits as auxiliary results."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_func = torch.nn.CrossEntropyLoss()

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        logits = self.classifier(images)
        return {"loss": self.loss_func(logits, labels), "auxiliary_results": logits}


def optional_callbacks(args, optimizer, trainer, training_dataset):
    """TensorBoard, the learning rate schedule and early stopping, as the flags ask."""
    callbacks = []
    if args.tensorboard_dir:
        callbacks += [
            mlp.callbacks.AutoTensorboard(name, log_dir=args.tensorboard_dir) for name in ("training", "validation")
        ]
    if args.lr_schedule == "cosine":  # torch's own schedulers: linear warm-up, then cosine decay, stepped per batch
        steps = args.num_epochs * -(-len(training_dataset) // trainer.distributed_context().world_size)
        warm_up = max(steps // 20, 1)
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warm_up),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps - warm_up, 1)),
            ],
            milestones=[warm_up],
        )
        callbacks.append(mlp.callbacks.LRSchedulerWrapper(schedule))
    if args.early_stopping_patience is not None:
        callbacks.append(mlp.callbacks.EarlyStopping("validation.dataset.loss", patience=args.early_stopping_patience))
    return callbacks


def main(argv=None):
    args = parse_arguments(argv)
    if args.distributed is not None:
        return mlp.distributed.launch(train, args, num_processes=args.distributed or None)
    return train(args)


def train(args):
    mlp.set_random_seed(args.seed)  # Python, NumPy and torch
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    try:
        training_dataset, validation_dataset = create_datasets(args.data_dir, args.batch_size, args.seed)
    except FileNotFoundError as error:
        sys.exit(f"ERROR: {error}")

    classifier = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    # fused=True: Adam's fused implementation, the same algorithm in one kernel per step (float rounding differs)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.learning_rate, fused=True)
    strategy = args.strategy
    if strategy == "fsdp":  # the size policy would make this small model one unit: shard every Linear layer
        strategy = mlp.strategies.FSDPStrategy(shard_modules=[torch.nn.Linear])
    trainer = mlp.trainers.DefaultTrainer(
        optimizers=optimizer,
        model_components=classifier,
        batch_chunk_size=args.batch_chunk_size,
        use_mixed_precision=args.mixed_precision is not None,
        autocast_dtype=args.mixed_precision,
        clip_gradients_norm=args.clip_grad_norm,
        compile_step=args.compile_step,
        strategy=strategy,
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
            base_checkpoint_filename="fashion-mnist-pytorch",
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
        csv_path, png_path = history.save(args.checkpoints_path, "fashion-mnist-pytorch")
        print(f"Metrics history: {csv_path}, {png_path}")
        print(f"Final validation loss {validation['loss']:.4f}, accuracy {validation['accuracy']:.4f}")
    return manager


if __name__ == "__main__":
    main()
