"""mlpug's own cost per training step on TensorFlow, resolved below the machine's noise: fine-grained interleaving.

Why: the epoch-level peer benchmark (``peers/tensorflow_peers.py``) pairs an mlpug epoch with a raw-loop epoch
seconds apart, and on a shared 2-CPU machine the speed of the CPU drifts on that time scale (single-round ratios
0.64-1.69), so a difference of a few per cent between two loops is not resolved there. Here the two loops
alternate in short **blocks** of batches, a fraction of a second each, so that both see the same machine speed.

Job: the peers' TensorFlow job (``peers/tensorflow_peers.py``: the ``tf.keras.Sequential`` MLP 784-256-256-10,
Keras ``Adam(1e-3)``, batch 64, the Fashion-MNIST training set in a fixed permutation as a
``tf.data.Dataset.from_tensor_slices(...).batch(64)`` pipeline), 1 intra-op and 1 inter-op thread. The epoch
(938 batches) is cut into ``--blocks-per-epoch`` blocks; every block is one ``tf.data`` pipeline that both loops
iterate. Both start from the same weights, are traced before the timing (steady state: the first trace is
measured by the peer benchmark), and train on every block in the same order.

* raw: the hand-written ``tf.function(reduce_retracing=True)`` GradientTape step of the peer benchmark, the loss
  summed as a tensor and its mean printed every 200 batches (one ``.numpy()`` each).
* raw concrete: the same loop calling the step's ``ConcreteFunction`` (``get_concrete_function``, one for the full
  batches and one for the short last batch) instead of the ``tf.function``: the floor of the dispatch, which
  mlpug's ``CompiledStep`` reaches by calling the concrete function directly (``mlpug/tensorflow/trainers/
  compilation.py``).
* mlpug lean: ``DefaultTrainer`` (compiled) and, **for every block**, a new ``TrainingManager`` over that block
  with no callbacks, ``start_training()``. The manager's set-up and end of training are in mlpug's time, so the
  ratio is an upper bound on the per-step cost (an epoch pays them once, here every block).

Per block the three run one after the other, in an order that rotates from block to block. Reported per loop:
the summed time and microseconds per step; for mlpug against each raw loop: the ratio of the summed times, a
bootstrap 95 % interval of it (blocks resampled) and the median of the per-block ratios.

    .venv/bin/python benchmarks/step_overhead_tensorflow.py --epochs 6 --blocks-per-epoch 47
"""

import argparse
import contextlib
import gc
import io
import os
import platform
import random
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from overhead_tensorflow import LOG_PERIOD, TrainModel, make_model, raw_train_step, training_arrays  # noqa: E402

import mlpug.tensorflow as mlp  # noqa: E402

BATCH_SIZE = 64


def make_blocks(blocks_per_epoch):
    """The peers' training set order, cut into ``blocks_per_epoch`` ``tf.data`` pipelines of whole batches."""
    images, labels = training_arrays()
    num_batches = -(-len(labels) // BATCH_SIZE)
    edges = np.linspace(0, num_batches, blocks_per_epoch + 1).round().astype(int) * BATCH_SIZE
    return [
        (
            tf.data.Dataset.from_tensor_slices((images[a:b], labels[a:b])).batch(BATCH_SIZE),
            -(-(min(b, len(labels)) - a) // BATCH_SIZE),
        )
        for a, b in zip(edges[:-1], edges[1:])
    ]


class Raw:
    def __init__(self):
        model, optimizer = make_model()
        optimizer.build(model.trainable_variables)
        self.model, self.train_step = model, raw_train_step(model, optimizer)
        self.step, self.running_loss, self.count = 0, tf.zeros(()), 0

    def train(self, dataset):
        for images, labels in dataset:
            self.running_loss += self.train_step(images, labels)
            self.count += 1
            self.step += 1
            if self.step % LOG_PERIOD == 0:
                print(f"batch {self.step}: mean loss {self.running_loss.numpy() / self.count:.3f}")
                self.running_loss, self.count = tf.zeros(()), 0


class RawConcrete(Raw):
    def __init__(self, full_batch, short_batch):
        super().__init__()
        polymorphic = self.train_step
        self.concretes = {
            tuple(batch[0].shape): polymorphic.get_concrete_function(*batch) for batch in (full_batch, short_batch)
        }

    def train(self, dataset):
        concretes = self.concretes
        for images, labels in dataset:
            self.running_loss += concretes[tuple(images.shape)](images, labels)
            self.count += 1
            self.step += 1
            if self.step % LOG_PERIOD == 0:
                print(f"batch {self.step}: mean loss {self.running_loss.numpy() / self.count:.3f}")
                self.running_loss, self.count = tf.zeros(()), 0


class MlpugLean:
    def __init__(self):
        self.model, optimizer = make_model()
        self.trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=self.model)
        self.trainer.set_training_model(TrainModel(self.model))

    def train(self, dataset):
        mlp.trainers.TrainingManager(self.trainer, dataset, num_epochs=1).start_training()


def timed(loop, dataset):
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        loop.train(dataset)
        return time.perf_counter() - start


def bootstrap_ratio(raw, mlpug, resamples=5000, seed=0):
    rng = random.Random(seed)
    indices = range(len(raw))
    ratios = []
    for _ in range(resamples):
        pick = [rng.choice(indices) for _ in indices]
        ratios.append(sum(mlpug[i] for i in pick) / sum(raw[i] for i in pick))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="timed epochs (after the untimed traces)")
    parser.add_argument("--blocks-per-epoch", type=int, default=47, help="47: blocks of 20 batches")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    mlp.logging.set_level("WARNING")
    blocks = make_blocks(args.blocks_per_epoch)
    full_batch, short_batch = next(iter(blocks[0][0])), next(iter(blocks[-1][0].skip(blocks[-1][1] - 1)))
    loops = {"raw": Raw(), "raw concrete": RawConcrete(full_batch, short_batch), "mlpug lean": MlpugLean()}
    for loop in loops.values():  # trace (full and short last batch) before the timing
        timed(loop, blocks[0][0].take(2))
        timed(loop, blocks[-1][0].skip(blocks[-1][1] - 1))
    times = {name: [] for name in loops}
    steps = 0
    gc.collect()
    names = list(loops)
    for epoch in range(args.epochs):
        for index, (dataset, num_batches) in enumerate(blocks):
            shift = (epoch * len(blocks) + index) % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timed(loops[name], dataset))
            steps += num_batches
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, tensorflow {tf.__version__}, "
        f"1 intra-op + 1 inter-op thread; {args.epochs} epochs x {len(blocks)} blocks = {len(times['raw'])} blocks "
        f"per loop, {steps} steps per loop; load average at end {os.getloadavg()[0]:.2f}"
    )
    for name, values in times.items():
        print(f"{name:13} {sum(values):.2f} s, {1e6 * sum(values) / steps:.0f} us per step")
    lean = times["mlpug lean"]
    for floor in ("raw", "raw concrete"):
        ratios = [m / r for m, r in zip(lean, times[floor])]
        low, high = bootstrap_ratio(times[floor], lean)
        print(
            f"mlpug lean / {floor}: summed {sum(lean) / sum(times[floor]):.4f} (bootstrap 95 % [{low:.4f} - "
            f"{high:.4f}]), per-block median {statistics.median(ratios):.4f} [{min(ratios):.3f} - {max(ratios):.3f}]; "
            f"difference {1e6 * (sum(lean) - sum(times[floor])) / steps:+.1f} us per step"
        )


if __name__ == "__main__":
    main()
