"""Stress test: does a finished 2-process data-parallel job exit 0? (issue 25, item 7)

Runs many short, complete 2-process trainings (gloo on the loopback address, 1 thread per process) and counts the
runs where a rank exited with a non-zero status (or a signal) although both ranks had finished training and
written their results: the abort this guards against is ``terminate called without an active exception`` at
interpreter exit, when a process group is left to the interpreter's teardown instead of being destroyed.

Every run is one of two kinds, alternating: plain (synchronous validation) and asynchronous validation
(``run_async=True``: a worker thread evaluates), with a ``CheckpointManager`` writing in the background. Each rank
trains a tiny MLP (2 epochs of 3 batches of 4 samples per rank), writes ``done-rank<k>`` and returns (rank 1
``--rank1-delay-s`` later than rank 0; default at once, as after a real training, where the ranks end together);
nothing is called after training: mlpug tears down the process group it created at exit. Processes are started
with the environment ``torchrun`` sets (``--launcher env``, cheap) or by ``torchrun`` itself (``--launcher
torchrun``); a run still going after ``--timeout-s`` is killed and counted as hung.

``--without-teardown`` unregisters mlpug's exit handler in the workers (and drops mlpug's reference to the group),
which measures the behaviour before it: the process group left to the interpreter's teardown. ``--plain-torch``
runs the same check without mlpug (``init_process_group("gloo")``, one all-reduce, ``destroy_process_group()``
before exiting unless ``--without-teardown``): the abort is torch's, and more frequent there.

    .venv/bin/python benchmarks/ddp_exit.py --runs 40
    .venv/bin/python benchmarks/ddp_exit.py --runs 40 --without-teardown
    .venv/bin/python benchmarks/ddp_exit.py --runs 20 --plain-torch --rank1-delay-s 0.1 [--without-teardown]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABORT_TEXT = "terminate called"


def _worker(out_dir: str, run_async: bool, without_teardown: bool, rank1_delay_s: float) -> None:
    import torch

    import mlpug.pytorch as mlp

    torch.set_num_threads(1)
    mlp.set_random_seed(0)
    inputs = torch.randn(2 * 3 * 4, 4)
    targets = inputs.sum(dim=1, keepdim=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    class TrainModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch, evaluate_settings, inference_mode=None):
            batch_inputs, batch_targets = batch
            return torch.nn.functional.mse_loss(self.model(batch_inputs), batch_targets)

    trainer = mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.01), model)
    if without_teardown:
        import atexit

        from mlpug.pytorch import distributed

        atexit.unregister(distributed._tear_down_at_exit)
        distributed._created_group = None  # and no reference of mlpug's to the group: as before the handler existed
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    validation = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=8)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.TestMetricsLogger(validation, "validation", evaluator, run_async=run_async),
        mlp.callbacks.CheckpointManager(checkpoints_path=os.path.join(out_dir, "checkpoints")),
    ]
    training_dataset = mlp.data.ResumableArrayBatches((inputs, targets), 4, shuffle=True, seed=1)
    manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=2, callbacks=callbacks)
    trainer.set_training_model(TrainModel())
    manager.start_training()
    Path(out_dir, f"done-rank{os.environ['RANK']}").write_text("done")
    if os.environ["RANK"] == "1":
        time.sleep(rank1_delay_s)


def _plain_worker(without_teardown: bool, rank1_delay_s: float) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))
    if os.environ["RANK"] == "1":
        time.sleep(rank1_delay_s)
    if not without_teardown:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _commands(launcher: str, out_dir: str, run_async: bool, args: argparse.Namespace) -> list[tuple[list, dict]]:
    """The processes of one run: (command, environment) each."""
    worker = [__file__, "--worker", out_dir, "--rank1-delay-s", str(args.rank1_delay_s)]
    worker += ["--async"] if run_async else []
    worker += ["--without-teardown"] if args.without_teardown else []
    worker += ["--plain-torch"] if args.plain_torch else []
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = str(_free_port())
    if launcher == "torchrun":
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", port, "--monitor-interval", "0.2", *worker,
        ]  # fmt: skip
        return [(command, environment)]
    return [
        (
            [sys.executable, *worker],
            dict(environment, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
            | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
        )
        for rank in range(2)
    ]


def _run_once(launcher: str, run_async: bool, args: argparse.Namespace) -> dict:
    timeout_s = args.timeout_s
    with tempfile.TemporaryDirectory(prefix="mlpug-ddp-exit-") as out_dir:
        start = time.monotonic()
        processes = [
            subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for command, environment in _commands(launcher, out_dir, run_async, args)
        ]
        codes, outputs, hung = [], [], False
        for process in processes:
            try:
                output, _ = process.communicate(timeout=max(timeout_s - (time.monotonic() - start), 1))
            except subprocess.TimeoutExpired:
                hung = True
                for other in processes:
                    other.kill()
                output, _ = process.communicate()
            codes.append(process.returncode)
            outputs.append(output)
        finished = args.plain_torch or all(Path(out_dir, f"done-rank{rank}").exists() for rank in range(2))
        return {
            "codes": codes,
            "finished": finished,
            "hung": hung,
            "aborted": ABORT_TEXT in "".join(outputs),
            "seconds": time.monotonic() - start,
            "output": "".join(outputs),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--launcher", choices=["env", "torchrun"], default="env")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="per run")
    parser.add_argument("--rank1-delay-s", type=float, default=0.0, help="rank 1 ends this much later")
    parser.add_argument("--without-teardown", action="store_true", help="unregister mlpug's exit handler")
    parser.add_argument("--plain-torch", action="store_true", help="torch.distributed alone, without mlpug")
    parser.add_argument("--worker", metavar="OUT_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--async", dest="run_async", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker and args.plain_torch:
        _plain_worker(args.without_teardown, args.rank1_delay_s)
        return
    if args.worker:
        _worker(args.worker, args.run_async, args.without_teardown, args.rank1_delay_s)
        return
    import torch

    print(
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n"
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
        f"{torch.__version__}, launcher {args.launcher}, rank 1 ends {args.rank1_delay_s:g} s later"
        + (", plain torch" if args.plain_torch else ""),
        flush=True,
    )
    failed, hung, aborted, unfinished = [], 0, 0, 0
    start = time.monotonic()
    for index in range(args.runs):
        result = _run_once(args.launcher, index % 2 == 1, args)
        hung += result["hung"]
        aborted += result["aborted"]
        unfinished += not result["finished"]
        if any(code != 0 for code in result["codes"]):
            failed.append(index)
            kind = "torch alone" if args.plain_torch else "async" if index % 2 else "plain"
            print(f"run {index} ({kind}): exit codes {result['codes']}, finished={result['finished']}", flush=True)
            print("    " + "\n    ".join(result["output"].strip().splitlines()[-6:]), flush=True)
        if (index + 1) % 10 == 0:
            print(f"{index + 1} runs, {time.monotonic() - start:.0f} s: {len(failed)} with a non-zero exit", flush=True)
    print(
        f"{args.runs} runs in {time.monotonic() - start:.0f} s: {len(failed)} with a non-zero exit "
        f"({aborted} with '{ABORT_TEXT}'), {unfinished} not finished, {hung} hung"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
