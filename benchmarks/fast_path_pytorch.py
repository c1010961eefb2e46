"""The PyTorch fast path of mlpug against a hand-written loop over a ``DataLoader`` (issue 14).

Job: MLP 784-256-256-10, Adam (lr 1e-3), batch 64, one epoch of the real Fashion-MNIST training set (938 batches,
the last of 32 samples), shuffled every epoch, 1 CPU thread. The data is in memory as float tensors; every variant
builds its model, optimizer and data order anew and prints the mean loss every 200 batches (one ``.item()`` per
print, as ``LogProgress`` does):

* ``dataloader``: the reference (ratio 1.0): a hand-written loop over ``DataLoader(TensorDataset(images, labels),
  batch_size=64, shuffle=True)`` (per-sample indexing and collation) with ``Adam`` as it comes (``fused=None``: the
  for-loop implementation on a CPU).
* ``floor``: a hand-written loop over batches gathered from the tensors by a shuffled index (``images[indices]``)
  with ``Adam(fused=True)``: the least a loop does.
* ``mlpug``: the fast path: ``DefaultTrainer`` + ``TrainingManager`` + ``TrainingMetricsLogger`` +
  ``LogProgress(log_period=200)`` over ``mlp.data.ResumableArrayBatches`` with ``Adam(fused=True)``.
* ``mlpug compiled``: the same with ``DefaultTrainer(compile_step=True)`` (``torch.compile``, inductor). torch keeps
  compiled code per function across trainers, so every run starts with ``torch.compiler.reset()`` (outside the
  timing) and compiles anew: its epoch includes the compile time. Beside it, ``mlpug compiled, steady``: the epoch
  at the rate of its batches after the first ``WARM_UP_STEPS`` (``(t_end - t_warm_up) * batches / (batches -
  warm-up)``), and the compile time: the epoch minus that steady epoch (with inductor's disk cache filled by the
  warm-up; the warm-up's own time, the first compilation in the process, is printed at the end).

The variants run side by side in one process, in rotating order within every repetition, each with the garbage
collector as users run it (the headline) and frozen (see ``timing.py``). Reported: min and median epoch time of each,
the ratios to ``dataloader`` (of the mins, of the medians, and the median and range of the ratios within each
repetition), and the compile times. Target (issue 14): mlpug / dataloader <= 0.85.

    .venv/bin/python benchmarks/fast_path_pytorch.py --repetitions 5
    .venv/bin/python benchmarks/fast_path_pytorch.py --repetitions 1 --num-samples 6400   # a quick check
"""

import argparse
import contextlib
import gc
import io
import platform
import statistics

import torch
from overhead_pytorch import TrainModel
from timing import GC_MODES, clock, elapsed, interleaved, report

import mlpug.pytorch as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

LOG_PERIOD = 200
BATCH_SIZE = 64
WARM_UP_STEPS = 20
_steady_epochs: dict = {mode: [] for mode in GC_MODES}  # (wall, cpu) of the compiled runs' steady epochs


def load_data(num_samples):
    data = load_fashion_mnist()
    images = torch.from_numpy(data.train_images[:num_samples]).float().div_(255.0).reshape(-1, 784)
    return images, torch.from_numpy(data.train_labels[:num_samples]).long()


def make_model(fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)


def hand_written_loop(model, optimizer, batches):
    loss_func = torch.nn.CrossEntropyLoss()
    running_loss, count = torch.zeros(()), 0
    for step, (images, labels) in enumerate(batches, start=1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_func(model(images), labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.detach()
        count += 1
        if step % LOG_PERIOD == 0:
            print(f"batch {step}: mean loss {running_loss.item() / count:.3f}")
            running_loss, count = torch.zeros(()), 0


def run_dataloader(data):
    model, optimizer = make_model(fused=None)
    start = clock()
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*data), batch_size=BATCH_SIZE, shuffle=True, generator=generator
    )
    hand_written_loop(model, optimizer, loader)
    return elapsed(start)


def run_floor(data):
    model, optimizer = make_model(fused=True)
    images, labels = data
    start = clock()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    batches = (
        (images[order[i : i + BATCH_SIZE]], labels[order[i : i + BATCH_SIZE]]) for i in range(0, len(order), BATCH_SIZE)
    )
    hand_written_loop(model, optimizer, batches)
    return elapsed(start)


class StepClock(mlp.callbacks.Callback):
    """The clocks after the first ``WARM_UP_STEPS`` batches and after the last one."""

    def __init__(self):
        super().__init__("StepClock")
        self.steps, self.warm, self.end = 0, None, None

    def on_batch_training_completed(self, training_batch, logs):
        self.steps += 1
        if self.steps == WARM_UP_STEPS:
            self.warm = clock()
        self.end = clock()
        return True


def run_mlpug(data, compile_step=False):
    model, optimizer = make_model(fused=True)
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model, compile_step=compile_step)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    step_clock = StepClock()
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.LogProgress(log_period=LOG_PERIOD, set_names=["training"]),
        *([step_clock] if compile_step else []),
    ]
    batches = mlp.data.ResumableArrayBatches(data, BATCH_SIZE, shuffle=True, seed=0)
    manager = mlp.trainers.TrainingManager(trainer, batches, num_epochs=1, callbacks=callbacks)
    trainer.set_training_model(TrainModel(model))
    start = clock()
    manager.start_training()
    total = elapsed(start)
    if compile_step:
        num_batches = step_clock.steps
        scale = num_batches / (num_batches - WARM_UP_STEPS)
        mode = GC_MODES[1] if gc.get_freeze_count() > 0 else GC_MODES[0]  # timing.timed_run froze it, or not
        _steady_epochs[mode].append(tuple((end - warm) * scale for end, warm in zip(step_clock.end, step_clock.warm)))
    return total


def run_mlpug_compiled(data):
    torch.compiler.reset()  # compiled code of earlier runs would be reused (and torch allows 8 per function)
    return run_mlpug(data, compile_step=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=60000, help="training samples (default: all 60000)")
    parser.add_argument("--no-compiled", action="store_true", help="leave out the compiled variant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(args.num_samples)
    mlp.logging.set_level("WARNING")
    variants = {"dataloader": run_dataloader, "floor": run_floor, "mlpug": run_mlpug}
    if not args.no_compiled:
        variants["mlpug compiled"] = run_mlpug_compiled
    warm_up = (data[0][: 50 * BATCH_SIZE], data[1][: 50 * BATCH_SIZE])
    warm_up_times: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for name, run in variants.items():  # imports, allocator, and the compile caches (inductor's kernels on disk)
            warm_up_times[name] = run(warm_up)[0]
    for runs in _steady_epochs.values():
        runs.clear()
    times = interleaved(variants, data, args.repetitions)
    ratios = [(name, "dataloader") for name in variants if name != "dataloader"]
    if not args.no_compiled:
        for mode in GC_MODES:
            times[("mlpug compiled, steady", mode)] = _steady_epochs[mode]
        ratios.append(("mlpug compiled, steady", "dataloader"))
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"{-(-len(data[1]) // BATCH_SIZE)} batches of {BATCH_SIZE}, {args.repetitions} repetitions"
    )
    report(times, ratios)
    if not args.no_compiled:
        print()
        print("| compiled run | GC | compile time median (s) [min - max] |")
        print("|---|---|---|")
        for mode in GC_MODES:
            compile_times = [
                total[0] - steady[0]
                for total, steady in zip(times[("mlpug compiled", mode)], times[("mlpug compiled, steady", mode)])
            ]
            print(
                f"| epoch - steady epoch | {mode} | {statistics.median(compile_times):.2f} "
                f"[{min(compile_times):.2f} - {max(compile_times):.2f}] |"
            )
        print(
            f"\nThe first compilation in this process (the warm-up, 50 batches, inductor's disk cache as found): "
            f"{warm_up_times['mlpug compiled']:.2f} s, against {warm_up_times['mlpug']:.2f} s eager."
        )


if __name__ == "__main__":
    main()
