"""Data-parallel training with mlpug on PyTorch: scaling of 1 vs 2 processes, and mlpug DDP vs a hand-written DDP loop.

Job: MLP 784-256-256-10, Adam 1e-3, batch 64 per process, one epoch of the real Fashion-MNIST training set
(60,000 samples: 938 batches in one process, 469 per rank on two), 1 CPU thread per process, gloo on the loopback
address. Every variant iterates a pre-built list of this rank's batches (rank ``r`` takes every second batch of the
one-process order), so data loading costs nothing and only the loop and its communication are compared:

* raw DDP: ``DistributedDataParallel`` and ``zero_grad; loss = ...; backward; step``, the loss accumulated as a
  tensor and printed every 200 batches (one ``.item()`` per print), as a hand-written loop does;
* mlpug DDP: ``DefaultTrainer`` + ``TrainingManager`` with ``TrainingMetricsLogger`` and ``LogProgress(log_period=
  200)`` under the same launch: mlpug adds, at its read points only (the log periods, the epoch's end and a stop
  check every 10 batches), one asynchronous all-reduce of the losses and metric sums and counts of the steps since
  the last read point and of the stop flags;
* raw DDP + loss all-reduce: the same loop reducing its loss over the ranks every step (one asynchronous
  all-reduce of one number, waited for at the prints): the cost of "the same logged values on every rank" alone;
* raw FSDP: FSDP2 as a hand-written loop applies it (``fully_shard`` of every Linear, then of the model; Adam made
  over the sharded parameters), the same loop as raw DDP;
* mlpug FSDP: ``DefaultTrainer(strategy=FSDPStrategy(shard_modules=[torch.nn.Linear]))`` with the same callbacks;
* mlpug, one process: the same job in one process with 1 and with 2 threads (this machine has 2 cores: two
  processes of one thread use the same cores as one process of two threads, so that is the honest baseline).

The data-parallel variants run side by side in the same two processes, in rotating order within every repetition,
with the garbage collector as users run it and frozen (see ``timing.py``); rank 0 reports. Targets: mlpug DDP / raw
DDP <= 1.03; mlpug FSDP / raw FSDP reported beside it.

    .venv/bin/python benchmarks/ddp.py --repetitions 7
"""

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile

import torch
from overhead_pytorch import LOG_PERIOD, make_batches, make_model, run_mlpug, run_raw
from timing import interleaved, report

import mlpug.pytorch as mlp

NUM_SAMPLES = 60_000


def run_raw_ddp(batches):
    return run_raw(batches, wrap_model=torch.nn.parallel.DistributedDataParallel)


def _all_reduced(step, loss):
    """The loss over all ranks, as mlpug logs it: one asynchronous all-reduce per step, waited for at the prints."""
    loss = loss.detach().clone()
    work = torch.distributed.all_reduce(loss, async_op=True)
    if step % LOG_PERIOD == 0:
        work.wait()
    return loss


def run_raw_ddp_reduced(batches):
    return run_raw(batches, wrap_model=torch.nn.parallel.DistributedDataParallel, reduce_loss=_all_reduced)


def run_mlpug_ddp(batches):
    return run_mlpug(batches)  # the same code as one process: the trainer finds the process group itself


def _fully_shard_linears(model):
    """FSDP2 as a hand-written loop applies it: every Linear a unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in model:
        if isinstance(module, torch.nn.Linear):
            fully_shard(module)
    return fully_shard(model)


def run_raw_fsdp(batches):
    return run_raw(batches, wrap_model=_fully_shard_linears, optimizer_after_wrap=True)


def run_mlpug_fsdp(batches):
    return run_mlpug(batches, strategy=mlp.strategies.FSDPStrategy(shard_modules=[torch.nn.Linear]))


def _worker(args, result_path):
    torch.set_num_threads(1)
    mlp.logging.set_level("ERROR")  # a pre-sharded list cannot be sharded: that warning is expected here
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    batches = make_batches(args.batch_size)[rank::world_size]  # 469 batches per rank (the last has 32 samples)
    model, optimizer = make_model()
    mlp.trainers.DefaultTrainer(optimizer, model)  # joins the process group
    variants = {
        "raw DDP": run_raw_ddp,
        "raw DDP + loss all-reduce": run_raw_ddp_reduced,
        "mlpug DDP": run_mlpug_ddp,
        "raw FSDP": run_raw_fsdp,
        "mlpug FSDP": run_mlpug_fsdp,
    }
    for warm_up in variants.values():
        warm_up(batches[:30])
    times = interleaved(variants, batches, args.repetitions)
    if rank == 0:
        with open(result_path, "w") as file:
            json.dump({f"{name}|{mode}": values for (name, mode), values in times.items()}, file)


def _single_process(batches, threads, repetitions):
    torch.set_num_threads(threads)
    run_mlpug(batches[:30])
    return [run_mlpug(batches)[0] for _ in range(repetitions)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    mlp.logging.set_level("WARNING")
    with tempfile.TemporaryDirectory() as directory:
        result_path = os.path.join(directory, "ddp.json")
        mlp.distributed.launch(_worker, args, result_path, num_processes=2)
        with open(result_path) as file:
            raw = json.load(file)
    times = {tuple(key.split("|")): [tuple(value) for value in values] for key, values in raw.items()}
    batches = make_batches(args.batch_size)
    with contextlib.redirect_stdout(io.StringIO()):
        single = {threads: _single_process(batches, threads, args.repetitions) for threads in (1, 2)}
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"gloo, batch {args.batch_size} per process, {args.repetitions} repetitions"
    )
    report(times, [("mlpug DDP", "raw DDP"), ("mlpug DDP", "raw DDP + loss all-reduce"), ("mlpug FSDP", "raw FSDP")])
    print()
    print("| run | processes x threads | epoch wall median (s) | samples/s | speed-up |")
    print("|---|---|---|---|---|")
    base = statistics.median(single[1])

    def users_median(name):
        return statistics.median(value[0] for value in times[(name, "gc as users run it")])

    rows = [
        ("mlpug, one process", "1 x 1", base),
        ("mlpug, one process", "1 x 2", statistics.median(single[2])),
        ("mlpug DDP (GC as users run it)", "2 x 1", users_median("mlpug DDP")),
        ("raw DDP (GC as users run it)", "2 x 1", users_median("raw DDP")),
        ("mlpug FSDP (GC as users run it)", "2 x 1", users_median("mlpug FSDP")),
        ("raw FSDP (GC as users run it)", "2 x 1", users_median("raw FSDP")),
    ]
    for name, layout, seconds in rows:
        print(f"| {name} | {layout} | {seconds:.3f} | {NUM_SAMPLES / seconds:,.0f} | {base / seconds:.2f} |")


if __name__ == "__main__":
    main()
