"""Training runs with a CheckpointManager on any contract harness, in-process or as a subprocess.

Used by ``tests/contract/test_checkpoint*.py``. As a script (run from the repository root)::

    python -m tests.contract.scripts.checkpoint_worker resume --backend pytorch --dir D --out results.npz
    python -m tests.contract.scripts.checkpoint_worker train --backend pytorch --dir D --sleep 0.05
    python -m tests.contract.scripts.checkpoint_worker crash --backend pytorch --dir D --kills 20 --out chain.npz

``resume`` continues from ``D``'s training checkpoint and writes the final weights, optimizer state and the
logged batch losses; ``train`` prints ``batch <global_iter>`` after every batch (for signal tests); ``crash``
forks a chain of training children that each resume from the newest checkpoint (or start fresh when there is
none) and kills each with SIGKILL at a random moment while it trains and writes checkpoints (saves are slowed
down so that kills also land between the files of one checkpoint set); with ``--out`` a last child then
finishes the run and another one trains the same run uninterrupted in a fresh directory, and both write their
final weights and optimizer state (``<out>`` and ``<out>.straight.npz``). It prints a JSON report (one line) of
what every child could load.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import signal
import sys
import time

import numpy as np

from tests.contract.backends import HARNESSES, make_numpy_data

NUM_BATCHES, BATCH_SIZE, DATA_SEED, ORDER_SEED = 5, 8, 11, 7
WARM_UP_IMPORTS = {"pytorch": ("torch._dynamo",)}


class Recorder:
    """Callback factory: records (batch loss, window-average loss) pairs; can stop, sleep and print per batch."""

    @staticmethod
    def make(mlp, stop_at=None, sleep=0.0, print_batches=False, on_first_batch=None):
        class _Recorder(mlp.callbacks.Callback):
            def __init__(self):
                super().__init__("Recorder")
                self.losses = []

            def on_batch_training_completed(self, training_batch, logs):
                current = logs["current"]
                training = current["training"]
                self.losses.append((training["batch"]["loss"], training["window_average"]["loss"]))
                if stop_at is not None and current["global_iter"] == stop_at:
                    self.training_manager.stop_training()
                if sleep:
                    time.sleep(sleep)
                if print_batches:
                    print(f"batch {current['global_iter']}", flush=True)
                if on_first_batch is not None and len(self.losses) == 1:
                    on_first_batch()

        return _Recorder()


def run(
    harness,
    directory,
    init_seed=0,
    num_epochs=2,
    stop_at=None,
    resume_from=None,
    sleep=0.0,
    print_batches=False,
    checkpoint_kwargs=None,
    start=True,
    on_first_batch=None,
):
    """Train the harness problem on resumable, shuffled data with a CheckpointManager writing into ``directory``.

    Returns:
        ``(problem, manager, recorder)``; ``recorder.losses`` holds the logged
        ``(batch loss, window-average loss)`` pairs (floats); the window spans one epoch, so after a
        mid-epoch resume it mixes restored and new batches.
    """
    problem = harness.make_problem(seed=init_seed, num_batches=NUM_BATCHES, batch_size=BATCH_SIZE)
    mlp = problem.mlp
    features, labels = make_numpy_data(NUM_BATCHES * BATCH_SIZE, DATA_SEED)
    data = mlp.data.ResumableArrayBatches((features, labels), BATCH_SIZE, shuffle=True, seed=ORDER_SEED)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=problem.trainer)
    recorder = Recorder.make(mlp, stop_at, sleep, print_batches, on_first_batch)
    kwargs = dict(checkpoints_path=directory, metric_to_monitor="training.batch.loss", batch_level=True)
    kwargs.update(checkpoint_kwargs or {})
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        recorder,
        mlp.callbacks.CheckpointManager(**kwargs),
    ]
    manager = mlp.trainers.TrainingManager(
        problem.trainer, data, num_epochs=num_epochs, callbacks=callbacks, resume_from=resume_from
    )
    if start:
        manager.start_training()
    return problem, manager, recorder


def temporary_files(directory: str) -> list:
    """The temporary files in ``directory``: in the per-process temporary directories (``.mlpug.tmp-<pid>/``, which
    exist between writes too), or at the top level."""
    found = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if ".tmp" in name and os.path.isdir(path):
            found += [f"{name}/{inner}" for inner in os.listdir(path)]
        elif ".tmp" in name:
            found.append(name)
    return sorted(found)


def reporting_saver(mlp):
    """The backend's saver, printing ``saved <file name> <global_iter or ->`` after every file it wrote."""

    class ReportingSaver(mlp.checkpointing.CheckpointSaver):
        def save(self, checkpoint, path):
            super().save(checkpoint, path)
            print(f"saved {os.path.basename(path)} {checkpoint.get('global_iter', '-')}", flush=True)

    return ReportingSaver()


def slow_saver(mlp, delay: float):
    """The backend's saver, sleeping ``delay`` seconds before renaming every file it wrote and after it (widens the
    moments while a file is written and between the files of one checkpoint set, so random kills land there too)."""

    class SlowSaver(mlp.checkpointing.CheckpointSaver):
        def save_arrays(self, arrays, metadata, path):  # the temporary file is complete but not yet renamed
            super().save_arrays(arrays, metadata, path)
            time.sleep(delay)

        def save(self, checkpoint, path):
            super().save(checkpoint, path)
            time.sleep(delay)

    return SlowSaver()


def to_numpy_tree(value):
    """Nested containers of tensors -> the same with NumPy arrays (torch / TF / NumPy leaves)."""
    if isinstance(value, dict):
        return {key: to_numpy_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_numpy_tree(item) for item in value]
    if hasattr(value, "numpy"):
        return np.array(value.detach().cpu().numpy() if hasattr(value, "detach") else value.numpy())
    return value


def flatten(value, prefix="") -> dict:
    """``{"a/b/0": leaf}`` for nested dicts and lists."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def _leaf(value):
    """Arrays as they are; other leaves (numbers, str, None) as their repr, so that .npz needs no pickle."""
    return value if isinstance(value, np.ndarray) else np.asarray(repr(value))


def results(problem, recorder) -> dict:
    """Weights, optimizer state (flattened, NumPy) and the logged losses of a finished run."""
    state = to_numpy_tree(problem.trainer.get_state())
    flat = {f"weights/{k}": _leaf(v) for k, v in flatten(state["model_components"]).items()}
    flat.update({f"optimizers/{k}": _leaf(v) for k, v in flatten(state["optimizers"]).items()})
    flat["losses"] = np.asarray(recorder.losses, dtype=np.float64)
    return flat


# ----- modes -----
def resume_mode(args) -> None:
    harness = HARNESSES[args.backend]()
    problem, _, recorder = run(harness, args.dir, init_seed=123, resume_from="latest", num_epochs=args.num_epochs)
    np.savez(args.out, **results(problem, recorder))


def train_mode(args) -> None:
    """Checkpoints only at epoch ends, every file written reported as ``saved <file name> <global_iter>``: a
    training checkpoint written mid-epoch can only be the one of the end phase (SIGTERM)."""
    harness = HARNESSES[args.backend]()
    checkpoint_kwargs = {"batch_level": False, "metric_to_monitor": None, "saver": reporting_saver(harness.mlp)}
    run(harness, args.dir, num_epochs=args.num_epochs, sleep=args.sleep, print_batches=True,
        checkpoint_kwargs=checkpoint_kwargs)  # fmt: skip


def crash_mode(args) -> None:
    """Fork a training child per round; SIGKILL it at a random moment; the next child must load the newest file."""
    harness = HARNESSES[args.backend]()  # imports the backend only; no op runs in this process before forking
    for module in WARM_UP_IMPORTS.get(args.backend, ()):  # lazily imported modules, so each child starts fast
        importlib.import_module(module)
    rng = random.Random(args.seed)
    reports = []
    checkpoint_kwargs = {
        "archive_last_model_checkpoint_every": 3,
        "keep_last": 2,
        "saver": slow_saver(harness.mlp, 0.01),
    }
    for _ in range(args.kills):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: load the newest checkpoint (when there is one), report, train and save until killed
            os.close(read_fd)
            try:
                training_path = os.path.join(args.dir, "model-training-checkpoint.safetensors")
                resume = "latest" if os.path.exists(training_path) else None  # none yet: killed before the first
                problem, manager, _ = run(
                    harness,
                    args.dir,
                    num_epochs=args.num_epochs,
                    resume_from=resume,
                    checkpoint_kwargs=checkpoint_kwargs,
                    start=False,
                    on_first_batch=lambda fd=write_fd: os.write(fd, b'{"started": true}\n'),
                )
                loaded = None
                if resume:
                    state = problem.mlp.load_training_checkpoint(manager.callbacks[-1].training_checkpoint_path)
                    problem.mlp.load_model_checkpoint(manager.callbacks[-1].file_names.latest_model)
                    loaded = state["global_iter"]
                os.write(write_fd, (json.dumps({"loaded": loaded}) + "\n").encode())
                manager.start_training()
            except BaseException as error:  # reported to the parent, which fails the test
                os.write(write_fd, (json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n").encode())
                os._exit(3)
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as reader:
            line = reader.readline()
            report = json.loads(line) if line else {"error": "child died before reporting"}
            started = reader.readline()  # after its first batch: the child is writing checkpoints from now on
            report["started"] = bool(started) and json.loads(started).get("started", False)
            time.sleep(rng.uniform(0.02, args.max_delay))  # the child trains and writes checkpoints meanwhile
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        report["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        report["temporary_files_left"] = temporary_files(args.dir)
        latest, training = (
            os.path.join(args.dir, f"model-{kind}.safetensors")
            for kind in ("latest-model-checkpoint", "training-checkpoint")
        )
        report["between_files"] = (  # the set's first file is newer than its last one: killed in between
            os.path.exists(latest)
            and os.path.exists(training)
            and os.stat(latest).st_mtime_ns > os.stat(training).st_mtime_ns
        )
        reports.append(report)
    if args.out:
        _in_child(lambda: _finish(harness, args.dir, args.num_epochs, args.out, checkpoint_kwargs))
        straight = os.path.join(args.dir, "straight")
        _in_child(lambda: _finish(harness, straight, args.num_epochs, args.out + ".straight.npz", checkpoint_kwargs))
    print(json.dumps({"reports": reports}), flush=True)


def _finish(harness, directory, num_epochs, out, checkpoint_kwargs) -> None:
    resume = "latest" if os.path.exists(os.path.join(directory, "model-training-checkpoint.safetensors")) else None
    problem, _, recorder = run(
        harness, directory, num_epochs=num_epochs, resume_from=resume, checkpoint_kwargs=checkpoint_kwargs
    )
    results_of_run = results(problem, recorder)
    del results_of_run["losses"]  # the chain's losses are spread over its children
    np.savez(out, **results_of_run)


def _in_child(job) -> None:
    """Run ``job`` in a forked child (this process runs no backend op) and raise when it fails."""
    pid = os.fork()
    if pid == 0:
        try:
            job()
        except BaseException:
            import traceback

            traceback.print_exc()
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise RuntimeError(f"a finishing child failed (status {status})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["resume", "train", "crash"])
    parser.add_argument("--backend", required=True, choices=sorted(HARNESSES))
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out")
    parser.add_argument("--num-epochs", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max-delay", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    {"resume": resume_mode, "train": train_mode, "crash": crash_mode}[args.mode](args)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
