"""Peak memory of one training step: a batch of 4096 in one piece vs in chunks of 512 (gradient accumulation).

Model (activations dominate): MLP 256 -> 12 x [Linear 1024 + ReLU] -> 10, float32, SGD without momentum
(no optimizer state). Per sample the forward pass keeps about 12 x 2 x 1024 float32 values (Linear output and
ReLU output of every layer) = 96 KiB, so a batch of 4096 keeps about 384 MiB of activations; the parameters
(and their gradients) are 11.8 M floats = 45 MiB each.

Both variants run mlpug's PyTorch ``DefaultTrainer.train_on`` once, with ``batch_chunk_size=None`` or ``512``.

* CPU: every measurement runs in a fresh process (the peak RSS, ``ru_maxrss``, cannot be reset). The process
  builds model, optimizer and batch, reads its current RSS (``/proc/self/statm``), trains one step and reads its
  peak RSS. **Step memory** = peak RSS - RSS before the step (bytes): activations, gradients and temporaries.
  **Activation memory** = step memory - gradient bytes (the gradients, 45 MiB, are allocated by both variants).
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  memory allocated before the step, in the same process.

The two variants alternate in every repetition, so that load from other processes affects both alike; the
script prints the min and median of each and the ratio chunked / whole (target: activation memory <= 30 %).

    .venv/bin/python benchmarks/memory.py --repetitions 5
    .venv/bin/python benchmarks/memory.py --repetitions 5 --device cuda       # where a GPU is available
    .venv/bin/python benchmarks/memory.py --mixed-precision bfloat16          # the same under bf16 autocast
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

BATCH_SIZE, CHUNK_SIZE = 4096, 512
NUM_FEATURES, WIDTH, DEPTH, NUM_CLASSES = 256, 1024, 12, 10
MiB = 2**20


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(batch_chunk_size, device, mixed_precision, num_threads):
    """Train one step; return {"step_bytes", "gradient_bytes", "seconds"} (runs in the measuring process)."""
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
    gradient_bytes = sum(p.numel() * p.element_size() for p in classifier.parameters())
    if device == "cuda":
        trainer.train_on(batch)  # warm-up (CUDA context, cuBLAS workspaces); peaks are resettable on CUDA
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train_on(batch)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        step_bytes = torch.cuda.max_memory_allocated() - before
    else:
        before = current_rss_bytes()
        start = time.perf_counter()
        trainer.train_on(batch)
        seconds = time.perf_counter() - start
        step_bytes = peak_rss_bytes() - before
    return {"step_bytes": step_bytes, "gradient_bytes": gradient_bytes, "seconds": seconds}


def run_in_fresh_process(batch_chunk_size, args) -> dict:
    command = [sys.executable, __file__, "--measure", str(batch_chunk_size or 0), "--device", args.device]
    command += ["--num-threads", str(args.num_threads)]
    if args.mixed_precision:
        command += ["--mixed-precision", args.mixed_precision]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def summarise(values):
    return min(values), statistics.median(values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mixed-precision", choices=["bfloat16", "float16"], default=None)
    parser.add_argument("--num-threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)  # internal: chunk size, 0=none
    args = parser.parse_args(argv)

    if args.measure is not None:
        print(json.dumps(measure(args.measure or None, args.device, args.mixed_precision, args.num_threads)))
        return

    variants = {"whole batch": None, f"chunks of {CHUNK_SIZE}": CHUNK_SIZE}
    results = {name: [] for name in variants}
    for _ in range(args.repetitions):
        for name, chunk_size in variants.items():  # alternate within every repetition
            results[name].append(run_in_fresh_process(chunk_size, args))

    import torch

    kind = "peak CUDA memory allocated" if args.device == "cuda" else "peak RSS"
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
        + f", precision {args.mixed_precision or 'float32'}, {args.num_threads} thread(s)"
    )
    print(f"batch {BATCH_SIZE}, MLP {NUM_FEATURES}-{DEPTH}x{WIDTH}-{NUM_CLASSES}, {args.repetitions} repetitions")
    print(f"{'variant':<16} {'step memory MiB':>22} {'activation MiB':>22} {'step seconds':>20}   ({kind})")
    summary = {}
    for name, runs in results.items():
        step = summarise([r["step_bytes"] / MiB for r in runs])
        activation = summarise([(r["step_bytes"] - r["gradient_bytes"]) / MiB for r in runs])
        seconds = summarise([r["seconds"] for r in runs])
        summary[name] = (step, activation)
        print(
            f"{name:<16} {'min %.1f med %.1f' % step:>22} {'min %.1f med %.1f' % activation:>22} "
            f"{'min %.3f med %.3f' % seconds:>20}"
        )
    (whole_step, whole_activation), (chunked_step, chunked_activation) = summary.values()
    print(
        f"chunked / whole (medians): step memory {chunked_step[1] / whole_step[1]:.1%}, "
        f"activation memory {chunked_activation[1] / whole_activation[1]:.1%} (target <= 30%)"
    )


if __name__ == "__main__":
    main()
