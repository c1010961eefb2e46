"""mlpug beside the well-known trainers (issue 13): one Fashion-MNIST epoch in every framework, as ratios to a raw
loop of the same process.

Job: MLP 784-256-256-10, Adam lr 1e-3, batch 64, one epoch of the real Fashion-MNIST training set (938 batches),
1 thread; afterwards (not timed) the training-set loss and the test accuracy (10k test images) of the trained
model as a correctness check. Every framework runs in a "lean" configuration (as few callbacks and as little
logging as it allows) and a "default" one (what a new user gets); what each runs is in the table and in the
docstrings of the process scripts. This driver runs five processes one after the other (Keras fixes its
backend at import, and frameworks of one backend must share a process to be compared in interleaved rounds):

(a) ``torch_peers.py``: raw PyTorch loop (floor), mlpug, Lightning, Ignite, accelerate, pytorch-accelerated;
(b) ``keras_torch.py``: raw PyTorch loop (floor), Keras 3 with the torch backend;
(c) ``tensorflow_peers.py``: raw ``tf.function`` loop (floor), mlpug's TensorFlow backend, Keras 3 (``tf.keras``);
(d) ``jax_peers.py``: raw ``jax.jit`` loop over a Flax NNX model (floor), mlpug's JAX backend (also with
    ``steps_per_execution=32``);
(e) ``keras_jax.py``: the same raw ``jax.jit`` loop (floor), Keras 3 on the JAX backend (also with
    ``steps_per_execution=32``).

``--job tiny`` (with ``--processes jax,keras-jax``, the processes that take a job) runs the JAX processes on the
dispatch-bound job of ``common.JAX_JOBS`` instead (MLP 196-32-10 on 2x2-pooled images, batch 32) and writes
``results-tiny.md`` / ``results-tiny.json``.

In every process all variants run once per round, in rotating order; round 0 is cold and left out; the figure of
a variant is the median and the range (min - max) over the rounds of (its epoch time / the floor's epoch time in
the same round). Ratios of separate processes are not comparable on a noisy machine; within one they are.
Writes ``results.md`` and ``results.json`` beside this file (command, date, machine, package versions).

    make benchmark-peers                                   # sets up .venv-peers and the data, then runs this
    .venv-peers/bin/python benchmarks/peers/run.py --rounds 10
    .venv-peers/bin/python benchmarks/peers/run.py --rounds 1 --max-batches 50 --out-dir /tmp/peers  # smoke test
    # the JAX processes alone, each job (as recorded in benchmarks/peers/results-jax/):
    .venv/bin/python benchmarks/peers/run.py --processes jax,keras-jax --rounds 10 --out-dir /tmp/peers-jax
    .venv/bin/python benchmarks/peers/run.py --processes jax,keras-jax --job tiny --rounds 10 --out-dir /tmp/peers-jax
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
PROCESSES = {
    "pytorch": ("torch_peers.py", {}),
    "keras-torch": ("keras_torch.py", {"KERAS_BACKEND": "torch"}),
    "tensorflow": ("tensorflow_peers.py", {}),
    "jax": ("jax_peers.py", {}),
    "keras-jax": ("keras_jax.py", {"KERAS_BACKEND": "jax"}),
}
# The processes that take ``--job`` (``common.JAX_JOBS``); the others run the job ``mlp`` only.
JOB_PROCESSES = ("jax", "keras-jax")
# A Keras process has no mlpug of its own: its rows are compared with mlpug's rows of this process (the same floor,
# but another process: less comparable than ratios within one process).
KERAS_REFERENCE = {"Keras (torch backend)": "PyTorch", "Keras (JAX backend)": "JAX"}
# The issue-28 targets of the JAX backend (median ratios): mlpug without callbacks within this factor of the raw
# jax.jit loop, and mlpug with the standard callbacks and K=32 at most this factor of Keras' K=32 time.
JAX_LEAN_TARGET = 1.05
JAX_K32_TARGET = 0.8


def machine():
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def git_commit():
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_process(name, rounds, max_batches, only, work_dir, job="mlp"):
    script, env = PROCESSES[name]
    out = work_dir / f"{name}.json"
    command = [sys.executable, str(HERE / script), "--rounds", str(rounds), "--out", str(out)]
    if name in JOB_PROCESSES:
        command += ["--job", job]
    if max_batches is not None:
        command += ["--max-batches", str(max_batches)]
    if only:
        command += ["--only", only]
    start = time.perf_counter()
    subprocess.run(command, env={**os.environ, **env}, check=True)
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - start
    return result


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def mlpug_row(process, config="default"):
    return next((r for r in process["rows"] if r["framework"].startswith("mlpug") and r["config"] == config), None)


def checks(processes):
    """The questions of issues 13 and 28, answered from the median ratios: is mlpug's default within 1.05x of the
    floor, and ahead of (a lower median ratio than) every peer's default configuration? On JAX (issue 28): is mlpug
    without callbacks within 1.05x of the raw ``jax.jit`` loop, and mlpug with the standard callbacks and K=32 at
    most 0.8x of Keras' K=32 time? A Keras process without an mlpug of its own is compared with mlpug's process of
    the same floor (``KERAS_REFERENCE``: another process, less comparable)."""
    lines = []
    by_name = {p["process"]: p for p in processes}
    for process in processes:
        mlpug = mlpug_row(process)
        if mlpug is not None:
            within = "yes" if mlpug["ratio_median"] <= 1.05 else "no"
            lines.append(
                f"- {process['process']}: {mlpug['framework']} default / floor {mlpug['ratio_median']:.3f} "
                f"[{mlpug['ratio_min']:.3f} - {mlpug['ratio_max']:.3f}]: within 1.05x: **{within}**"
            )
    lean = mlpug_row(by_name["JAX"], "lean") if "JAX" in by_name else None
    if lean is not None:
        within = "yes" if lean["ratio_median"] <= JAX_LEAN_TARGET else "no"
        lines.append(
            f"- JAX: {lean['framework']} lean (no callbacks) / raw jax.jit {lean['ratio_median']:.3f} "
            f"[{lean['ratio_min']:.3f} - {lean['ratio_max']:.3f}]: within {JAX_LEAN_TARGET}x: **{within}**"
        )
    for process in processes:
        reference_process, where = process, ""
        if mlpug_row(process) is None and KERAS_REFERENCE.get(process["process"]) in by_name:
            reference_process = by_name[KERAS_REFERENCE[process["process"]]]
            where = f" (of the {reference_process['process']} process)"
        for row in process["rows"]:
            if row["framework"].startswith("mlpug") or row["config"] not in ("default", "default, K=32"):
                continue
            reference = mlpug_row(reference_process, row["config"])
            if reference is None:
                continue
            if row["config"] == "default":
                ahead = "yes" if reference["ratio_median"] < row["ratio_median"] else "no"
                lines.append(
                    f"- {row['framework']} default {row['ratio_median']:.3f} vs {reference['framework']} default "
                    f"{reference['ratio_median']:.3f}{where}: mlpug ahead: **{ahead}**"
                )
            else:
                share = reference["ratio_median"] / row["ratio_median"]
                target = f", at most {JAX_K32_TARGET}x: **{'yes' if share <= JAX_K32_TARGET else 'no'}**"
                lines.append(
                    f"- {row['framework']} default, K=32 {row['ratio_median']:.3f} vs {reference['framework']} "
                    f"default, K=32 {reference['ratio_median']:.3f}{where}: mlpug / Keras {share:.3f}"
                    + (target if reference["framework"] == "mlpug (JAX)" else "")
                )
    return lines


def markdown(result):
    job = result.get("job", "mlp")
    title = (
        "# mlpug beside the well-known trainers: one Fashion-MNIST epoch (issues 13 and 28)"
        if job == "mlp"
        else f"# mlpug beside Keras on JAX: the {job} job (issue 28)"
    )
    lines = [
        title,
        "",
        "Generated by `benchmarks/peers/run.py` (see its docstring for the job and the method).",
        "",
        f"- command: `{result['command']}`",
        f"- job: {job}: {common.JAX_JOBS[job]['what']}" + ("" if job == "mlp" else " (the JAX processes only)"),
        f"- date: {result['date']}; total {result['seconds'] / 60:.1f} min",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['memory']}, "
        f"{result['machine']['platform']}, Python {result['machine']['python']}",
        f"- load average before: {', '.join(f'{x:.2f}' for x in result['load_average_before'])}; after: "
        f"{', '.join(f'{x:.2f}' for x in result['load_average_after'])}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- mlpug commit: {result['mlpug_commit']}",
        f"- rounds: 1 cold (left out) + {result['rounds']}; ratio = epoch wall time / the floor's in the same round "
        "of the same process; median [min - max] over the rounds; the CPU-time ratio is the same with the process's "
        "CPU time (less affected by other processes taking the core; more than the wall time where a framework "
        "runs threads of its own)",
        "",
        "| process | framework | config | what runs | epoch s, median | ratio to floor, median [min - max] | "
        "CPU-time ratio, median [min - max] | setup s, median | train loss | test acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for process in result["processes"]:
        for row in process["rows"]:
            setup = sorted(row["setup_s"])[len(row["setup_s"]) // 2] if row["setup_s"] else None
            lines.append(
                f"| {process['process']} | {row['framework']} | {row['config']} | {row['what']} | "
                f"{row['wall_median_s']:.3f} | {row['ratio_median']:.3f} [{row['ratio_min']:.3f} - "
                f"{row['ratio_max']:.3f}] | {row['cpu_ratio_median']:.3f} [{row['cpu_ratio_min']:.3f} - "
                f"{row['cpu_ratio_max']:.3f}] | {fmt(setup)} | "
                f"{fmt(row['train_loss'], 4)} | {fmt(row['test_accuracy'], 4)} |"
            )
    lines += ["", "Checks (median ratios):", ""] + checks(result["processes"])
    lines += [
        "",
        "Processes: " + "; ".join(f"{p['process']} {p['process_seconds']:.0f} s" for p in result["processes"]),
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds after the cold round 0, in every process")
    parser.add_argument(
        "--processes", default=",".join(PROCESSES), help="comma-separated subset of " + ", ".join(PROCESSES)
    )
    parser.add_argument("--max-batches", type=int, help="train on the first N batches only (smoke tests)")
    parser.add_argument("--only", help="comma-separated framework names beside the floors (smoke tests)")
    parser.add_argument(
        "--job",
        choices=sorted(common.JAX_JOBS),
        default="mlp",
        help="the job of the processes " + ", ".join(JOB_PROCESSES) + " (default: mlp, the job of every process)",
    )
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where results.md and results.json go")
    args = parser.parse_args()
    names = [name.strip() for name in args.processes.split(",") if name.strip()]
    unknown = set(names) - set(PROCESSES)
    if unknown:
        parser.error(f"unknown processes {sorted(unknown)}; choose from {list(PROCESSES)}")
    if args.job != "mlp" and set(names) - set(JOB_PROCESSES):
        parser.error(f"--job {args.job} runs the processes {list(JOB_PROCESSES)} only: pass --processes")

    start = time.perf_counter()
    result = {
        "command": shlex.join([os.path.relpath(sys.executable)] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "versions": common.versions(),
        "mlpug_commit": git_commit(),
        "job": args.job,
        "rounds": args.rounds,
        "max_batches": args.max_batches,
        "load_average_before": os.getloadavg(),
        "processes": [],
    }
    with tempfile.TemporaryDirectory(prefix="mlpug-peers-") as work_dir:
        for index, name in enumerate(names, start=1):
            common.progress(f"[{index}/{len(names)}] {name} ({time.perf_counter() - start:.0f} s so far)")
            result["processes"].append(
                run_process(name, args.rounds, args.max_batches, args.only, Path(work_dir), args.job)
            )
    result["load_average_after"] = os.getloadavg()
    result["seconds"] = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "results" if args.job == "mlp" else f"results-{args.job}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown(result))
    common.progress(f"done in {result['seconds'] / 60:.1f} min: {args.out_dir / f'{stem}.md'}")
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
