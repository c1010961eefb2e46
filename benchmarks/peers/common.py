"""Shared by the peer benchmark processes (no backend imported here): the job, the output sink, the interleaved
rounds and the per-process JSON that ``run.py`` combines.

The job: MLP 784-256-256-10, Adam lr 1e-3, batch 64, one epoch of the real Fashion-MNIST training set (938
batches), 1 thread. Every variant of a process is one framework in one configuration; it is built by a
``setup()`` (not timed: building the model, the optimizer and the framework's trainer object) that returns a
``train()`` (timed with ``timing.clock`` / ``timing.elapsed``: the call that trains the epoch) and an
``evaluate()`` (not timed: final training loss and test accuracy of the trained model).

Rounds: every round runs every variant once, in an order rotated by one place per round (as
``timing.interleaved``), so slow phases of a noisy machine hit all variants alike; round 0 is cold (imports,
first traces, caches) and left out of the figures. Every run starts after ``gc.collect()`` (outside the timing,
so one variant's garbage is not collected in the next one's time); during the run the garbage collector runs as
users run it. The printing of setup and training goes to ``os.devnull`` (Python's ``sys.stdout`` /
``sys.stderr`` and file descriptors 1 and 2), so terminal output costs the same for every framework.

Run through ``run.py`` (see its docstring); the processes ``torch_peers.py``, ``keras_torch.py`` and
``tensorflow_peers.py`` also run alone, e.g. ``.venv-peers/bin/python benchmarks/peers/torch_peers.py --rounds 2``.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent
if str(BENCHMARKS_DIR) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS_DIR))  # timing.py, overhead_pytorch.py, overhead_tensorflow.py

from timing import clock, elapsed  # noqa: E402

BATCH_SIZE = 64
LEARNING_RATE = 1e-3
LOG_PERIOD = 200  # mlpug's LogProgress and the raw floor's print, as in overhead_pytorch.py
JAX_JOBS = {
    "mlp": {
        "layers": (784, 256, 256, 10),
        "batch_size": 64,
        "pool": 1,
        "epochs": 1,
        "what": "MLP 784-256-256-10, batch 64, one epoch (938 batches, the last of 32 samples): compute bound",
    },
    "tiny": {
        "layers": (196, 32, 10),
        "batch_size": 32,
        "pool": 2,
        "epochs": 2,
        "what": "MLP 196-32-10 on the images 2x2-average-pooled to 14x14, batch 32, two epochs (2 x 1875 batches): "
        "dispatch bound",
    },
}
"""The jobs of the JAX processes (``jax_peers.py``, ``keras_jax.py``; ``--job``, default ``mlp``, the job of every
other process): the layer sizes of the MLP (ReLU between them), the batch size, the pooling factor of the 28x28
images (1: the 784 pixels; 2: 2x2 averages, 196 inputs), the number of epochs, and in words. ``tiny`` is the case the
JAX backend's ``steps_per_execution`` is for (issue 28): a step of a few microseconds of arithmetic, so that the
per-step dispatch of a jitted call dominates."""
PACKAGES = (
    "mlpug",
    "torch",
    "tensorflow-cpu",
    "keras",
    "lightning",
    "pytorch-ignite",
    "accelerate",
    "pytorch-accelerated",
    "numpy",
    "tqdm",
    "rich",
    "tensorboard",
)


@dataclass
class Run:
    """What a variant's ``setup()`` returns: ``train()`` is timed, ``evaluate()`` -> (train loss, test accuracy)
    is not; ``cleanup()`` (not timed) removes what the run wrote, e.g. its checkpoint directory."""

    train: Callable[[], None]
    evaluate: Callable[[], tuple]
    cleanup: Callable[[], None] = lambda: None


@dataclass
class Variant:
    framework: str
    config: str  # "floor", "lean", "default", ...
    what: str  # what runs, in words (for the table)
    setup: Callable[[], Run]
    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    setup_s: list = field(default_factory=list)
    train_loss: Optional[float] = None
    test_accuracy: Optional[float] = None

    @property
    def name(self):
        return f"{self.framework} {self.config}"


@contextlib.contextmanager
def sink():
    """Send everything printed inside to ``os.devnull``: Python's streams and file descriptors 1 and 2 (what C++
    libraries and logging handlers made earlier write to)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def progress(message):
    print(message, file=sys.stderr, flush=True)


def parse_args(description, default_rounds=8, jobs=None):
    """The options of a process script; with ``jobs`` (a dict of job names, e.g. ``JAX_JOBS``) also ``--job``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if jobs is not None:
        parser.add_argument("--job", choices=sorted(jobs), default="mlp", help="which job (default: mlp)")
    parser.add_argument("--rounds", type=int, default=default_rounds, help="rounds after the cold round 0")
    parser.add_argument("--out", type=Path, help="write this process's results as JSON here")
    parser.add_argument("--max-batches", type=int, help="train on the first N batches only (smoke tests)")
    parser.add_argument("--only", help="comma-separated framework names to run beside the floor (smoke tests)")
    return parser.parse_args()


def select(variants, only):
    if not only:
        return variants
    names = {name.strip() for name in only.split(",")}
    return [v for v in variants if v.config == "floor" or v.framework in names]


def run_rounds(variants, rounds, check=None):
    """Round 0 (cold) and ``rounds`` more; the training loss and test accuracy come from the last round.

    ``check()`` (optional) runs after every run, outside the timing, e.g. to verify the thread count."""
    total = rounds + 1
    for round_index in range(total):
        shift = round_index % len(variants)
        order = variants[shift:] + variants[:shift]
        line = []
        for variant in order:
            gc.collect()
            with sink():
                start = clock()
                run = variant.setup()
                setup_s = elapsed(start)[0]
                start = clock()
                run.train()
                wall, cpu = elapsed(start)
                if round_index == total - 1:
                    variant.train_loss, variant.test_accuracy = (float(x) for x in run.evaluate())
                run.cleanup()
            if check is not None:
                check(variant)
            if round_index > 0:
                variant.wall.append(wall)
                variant.cpu.append(cpu)
                variant.setup_s.append(setup_s)
            line.append(f"{variant.name} {wall:.2f}")
        progress(f"  round {round_index}/{rounds}{' (cold, left out)' if round_index == 0 else ''}: " + ", ".join(line))


def summary(variants, floor):
    """Per variant: the epoch times and the per-round ratios to ``floor`` (same round, same process)."""
    rows = []
    for variant in variants:
        ratios = [w / f for w, f in zip(variant.wall, floor.wall)]
        cpu_ratios = [c / f for c, f in zip(variant.cpu, floor.cpu)]
        rows.append(
            {
                "framework": variant.framework,
                "config": variant.config,
                "what": variant.what,
                "wall_s": variant.wall,
                "cpu_s": variant.cpu,
                "setup_s": variant.setup_s,
                "wall_median_s": statistics.median(variant.wall),
                "cpu_over_wall_median": statistics.median(c / w for c, w in zip(variant.cpu, variant.wall)),
                "ratio_per_round": ratios,
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "cpu_ratio_median": statistics.median(cpu_ratios),
                "cpu_ratio_min": min(cpu_ratios),
                "cpu_ratio_max": max(cpu_ratios),
                "train_loss": variant.train_loss,
                "test_accuracy": variant.test_accuracy,
            }
        )
    return rows


def versions():
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_results(args, process, floor, variants, notes):
    rows = summary(variants, floor)
    result = {
        "process": process,
        "floor": floor.name,
        "rounds": args.rounds,
        "num_batches": args.max_batches,
        "python": platform.python_version(),
        "versions": versions(),
        "notes": notes,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    for row in rows:
        progress(
            f"  {row['framework']:>20} {row['config']:<12} median {row['wall_median_s']:.3f} s, ratio "
            f"{row['ratio_median']:.3f} [{row['ratio_min']:.3f} - {row['ratio_max']:.3f}], "
            f"loss {row['train_loss']:.4f}, accuracy {row['test_accuracy']:.4f}"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return result
