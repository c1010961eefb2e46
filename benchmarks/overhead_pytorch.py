"""Training-loop overhead of mlpug vs a hand-written PyTorch loop.

Job: MLP 784-256-256-10, Adam, batch 64, one epoch of the real Fashion-MNIST training set (938 batches),
1 CPU thread. Both variants iterate the same pre-built list of batches (so data loading costs nothing and
only the loop itself is compared):

* raw: ``zero_grad; loss = ...; backward; step``, the loss accumulated as a tensor and its mean printed
  every 200 batches (one ``.item()`` per print).
* mlpug: ``DefaultTrainer`` + ``TrainingManager`` with ``TrainingMetricsLogger`` and ``LogProgress(log_period=200)``.

Both variants run side by side in one process, in rotating order within every repetition, each with the
garbage collector as users run it (the headline) and frozen (see ``timing.py``). The script reports the min
and median epoch time (seconds) of each, and the ratios mlpug / raw: of the mins, of the medians, and the median
and range of the ratios within each repetition (target: mlpug / raw <= 1.05).

    .venv/bin/python benchmarks/overhead_pytorch.py --repetitions 11
"""

import argparse
import contextlib
import io
import platform

import torch
from timing import clock, elapsed, interleaved, report

import mlpug.pytorch as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

LOG_PERIOD = 200


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


def run_raw(batches, wrap_model=None, reduce_loss=None, optimizer_after_wrap=False):
    """The hand-written loop; ``wrap_model(model)`` (e.g. DDP), ``reduce_loss(step, loss)`` (the loss over the ranks)
    and ``optimizer_after_wrap`` (FSDP: the optimizer made over the parameters the wrap replaced) serve ``ddp.py``."""
    model, optimizer = make_model()
    forward = wrap_model(model) if wrap_model is not None else model
    if optimizer_after_wrap:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_func = torch.nn.CrossEntropyLoss()
    start = clock()
    running_loss, count = torch.zeros(()), 0
    for step, (images, labels) in enumerate(batches, start=1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_func(forward(images), labels)
        loss.backward()
        optimizer.step()
        if reduce_loss is not None:
            loss = reduce_loss(step, loss)
        running_loss += loss.detach()
        count += 1
        if step % LOG_PERIOD == 0:
            print(f"batch {step}: mean loss {running_loss.item() / count:.3f}")
            running_loss, count = torch.zeros(()), 0
    return elapsed(start)


class TrainModel(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_func = torch.nn.CrossEntropyLoss()

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        return self.loss_func(self.classifier(images), labels)


def run_mlpug(batches, strategy=None):
    model, optimizer = make_model()
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model, strategy=strategy)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.LogProgress(log_period=LOG_PERIOD, set_names=["training"]),
    ]
    manager = mlp.trainers.TrainingManager(trainer, batches, num_epochs=1, callbacks=callbacks)
    trainer.set_training_model(TrainModel(model))
    start = clock()
    manager.start_training()
    return elapsed(start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = make_batches(args.batch_size)
    mlp.logging.set_level("WARNING")
    with contextlib.redirect_stdout(io.StringIO()):
        run_raw(batches[:50])  # warm-up
        run_mlpug(batches[:50])
    times = interleaved({"raw": run_raw, "mlpug": run_mlpug}, batches, args.repetitions)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
        f"{len(batches)} batches of {args.batch_size}, {args.repetitions} repetitions"
    )
    report(times, [("mlpug", "raw")])


if __name__ == "__main__":
    main()
