"""Training-loop overhead of mlpug vs a hand-written PyTorch loop.

Job: MLP 784-256-256-10, Adam, batch 64, one epoch of the real Fashion-MNIST training set (938 batches),
1 CPU thread. Both variants iterate the same pre-built list of batches (so data loading costs nothing and
only the loop itself is compared):

* raw: ``zero_grad; loss = ...; backward; step``, the loss accumulated as a tensor and its mean printed
  every 200 batches (one ``.item()`` per print).
* mlpug: ``DefaultTrainer`` + ``TrainingManager`` with ``TrainingMetricsLogger`` and ``LogProgress(log_period=200)``.

Before every timed run, ``gc.collect(); gc.freeze()`` moves the objects that exist already (~170,000 after
importing torch) out of the garbage collector's reach, for both variants alike: otherwise a full collection,
which traverses all of them (~0.15 s here, ~8 % of an epoch), lands in a random run and dominates the noise.
Objects the loop itself allocates are still collected, and that cost is measured.

The variants alternate within every repetition, so background load affects both alike; the script reports
the min and median epoch time (seconds) of each, as wall time and as CPU time of the process (which time
stolen by other virtual machines does not inflate), and the ratios: of the mins, of the medians, and the median
of the ratios of the two runs of each repetition (target: mlpug / raw <= 1.05).

    .venv/bin/python benchmarks/overhead_pytorch.py --repetitions 7
"""

import argparse
import contextlib
import io
import platform
import statistics
import time

import torch
from timing import isolated_run

import mlpug.pytorch as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

LOG_PERIOD = 200


def _clock():
    return time.perf_counter(), time.process_time()


def _elapsed(start):
    """(wall seconds, CPU seconds of this process) since ``start``."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def make_batches(batch_size):
    data = load_fashion_mnist()
    images = torch.from_numpy(data.train_images).float().div_(255.0).reshape(-1, 784)
    labels = torch.from_numpy(data.train_labels).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(labels), batch_size)]


def make_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def run_raw(batches):
    model, optimizer = make_model()
    loss_func = torch.nn.CrossEntropyLoss()
    start = _clock()
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
    return _elapsed(start)


class TrainModel(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_func = torch.nn.CrossEntropyLoss()

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        return self.loss_func(self.classifier(images), labels)


def run_mlpug(batches):
    model, optimizer = make_model()
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.LogProgress(log_period=LOG_PERIOD, set_names=["training"]),
    ]
    manager = mlp.trainers.TrainingManager(trainer, batches, num_epochs=1, callbacks=callbacks)
    trainer.set_training_model(TrainModel(model))
    start = _clock()
    manager.start_training()
    return _elapsed(start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = make_batches(args.batch_size)
    mlp.logging.set_level("WARNING")
    times = {"raw": [], "mlpug": []}
    with contextlib.redirect_stdout(io.StringIO()):
        run_raw(batches[:50])  # warm-up
        run_mlpug(batches[:50])
    for repetition in range(args.repetitions):
        order = ("raw", "mlpug") if repetition % 2 == 0 else ("mlpug", "raw")
        for variant in order:
            times[variant].append(isolated_run(run_raw if variant == "raw" else run_mlpug, batches))
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"{len(batches)} batches of {args.batch_size}, {args.repetitions} repetitions"
    )
    print("| variant | wall min (s) | wall median (s) | CPU min (s) | CPU median (s) |")
    print("|---|---|---|---|---|")
    for variant, values in times.items():
        wall, cpu = [v[0] for v in values], [v[1] for v in values]
        print(
            f"| {variant} | {min(wall):.3f} | {statistics.median(wall):.3f} | {min(cpu):.3f} | "
            f"{statistics.median(cpu):.3f} |"
        )
    ratios = {}
    for index, name in ((0, "wall"), (1, "CPU")):
        raw = [v[index] for v in times["raw"]]
        mine = [v[index] for v in times["mlpug"]]
        paired = statistics.median(m / r for m, r in zip(mine, raw))  # the two runs of one repetition
        ratios[name] = (min(mine) / min(raw), statistics.median(mine) / statistics.median(raw), paired)
    for name, (of_min, of_median, paired) in ratios.items():
        print(
            f"| ratio mlpug/raw, {name} time | min {of_min:.3f} | median {of_median:.3f} | median of paired "
            f"repetitions {paired:.3f} | |"
        )


if __name__ == "__main__":
    main()
