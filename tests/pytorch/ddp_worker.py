"""One rank of the data-parallel tests (``tests/pytorch/test_distributed.py``); also the single-process reference.

Run as a script by ``torchrun``, by the tests with a ``torchrun``-like environment, or imported (the single-process
reference runs the same functions in the test process). Only mlpug and torch are imported: no test helpers.

    ddp_worker.py equivalence OUT_DIR
    ddp_worker.py train OUT_DIR [--num-epochs E] [--resume] [--stop-at G --stop-how TERM|KILL|RAISE --stop-rank R]
    ddp_worker.py uneven OUT_DIR

Every rank prints at its very end (an ``atexit`` handler registered before mlpug creates the process group, so it
runs after mlpug's) whether the process group is still initialised: :data:`EXIT_TRACE`.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import threading
import time

import torch

import mlpug.pytorch as mlp

NUM_FEATURES = 8
VALIDATION_SAMPLES = 10_001
EXIT_TRACE = "process group at interpreter exit: "


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


FSDP_VARIANTS = ("plain", "accumulation", "bf16", "clipping")
"""The equivalence variants also run under ``strategy="fsdp"`` (``ddp_worker.py equivalence-fsdp``)."""


def fsdp_strategy() -> mlp.strategies.FSDPStrategy:
    """FSDP with every ``Linear`` a unit of its own (two units and the root: the all-gathers and reduce-scatters of
    several units per step)."""
    return mlp.strategies.FSDPStrategy(shard_modules=[torch.nn.Linear])


def run_equivalence(variant: str, batch_size: int, fsdp: bool = False) -> dict:
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
    strategy = fsdp_strategy() if fsdp and _world_size() > 1 else None
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=strategy, **options)
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
    if _world_size() > 1 and not fsdp:  # count DDP's gradient all-reduces (of its one bucket: the model is small)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            all_reduces.append(bucket.index())
            return allreduce_hook(None, bucket)

        trainer.training_model.register_comm_hook(None, counting_hook)
    manager.start_training()
    dataset = manager.logs["current"]["validation"]["dataset"]
    weights = {name: _full(value) for name, value in model.state_dict().items()}
    return {
        "weights": weights,
        "batch_losses": recorder.batch_losses,
        "window_losses": recorder.window_losses,
        "validation": {"loss": dataset["loss"], "mae": dataset["mae"]},
        "num_batches_per_epoch": manager.num_batches_per_epoch,
        "gradient_all_reduces": len(all_reduces),
        "strategy": trainer.strategy.name,
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor``, gathered when it is a sharded ``DTensor`` (a collective)."""
    full = tensor.full_tensor() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor
    return full.detach().clone()


def slow_mean_absolute_error(inputs):
    """``mean_absolute_error``, 0.1 s slower per batch on rank 1's evaluation thread: the ranks finish an
    asynchronous evaluation at different times (their landing must still be agreed)."""
    if os.environ.get("RANK") == "1" and threading.current_thread() is not threading.main_thread():
        time.sleep(0.1)
    return mean_absolute_error(inputs)


def run_async_validation(batch_size: int, fsdp: bool = False) -> dict:
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
        strategy = fsdp_strategy() if fsdp and _world_size() > 1 else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
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


class PoisonShard(mlp.callbacks.Callback):
    """At global iteration ``at``, sets this rank's shard of every sharded parameter to NaN (the other ranks' shards
    stay finite)."""

    def __init__(self, model: torch.nn.Module, at: int):
        super().__init__("PoisonShard")
        self.model, self.at = model, at

    def on_batch_training_completed(self, training_batch, logs):
        if logs["current"]["global_iter"] == self.at:
            with torch.no_grad():
                for parameter in self.model.parameters():
                    parameter.to_local().fill_(float("nan"))
        return True

    def get_state(self):
        return {}


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
    out_dir: str,
    num_epochs: int,
    resume: bool,
    stop: tuple | None = None,
    seed_by_rank: bool = False,
    fsdp: bool = False,
    background: bool = False,
    nan_at: int | None = None,
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
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=fsdp_strategy() if fsdp else None)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.CheckpointManager(
            checkpoints_path=out_dir,
            metric_to_monitor="training.window_average.loss",
            batch_level=stop is not None and stop[1] == "KILL",
            write_in_background=background,
        ),
    ]
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if stop is not None and int(os.environ["RANK"]) == stop[2] and not restarted:
        callbacks.append(StopAt(stop[0], stop[1]))
    else:
        callbacks.append(StopAt(-1, "RAISE"))  # the same callbacks in every checkpoint
    warn = {}
    if nan_at is not None:  # rank 1's shards become NaN; training goes on (warn), no checkpoint is written from them
        if os.environ["RANK"] == "1":
            callbacks.append(PoisonShard(model, nan_at))
        warn = {"non_finite_loss": "warn", "non_finite_weights": "warn"}
    manager = mlp.trainers.TrainingManager(
        trainer, training_dataset, num_epochs=num_epochs, callbacks=callbacks, resume_from="latest" if resume else None,
        **warn,
    )  # fmt: skip
    trainer.set_training_model(TrainModel(model))
    manager.start_training()
    if manager.global_iter < num_epochs * manager.num_batches_per_epoch or nan_at is not None:
        return model  # stopped early: no final weights (and no collective a stopped rank would not join)
    weights = {name: _full(value) for name, value in model.state_dict().items()}
    torch.save(weights, os.path.join(out_dir, f"final-rank{os.environ.get('RANK', '0')}.pt"))
    return model


# Per-sample errors (prediction - target) of the uneven run: rank 0 trains on sample 0 alone, rank 1 on samples 1-3;
# the 3 validation samples are sharded [0, 2] and [1]. A mean of the per-rank means differs from the mean over the
# samples: training (9 + 1 / 3) / 2 = 4.67 instead of (9 + 1) / 4 = 2.5, validation (2.5 + 0) / 2 = 1.25 instead
# of 5 / 3.
UNEVEN_TRAINING_ERRORS = (3.0, 1.0, 0.0, 0.0)
UNEVEN_VALIDATION_ERRORS = (2.0, 0.0, 1.0)


def uneven_data(errors: tuple) -> tuple:
    """Inputs and targets whose error under :func:`make_model` is ``errors``, per sample (exactly: the targets are the
    predictions minus the errors)."""
    inputs = torch.randn(len(errors), NUM_FEATURES, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        targets = make_model()(inputs) - torch.tensor(errors).unsqueeze(1)
    return inputs, targets


def run_uneven(out_dir: str) -> dict:
    """One step on batches of different sizes per rank (1 and 3 samples, pre-sharded: mlpug trains them as given)
    at learning rate 0, then the validation over 3 samples (shards of 2 and 1); the logged values and, after
    training, one all-reduce of the script's own on mlpug's process group (which must still be there)."""
    rank = int(os.environ["RANK"])
    inputs, targets = uneven_data(UNEVEN_TRAINING_ERRORS)
    shard = slice(0, 1) if rank == 0 else slice(1, None)
    training_batches = [(inputs[shard], targets[shard])]
    validation = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*uneven_data(UNEVEN_VALIDATION_ERRORS)), batch_size=2
    )
    model = make_model()
    trainer = mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.0), model)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer, batch_metric_funcs={"mae": mean_absolute_error})
    recorder = Recorder()
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.TestMetricsLogger(validation, "validation", evaluator),
        recorder,
    ]
    manager = mlp.trainers.TrainingManager(trainer, training_batches, num_epochs=1, callbacks=callbacks)
    trainer.set_training_model(TrainModel(model))
    manager.start_training()
    samples = torch.tensor([float(len(training_batches[0][0]))])
    torch.distributed.all_reduce(samples)  # the script goes on using the group after training
    dataset = manager.logs["current"]["validation"]["dataset"]
    return {
        "batch_losses": recorder.batch_losses,
        "validation": {"loss": dataset["loss"], "mae": dataset["mae"]},
        "samples_after_training": samples.item(),
    }


def fail_on_rank_1(how: str) -> None:
    """For ``mlp.distributed.launch`` on 2 processes: rank 1 fails (``how``: ``"KILL"``: SIGKILL to itself;
    ``"RAISE"``: raises, and its interpreter then takes 3 s more to end) while rank 0 waits in an all-reduce, which
    fails as soon as rank 1's process group is gone: rank 0 ends with an error too, before rank 1 has ended."""
    rank = int(os.environ["RANK"])
    if rank == 1 and how == "RAISE":
        atexit.register(time.sleep, 3)  # registered before mlpug's handler: runs after it destroyed the group
    context = mlp.distributed.init_distributed()
    context.barrier()
    if rank == 1:
        if how == "KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("rank 1 fails on purpose")
    context.all_reduce_sum([1.0])


def run_one_call(out_dir: str, fsdp: bool) -> dict:
    """The one-call API: ``mlp.Trainer(model, mse_loss, SGD, strategy=...)`` trains 2 epochs of 6 batches of 8 per
    rank (96 samples over 2 ranks, or of 16 in one process), validated over 10,001 samples; the weights and the
    history rows."""
    inputs, targets = make_data(96, seed=1)
    model = make_model()
    options = {"strategy": fsdp_strategy()} if fsdp else {}
    trainer = mlp.Trainer(model, torch.nn.functional.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), **options)
    history = trainer.train(
        (inputs, targets), make_data(VALIDATION_SAMPLES, seed=2), num_epochs=2, batch_size=16 // _world_size(),
        validation_batch_size=1000, progress=None, checkpoints_path=out_dir, shuffle=False,
    )  # fmt: skip
    weights = {name: _full(value) for name, value in model.state_dict().items()}
    return {"weights": weights, "rows": [dict(row) for row in history.rows]}


def run_continue(out_dir: str, num_epochs: int, resume: bool) -> dict:
    """Epochs of 48 samples (3 batches of 8 per rank under FSDP on 2 ranks, of 16 in one process, the same samples
    per step), SGD with momentum, a training checkpoint at every epoch end in ``out_dir``; resumable. The final
    weights (gathered)."""
    inputs, targets = make_data(48, seed=1)
    training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), 16 // _world_size(), shuffle=True, seed=3)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    strategy = fsdp_strategy() if _world_size() > 1 else None
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=strategy)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.CheckpointManager(checkpoints_path=out_dir, metric_to_monitor=None, write_in_background=False),
    ]
    manager = mlp.trainers.TrainingManager(
        trainer, training_dataset, num_epochs=num_epochs, callbacks=callbacks, resume_from="latest" if resume else None
    )
    trainer.set_training_model(TrainModel(model))
    manager.start_training()
    return {name: _full(value) for name, value in model.state_dict().items()}


def run_load_whole(out_dir: str) -> None:
    """Under FSDP: read the (single-file) training checkpoint of one process in ``out_dir`` into a sharded trainer,
    then write the gathered model and Adam state of this rank to ``loaded-rank<R>.pt``."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=fsdp_strategy())
    trainer.set_training_model(TrainModel(model))
    checkpoint = mlp.load_training_checkpoint(os.path.join(out_dir, "model-training-checkpoint.safetensors"))
    trainer.set_state(checkpoint["trainer"])
    state = optimizer.state_dict()["state"]
    loaded = {
        "weights": {name: _full(value) for name, value in model.state_dict().items()},
        "adam": {index: {key: _full(value) for key, value in entry.items()} for index, entry in state.items()},
        "sharded": [isinstance(value, torch.distributed.tensor.DTensor) for value in model.state_dict().values()],
    }
    torch.save(loaded, os.path.join(out_dir, f"loaded-rank{os.environ['RANK']}.pt"))


def kill_during_sharded_save(save: int) -> None:
    """SIGKILL this process in its ``save``-th sharded checkpoint save, after it wrote its shard files and before the
    checkpoint is complete (the metadata and the training checkpoint file come after every rank's files)."""
    from torch.distributed.checkpoint import FileSystemWriter

    write_data, count = FileSystemWriter.write_data, [0]

    def write_then_die(self, plan, planner):
        result = write_data(self, plan, planner)
        count[0] += 1
        if count[0] == save:
            result.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    FileSystemWriter.write_data = write_then_die


def _trace_process_group_at_exit() -> None:
    state = "still initialised" if torch.distributed.is_initialized() else "destroyed"
    print(f"rank {os.environ.get('RANK', '0')}: {EXIT_TRACE}{state}", flush=True)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "scenario",
        choices=["equivalence", "equivalence-fsdp", "train", "uneven", "load-whole", "one-call-fsdp", "continue"],
    )
    parser.add_argument("out_dir")
    parser.add_argument("--num-epochs", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--stop-how", choices=["TERM", "KILL", "RAISE"], default="TERM")
    parser.add_argument("--stop-rank", type=int, default=1)
    parser.add_argument("--seed-by-rank", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="strategy='fsdp' (every Linear a unit)")
    parser.add_argument("--background", action="store_true", help="CheckpointManager(write_in_background=True)")
    parser.add_argument("--kill-in-save", type=int, default=None, help="rank 1: SIGKILL in its N-th sharded save")
    parser.add_argument("--nan-at", type=int, default=None, help="FSDP: rank 1's shards NaN at global iteration G")
    args = parser.parse_args(argv)
    atexit.register(_trace_process_group_at_exit)  # before mlpug's handler is registered: runs after it
    torch.set_num_threads(1)
    rank = os.environ.get("RANK", "0")
    if args.kill_in_save is not None and rank == "1":
        kill_during_sharded_save(args.kill_in_save)
    if args.scenario == "load-whole":
        run_load_whole(args.out_dir)
    elif args.scenario == "continue":
        weights = run_continue(args.out_dir, args.num_epochs, args.resume)
        torch.save(weights, os.path.join(args.out_dir, f"continued-rank{rank}.pt"))
    elif args.scenario == "one-call-fsdp":
        torch.save(run_one_call(args.out_dir, fsdp=True), os.path.join(args.out_dir, f"one-call-rank{rank}.pt"))
    elif args.scenario == "uneven":
        torch.save(run_uneven(args.out_dir), os.path.join(args.out_dir, f"uneven-rank{rank}.pt"))
    elif args.scenario == "equivalence":
        for variant in EQUIVALENCE_VARIANTS:
            torch.save(run_equivalence(variant, batch_size=8), os.path.join(args.out_dir, f"{variant}-rank{rank}.pt"))
        torch.save(run_async_validation(batch_size=8), os.path.join(args.out_dir, f"async-rank{rank}.pt"))
    elif args.scenario == "equivalence-fsdp":
        for variant in FSDP_VARIANTS:
            result = run_equivalence(variant, batch_size=8, fsdp=True)
            torch.save(result, os.path.join(args.out_dir, f"fsdp-{variant}-rank{rank}.pt"))
        result = run_async_validation(batch_size=8, fsdp=True)
        torch.save(result, os.path.join(args.out_dir, f"fsdp-async-rank{rank}.pt"))
    else:
        stop = None if args.stop_at is None else (args.stop_at, args.stop_how, args.stop_rank)
        run_training(
            args.out_dir, args.num_epochs, args.resume, stop, args.seed_by_rank, args.fsdp, args.background, args.nan_at
        )


if __name__ == "__main__":
    sys.exit(main())
