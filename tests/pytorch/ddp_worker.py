"""One rank of the data-parallel tests (``tests/pytorch/test_distributed.py``); also the single-process reference.

Run as a script by ``torchrun``, by the tests with a ``torchrun``-like environment, or imported (the single-process
reference runs the same functions in the test process). Only mlpug and torch are imported: no test helpers.

    ddp_worker.py equivalence OUT_DIR
    ddp_worker.py train OUT_DIR [--num-epochs E] [--resume] [--stop-at G --stop-how TERM|KILL|RAISE --stop-rank R]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import torch

import mlpug.pytorch as mlp

NUM_FEATURES = 8
VALIDATION_SAMPLES = 10_001


def make_data(num_samples: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, NUM_FEATURES, generator=generator)
    targets = inputs @ torch.linspace(-1.0, 1.0, NUM_FEATURES).unsqueeze(1) + 0.1 * torch.randn(
        num_samples, 1, generator=generator
    )
    return inputs, targets


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(NUM_FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


class TrainModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, evaluate_settings, inference_mode=None):
        inputs, targets = batch
        predictions = self.model(inputs)
        return {"loss": torch.nn.functional.mse_loss(predictions, targets), "auxiliary_results": predictions}


def mean_absolute_error(inputs):
    _, targets = inputs.batch
    return (inputs.auxiliary_results.float() - targets).abs().mean()


class Recorder(mlp.callbacks.Callback):
    """Reads the training batch loss and window average of every batch (as a consumer on every rank would)."""

    def __init__(self):
        super().__init__("Recorder")
        self.batch_losses, self.window_losses = [], []

    def on_batch_training_completed(self, training_batch, logs):
        training = logs["current"]["training"]
        self.batch_losses.append(training["batch"]["loss"])
        self.window_losses.append(training["window_average"]["loss"])
        return True


EQUIVALENCE_VARIANTS = {
    # name: (data, DefaultTrainer options)
    "plain": ("resumable", {}),
    "data_loader": ("data_loader", {}),
    "accumulation": ("resumable", {"batch_chunk_size": 3}),
    "bf16": ("resumable", {"use_mixed_precision": True, "autocast_dtype": "bfloat16"}),
    # clipped after the all-reduce of the accumulated gradients (per rank before it, the step would differ)
    "clipping": ("resumable", {"batch_chunk_size": 3, "clip_gradients_norm": 0.05}),
    # torch.compile of the DDP model's forward (aot_eager: Dynamo's DDP graph split, no code generation), chunked
    "compiled": ("resumable", {"batch_chunk_size": 3, "compile_step": {"backend": "aot_eager"}}),
}


def run_equivalence(variant: str, batch_size: int) -> dict:
    """Train 6 batches of ``batch_size`` samples per rank (96 samples over the ranks, shuffled by seed, or in order
    for ``data_loader``); return the weights, the logged losses and the validation metrics over 10,001 samples."""
    data, options = EQUIVALENCE_VARIANTS[variant]
    inputs, targets = make_data(batch_size * 6 * _world_size(), seed=1)
    if data == "resumable":
        training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), batch_size, shuffle=True, seed=3)
    else:
        training_dataset = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(inputs, targets), batch_size=batch_size, shuffle=False
        )
    validation = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*make_data(VALIDATION_SAMPLES, seed=2)), batch_size=1000
    )
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, **options)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer, batch_metric_funcs={"mae": mean_absolute_error})
    recorder = Recorder()
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.TestMetricsLogger(validation, "validation", evaluator),
        recorder,
    ]
    manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=1, callbacks=callbacks)
    trainer.set_training_model(TrainModel(model))
    all_reduces = []
    if _world_size() > 1:  # count DDP's gradient all-reduces (of its one bucket: the model is small)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            all_reduces.append(bucket.index())
            return allreduce_hook(None, bucket)

        trainer.training_model.register_comm_hook(None, counting_hook)
    manager.start_training()
    dataset = manager.logs["current"]["validation"]["dataset"]
    return {
        "weights": {name: value.detach().clone() for name, value in model.state_dict().items()},
        "batch_losses": recorder.batch_losses,
        "window_losses": recorder.window_losses,
        "validation": {"loss": dataset["loss"], "mae": dataset["mae"]},
        "num_batches_per_epoch": manager.num_batches_per_epoch,
        "gradient_all_reduces": len(all_reduces),
    }


def slow_mean_absolute_error(inputs):
    """``mean_absolute_error``, 0.1 s slower per batch on rank 1's evaluation thread: the ranks finish an
    asynchronous evaluation at different times (their landing must still be agreed)."""
    if os.environ.get("RANK") == "1" and threading.current_thread() is not threading.main_thread():
        time.sleep(0.1)
    return mean_absolute_error(inputs)


def run_async_validation(batch_size: int) -> dict:
    """3 epochs of 6 batches, validated over 10,001 samples every epoch, synchronously and then asynchronously
    (``max_pending=2``, rank 1 slower); per mode the validation rows of ``MetricsHistory`` and, asynchronously,
    the epochs whose results landed at each epoch end."""
    results = {}
    for run_async in (False, True):
        inputs, targets = make_data(batch_size * 6 * _world_size(), seed=1)
        training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), batch_size, shuffle=True, seed=3)
        validation = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(*make_data(VALIDATION_SAMPLES, seed=2)), batch_size=1000
        )
        model = make_model()
        trainer = mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
        evaluator = mlp.evaluation.MetricEvaluator(
            trainer=trainer, batch_metric_funcs={"mae": slow_mean_absolute_error}
        )
        history, landed = mlp.callbacks.MetricsHistory(), []

        class Landed(mlp.callbacks.Callback):
            def on_epoch_completed(self, logs, landed=landed):
                landed.append([r.epoch for r in mlp.callbacks.landed_results(self.training_manager, "validation")])
                return True

        logger = mlp.callbacks.TestMetricsLogger(
            validation,
            "validation",
            evaluator,
            run_async=run_async,
            max_pending=2,
        )
        callbacks = [mlp.callbacks.TrainingMetricsLogger(evaluator), logger, history, Landed("Landed")]
        manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=3, callbacks=callbacks)
        trainer.set_training_model(TrainModel(model))
        manager.start_training()
        rows = [(row["validation.dataset.loss"], row["validation.dataset.mae"]) for row in history.rows]
        results["async" if run_async else "sync"] = {"rows": rows, "landed": landed}
    return results


class StopAt(mlp.callbacks.Callback):
    """Ends this rank at global iteration ``at``: SIGTERM or SIGKILL to itself, or an exception."""

    def __init__(self, at: int, how: str):
        super().__init__("StopAt")
        self.at, self.how = at, how

    def on_batch_training_completed(self, training_batch, logs):
        if logs["current"]["global_iter"] == self.at:
            if self.how == "RAISE":
                raise ValueError(f"rank {os.environ['RANK']} fails on purpose at global iteration {self.at}")
            os.kill(os.getpid(), getattr(signal, f"SIG{self.how}"))
        return True

    def get_state(self):
        return {}


def run_training(
    out_dir: str, num_epochs: int, resume: bool, stop: tuple | None = None, seed_by_rank: bool = False
) -> torch.nn.Module:
    """Two epochs of 12 batches of 4 samples per rank with checkpoints in ``out_dir`` (epoch level, or every batch
    for the SIGKILL restart), resumable from the latest training checkpoint."""
    torch.set_num_threads(1)
    inputs, targets = make_data(4 * 12 * _world_size(), seed=4)
    training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), 4, shuffle=True, seed=5)
    model = make_model()
    if seed_by_rank:
        torch.manual_seed(int(os.environ.get("RANK", "0")))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.CheckpointManager(
            checkpoints_path=out_dir,
            metric_to_monitor="training.window_average.loss",
            batch_level=stop is not None and stop[1] == "KILL",
            write_in_background=False,
        ),
    ]
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if stop is not None and int(os.environ["RANK"]) == stop[2] and not restarted:
        callbacks.append(StopAt(stop[0], stop[1]))
    else:
        callbacks.append(StopAt(-1, "RAISE"))  # the same callbacks in every checkpoint
    manager = mlp.trainers.TrainingManager(
        trainer, training_dataset, num_epochs=num_epochs, callbacks=callbacks, resume_from="latest" if resume else None
    )
    trainer.set_training_model(TrainModel(model))
    manager.start_training()
    torch.save(model.state_dict(), os.path.join(out_dir, f"final-rank{os.environ.get('RANK', '0')}.pt"))
    return model


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["equivalence", "train"])
    parser.add_argument("out_dir")
    parser.add_argument("--num-epochs", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--stop-how", choices=["TERM", "KILL", "RAISE"], default="TERM")
    parser.add_argument("--stop-rank", type=int, default=1)
    parser.add_argument("--seed-by-rank", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rank = os.environ.get("RANK", "0")
    if args.scenario == "equivalence":
        for variant in EQUIVALENCE_VARIANTS:
            torch.save(run_equivalence(variant, batch_size=8), os.path.join(args.out_dir, f"{variant}-rank{rank}.pt"))
        torch.save(run_async_validation(batch_size=8), os.path.join(args.out_dir, f"async-rank{rank}.pt"))
    else:
        stop = None if args.stop_at is None else (args.stop_at, args.stop_how, args.stop_rank)
        run_training(args.out_dir, args.num_epochs, args.resume, stop, args.seed_by_rank)


if __name__ == "__main__":
    sys.exit(main())
