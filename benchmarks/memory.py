"""Peak memory of one training step: a batch of 4096 in one piece vs in chunks of 512 (gradient accumulation).

Model (activations dominate): MLP 256 -> 12 x [Linear 1024 + ReLU] -> 10, float32, SGD without momentum
(no optimizer state). Per sample the forward pass keeps about 12 x 2 x 1024 float32 values (Linear output and
ReLU output of every layer) = 96 KiB, so a batch of 4096 keeps about 384 MiB of activations; the parameters
(and their gradients) are 11.8 M floats = 45 MiB each.

Both variants run mlpug's ``DefaultTrainer.train_on`` once, with ``batch_chunk_size=None`` or ``512``: PyTorch's
(default), or with ``--backend tensorflow`` TensorFlow's on the same MLP (Keras ``Dense`` + ``ReLU`` layers,
``SGD``), compiled with ``tf.function`` for a ``batch_data_signature`` (``None`` batch dimension, so it is
traced once, on the warm-up batch) or, with ``--eager``, eagerly.

* CPU: every measurement runs in a fresh process (the peak RSS, ``ru_maxrss``, cannot be reset). The process
  builds model, optimizer and batch, reads its current RSS (``/proc/self/statm``), trains one step and reads its
  peak RSS. **Step memory** = peak RSS - RSS before the step (bytes): activations, gradients and temporaries.
  **Activation memory** = step memory - gradient bytes (the gradients, 45 MiB, are allocated by both variants).
  TensorFlow first trains one step on a warm-up batch of 64 samples (building the optimizer and, compiled,
  tracing the step); "before the step" is then before that warm-up, because what the warm-up leaves in the
  process (the allocator's freed buffers, the traced graph) is reused by the measured step and is part of
  its cost. The printed "kept by warm-up" column says how much that is.
* CUDA (``--device cuda``): the backend allocator's peak after resetting it (``torch.cuda.max_memory_allocated``
  / ``tf.config.experimental.get_memory_info("GPU:0")["peak"]``) minus the memory allocated before the step,
  in the same process, after a warm-up step on the full batch.

The two variants alternate in every repetition, so that load from other processes affects both alike; the
script prints the min and median of each and the ratio chunked / whole (target: activation memory <= 30 %).

    .venv/bin/python benchmarks/memory.py --repetitions 5
    .venv/bin/python benchmarks/memory.py --repetitions 5 --device cuda       # where a GPU is available
    .venv/bin/python benchmarks/memory.py --mixed-precision bfloat16          # the same under bf16 autocast
    .venv/bin/python benchmarks/memory.py --repetitions 5 --backend tensorflow            # tf.function step
    .venv/bin/python benchmarks/memory.py --repetitions 5 --backend tensorflow --eager    # eager step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import NamedTuple, Optional

BATCH_SIZE, CHUNK_SIZE, WARM_UP_BATCH_SIZE = 4096, 512, 64
NUM_FEATURES, WIDTH, DEPTH, NUM_CLASSES = 256, 1024, 12, 10
MiB = 2**20


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Step(NamedTuple):
    """One backend's training step on the benchmark batch, built in the measuring process.

    Attributes:
        train: Trains one step on the batch of ``BATCH_SIZE`` and returns when it has finished.
        warm_up: Trains one step on a batch of ``WARM_UP_BATCH_SIZE`` (builds / traces what the first step
            builds; its peak is far below the measured step's), or None.
        gradient_bytes: Bytes of the gradients (= of the parameters), allocated by both variants.
        cuda_memory: ``(synchronize, allocated, reset_peak, peak)`` byte counters of the backend's CUDA
            allocator, or None on CPU.
    """

    train: Callable[[], None]
    warm_up: Optional[Callable[[], None]]
    gradient_bytes: int
    cuda_memory: Optional[tuple]


def pytorch_step(batch_chunk_size, device, mixed_precision, num_threads, eager) -> Step:
    """The MLP trained by mlpug's PyTorch ``DefaultTrainer`` (``eager`` does not apply)."""
    import torch

    import mlpug.pytorch as mlp

    torch.set_num_threads(num_threads)
    torch.manual_seed(0)
    layers, width_in = [], NUM_FEATURES
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(width_in, WIDTH), torch.nn.ReLU()]
        width_in = WIDTH
    classifier = torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, NUM_CLASSES)).to(device)

    class TrainModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def forward(self, batch_data, evaluate_settings, inference_mode=None):
            features, labels = batch_data
            return torch.nn.functional.cross_entropy(self.classifier(features), labels)

    trainer = mlp.trainers.DefaultTrainer(
        torch.optim.SGD(classifier.parameters(), lr=0.01),
        classifier,
        batch_chunk_size=batch_chunk_size,
        use_mixed_precision=mixed_precision is not None,
        autocast_dtype=mixed_precision,
    )
    trainer.set_training_model(TrainModel())
    generator = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(BATCH_SIZE, NUM_FEATURES, generator=generator).to(device),
        torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=generator).to(device),
    )
    cuda_memory = None
    if device == "cuda":
        cuda = torch.cuda
        cuda_memory = (cuda.synchronize, cuda.memory_allocated, cuda.reset_peak_memory_stats, cuda.max_memory_allocated)
    return Step(
        train=lambda: trainer.train_on(batch),
        warm_up=None,  # nothing is built or traced on the first step
        gradient_bytes=sum(p.numel() * p.element_size() for p in classifier.parameters()),
        cuda_memory=cuda_memory,
    )


def tensorflow_step(batch_chunk_size, device, mixed_precision, num_threads, eager) -> Step:
    """The same MLP trained by mlpug's TensorFlow ``DefaultTrainer``: compiled (``tf.function`` traced once for
    ``batch_data_signature``, on the warm-up batch) or eager."""
    import tensorflow as tf

    import mlpug.tensorflow as mlp

    tf.config.threading.set_intra_op_parallelism_threads(num_threads)
    tf.config.threading.set_inter_op_parallelism_threads(num_threads)
    tf.keras.utils.set_random_seed(0)
    with tf.device("GPU:0" if device == "cuda" else "CPU:0"):
        layers = [tf.keras.Input(shape=(NUM_FEATURES,))]
        for _ in range(DEPTH):
            layers += [tf.keras.layers.Dense(WIDTH), tf.keras.layers.ReLU()]
        classifier = tf.keras.Sequential([*layers, tf.keras.layers.Dense(NUM_CLASSES)])
        loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        class TrainModel(tf.keras.Model):
            def __init__(self):
                super().__init__()
                self.classifier = classifier

            def call(self, batch_data, evaluate_settings, inference_mode=None):
                features, labels = batch_data
                return loss_function(labels, self.classifier(features))

        trainer = mlp.trainers.DefaultTrainer(
            tf.keras.optimizers.SGD(learning_rate=0.01),
            classifier,
            eager_mode=eager,
            batch_data_signature=(
                tf.TensorSpec((None, NUM_FEATURES), tf.float32),
                tf.TensorSpec((None,), tf.int32),
            ),
            batch_chunk_size=batch_chunk_size,
            use_mixed_precision=mixed_precision is not None,
            autocast_dtype=mixed_precision,
        )
        trainer.set_training_model(TrainModel())

        def make_batch(num_samples):
            generator = tf.random.Generator.from_seed(1)
            features = generator.normal((num_samples, NUM_FEATURES))
            return features, generator.uniform((num_samples,), 0, NUM_CLASSES, dtype=tf.int32)

        batch, warm_up_batch = make_batch(BATCH_SIZE), make_batch(WARM_UP_BATCH_SIZE)

    def train(data):
        trainer.train_on(data).loss.numpy()  # returns when the step has finished

    cuda_memory = None
    if device == "cuda":
        cuda_memory = (
            lambda: None,  # train() reads the loss, so the step has finished
            lambda: tf.config.experimental.get_memory_info("GPU:0")["current"],
            lambda: tf.config.experimental.reset_memory_stats("GPU:0"),
            lambda: tf.config.experimental.get_memory_info("GPU:0")["peak"],
        )
    return Step(
        train=lambda: train(batch),
        warm_up=lambda: train(warm_up_batch),
        gradient_bytes=sum(v.numpy().nbytes for v in classifier.trainable_variables),
        cuda_memory=cuda_memory,
    )


BACKENDS = {"pytorch": pytorch_step, "tensorflow": tensorflow_step}


def measure(backend, batch_chunk_size, device, mixed_precision, num_threads, eager):
    """Train one step; return {"step_bytes", "gradient_bytes", "seconds"} (runs in the measuring process)."""
    step = BACKENDS[backend](batch_chunk_size, device, mixed_precision, num_threads, eager)
    if step.cuda_memory is not None:
        synchronize, allocated, reset_peak, peak = step.cuda_memory
        step.train()  # warm-up (CUDA context, cuBLAS workspaces, tracing); peaks are resettable on CUDA
        synchronize()
        before = allocated()
        reset_peak()
        start = time.perf_counter()
        step.train()
        synchronize()
        seconds = time.perf_counter() - start
        step_bytes = peak() - before
        warm_up_bytes = 0
    else:
        # the baseline is taken before the warm-up: buffers the warm-up leaves in the process (the allocator's
        # cache, the gradient sum of the chunked graph, the traced graph) are reused by the step and so belong
        # to its memory; the warm-up's own peak (64 samples) is far below the step's
        before = current_rss_bytes()
        if step.warm_up is not None:
            step.warm_up()
        warm_up_bytes = current_rss_bytes() - before
        start = time.perf_counter()
        step.train()
        seconds = time.perf_counter() - start
        step_bytes = peak_rss_bytes() - before
    return {
        "step_bytes": step_bytes,
        "gradient_bytes": step.gradient_bytes,
        "warm_up_bytes": warm_up_bytes,
        "seconds": seconds,
    }


def run_in_fresh_process(batch_chunk_size, args) -> dict:
    command = [sys.executable, __file__, "--measure", str(batch_chunk_size or 0), "--device", args.device]
    command += ["--num-threads", str(args.num_threads), "--backend", args.backend]
    if args.mixed_precision:
        command += ["--mixed-precision", args.mixed_precision]
    if args.eager:
        command += ["--eager"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def backend_description(args) -> str:
    if args.backend == "tensorflow":
        import tensorflow as tf

        return f"tensorflow {tf.__version__} ({'eager' if args.eager else 'compiled, tf.function'})"
    import torch

    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    return f"torch {torch.__version__}{gpu}"


def summarise(values):
    return min(values), statistics.median(values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mixed-precision", choices=["bfloat16", "float16"], default=None)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="pytorch")
    parser.add_argument("--eager", action="store_true", help="TensorFlow: eager step instead of tf.function")
    parser.add_argument("--num-threads", type=int, default=1, help="CPU threads of the backend")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)  # internal: chunk size, 0=none
    args = parser.parse_args(argv)
    if args.eager and args.backend != "tensorflow":
        parser.error(f"--eager applies to --backend tensorflow only, not to --backend {args.backend}")

    if args.measure is not None:
        measured = measure(
            args.backend, args.measure or None, args.device, args.mixed_precision, args.num_threads, args.eager
        )
        print(json.dumps(measured))
        return

    variants = {"whole batch": None, f"chunks of {CHUNK_SIZE}": CHUNK_SIZE}
    results = {name: [] for name in variants}
    for _ in range(args.repetitions):
        for name, chunk_size in variants.items():  # alternate within every repetition
            results[name].append(run_in_fresh_process(chunk_size, args))

    kind = "peak CUDA memory allocated" if args.device == "cuda" else "peak RSS"
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"{backend_description(args)}, device {args.device}"
        f", precision {args.mixed_precision or 'float32'}, {args.num_threads} thread(s)"
    )
    print(f"batch {BATCH_SIZE}, MLP {NUM_FEATURES}-{DEPTH}x{WIDTH}-{NUM_CLASSES}, {args.repetitions} repetitions")
    print(
        f"{'variant':<16} {'step memory MiB':>22} {'activation MiB':>22} {'step seconds':>20} "
        f"{'kept by warm-up MiB':>22}   ({kind})"
    )
    summary = {}
    for name, runs in results.items():
        step = summarise([r["step_bytes"] / MiB for r in runs])
        activation = summarise([(r["step_bytes"] - r["gradient_bytes"]) / MiB for r in runs])
        seconds = summarise([r["seconds"] for r in runs])
        warm_up = summarise([r.get("warm_up_bytes", 0) / MiB for r in runs])
        summary[name] = (step, activation)
        print(
            f"{name:<16} {'min %.1f med %.1f' % step:>22} {'min %.1f med %.1f' % activation:>22} "
            f"{'min %.3f med %.3f' % seconds:>20} {'min %.1f med %.1f' % warm_up:>22}"
        )
    (whole_step, whole_activation), (chunked_step, chunked_activation) = summary.values()
    print(
        f"chunked / whole (medians): step memory {chunked_step[1] / whole_step[1]:.1%}, "
        f"activation memory {chunked_activation[1] / whole_activation[1]:.1%} (target <= 30%)"
    )


if __name__ == "__main__":
    main()
