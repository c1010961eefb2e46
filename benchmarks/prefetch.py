"""``BackgroundPrefetcher`` on a slow, augmenting loader: one Fashion-MNIST epoch with and without prefetching.

Model: the example's MLP 784-256-256-10, Adam 1e-3, batch 64, 1 torch thread, PyTorch. The loader is
``mlp.data.ResumableArrayBatches`` followed by a per-batch augmentation in NumPy with its own generator (random
shifts of up to 2 pixels and Gaussian noise, float32), the kind of work a real loader does on the CPU. Variants,
side by side in one process (``timing.py``):

* ``loader only``: the augmented batches, no training (what the loader costs);
* ``train only``: training on pre-augmented batches (what the steps cost);
* ``mlpug``: training with the augmenting loader in the loop;
* ``mlpug + prefetch``: the same loader wrapped in ``BackgroundPrefetcher(num_prefetch=4)``;
* the same three with a **vectorised** augmentation (one shift per batch with ``np.roll`` on the whole batch, noise,
  a 3x3 box blur as array arithmetic: NumPy releases the GIL in its loops), the kind of loader a thread can
  overlap with the training step.

The best a prefetcher can do is max(loader, train) instead of their sum.

    .venv/bin/python benchmarks/prefetch.py --repetitions 5
"""

import argparse
import statistics

import numpy as np
import torch
from timing import clock, elapsed, interleaved, report

import mlpug.pytorch as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist


class Augmented:
    """Random shifts and noise per batch, from a generator seeded by the batch index (repeatable)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    @property
    def batch_sampler(self):
        return self.batches.batch_sampler

    def __iter__(self):
        for index, (images, labels) in enumerate(self.batches):
            generator = np.random.default_rng(index)
            images = images.numpy()
            shifted = np.empty_like(images)
            for i, (dy, dx) in enumerate(generator.integers(-2, 3, size=(len(images), 2))):
                shifted[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
            shifted += generator.normal(0.0, 0.05, size=shifted.shape).astype(np.float32)
            yield torch.from_numpy(shifted), labels


class VectorisedAugmented(Augmented):
    """Whole-batch array work: one random shift per batch, noise and a 3x3 box blur (the GIL is released)."""

    def __iter__(self):
        for index, (images, labels) in enumerate(self.batches):
            generator = np.random.default_rng(index)
            images = np.roll(images.numpy(), tuple(generator.integers(-2, 3, size=2)), axis=(1, 2))
            images = images + generator.normal(0.0, 0.05, size=images.shape).astype(np.float32)
            padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), mode="edge")
            blurred = sum(padded[:, dy : dy + 28, dx : dx + 28] for dy in range(3) for dx in range(3)) / 9.0
            yield torch.from_numpy(blurred.astype(np.float32)), labels


class TrainModel(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        return torch.nn.functional.cross_entropy(self.classifier(images), labels)


def train(dataset):
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )  # fmt: skip
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    trainer = mlp.trainers.DefaultTrainer(optimizer, classifier)
    trainer.set_training_model(TrainModel(classifier))
    callbacks = [mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=trainer))]
    manager = mlp.trainers.TrainingManager(trainer, dataset, num_epochs=1, callbacks=callbacks)
    start = clock()
    manager.start_training()
    return elapsed(start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist()
    images = torch.from_numpy(data.train_images.astype(np.float32) / 255.0)
    labels = torch.from_numpy(data.train_labels.astype(np.int64))
    batches = mlp.data.ResumableArrayBatches((images, labels), 64, shuffle=True, seed=0)
    augmented, vectorised = Augmented(batches), VectorisedAugmented(batches)
    ready = list(augmented)

    def loader_only(loader):
        def run(_):
            start = clock()
            for _batch in loader:
                pass
            return elapsed(start)

        return run

    variants = {
        "loader only": loader_only(augmented),
        "train only": lambda _: train(ready),
        "mlpug": lambda _: train(augmented),
        "mlpug + prefetch": lambda _: train(mlp.data.BackgroundPrefetcher(augmented, num_prefetch=4)),
        "vectorised loader only": loader_only(vectorised),
        "mlpug, vectorised": lambda _: train(vectorised),
        "mlpug + prefetch, vectorised": lambda _: train(mlp.data.BackgroundPrefetcher(vectorised, num_prefetch=4)),
    }
    times = interleaved(variants, None, args.repetitions)
    print(f"PyTorch, 1 thread, MLP 784-256-256-10, batch 64, one epoch, {args.repetitions} repetitions")
    report(
        times,
        [
            ("mlpug + prefetch", "mlpug"),
            ("mlpug + prefetch, vectorised", "mlpug, vectorised"),
            ("mlpug + prefetch, vectorised", "train only"),
        ],
    )
    medians = {name: statistics.median(v[0] for v in times[(name, "gc as users run it")]) for name in variants}
    for suffix, loader in (("", "loader only"), (", vectorised", "vectorised loader only")):
        hidden = (medians[f"mlpug{suffix}"] - medians[f"mlpug + prefetch{suffix}"]) / medians[loader]
        name = suffix.strip(", ") or "Python-loop"
        print(f"share of the {name} loader's time hidden by prefetching (GC as users run it, medians): {hidden:.0%}")


if __name__ == "__main__":
    main()
