"""Several JAX processes (``jax.distributed`` with the gloo CPU collectives, on the loopback address): two processes
of two CPU devices each train as one process on the global batch, and only process 0 writes checkpoints."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import mlpug.jax as mlp
from tests.jax.test_trainer import MLP

TIMEOUT_S = 240
"""Seconds one run of the worker may take (both processes together), then it is killed."""


def run_worker(directory, num_processes, devices_per_process):
    environment = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices_per_process), "MLPUG_DISTRIBUTED_TIMEOUT_S": "60"}
    environment.pop("XLA_FLAGS", None)
    completed = subprocess.run(
        [sys.executable, "-m", "tests.jax.distributed_worker", str(directory), str(num_processes), str(TIMEOUT_S - 20)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return dict(np.load(directory / "results.npz"))


def test_two_processes_train_as_one_process_on_the_global_batch(tmp_path):
    """2 processes x 2 CPU devices, 4 samples per process per batch (a global batch of 8) vs one process on one
    device with batches of 8: 10 steps with metrics, validation and checkpoints. Process 1 starts from other
    weights (another seed): process 0's are broadcast."""
    two = run_worker(tmp_path / "two", 2, 2)
    one = run_worker(tmp_path / "one", 1, 1)
    assert int(two["world_size"]) == 2 and int(one["world_size"]) == 1
    assert len(two["losses"]) == len(one["losses"]) == 10
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(two["accuracies"], one["accuracies"], rtol=0, atol=1e-6)
    assert float(two["validation_accuracy"]) == pytest.approx(float(one["validation_accuracy"]), abs=1e-6)
    names = [name for name in one if name.startswith("weight.")]
    assert names and set(names) == {name for name in two if name.startswith("weight.")}
    differences = {name: float(np.max(np.abs(two[name] - one[name]))) for name in names}
    assert max(differences.values()) <= 1e-6, differences
    contexts = sorted((tmp_path / "two").glob("context_*.txt"))
    assert [path.read_text() for path in contexts] == ["0 2 True 4", "1 2 False 4"]
    assert sorted(path.name for path in (tmp_path / "two" / "checkpoints").iterdir()) == [
        "model-latest-model-checkpoint.safetensors",
        "model-training-checkpoint.safetensors",
    ]
    checkpoint = mlp.load_training_checkpoint(
        str(tmp_path / "two" / "checkpoints" / "model-training-checkpoint.safetensors")
    )
    print(f"2 processes vs 1: largest weight difference {max(differences.values()):.3g}")
    assert checkpoint["mlpug"]["backend"] == "jax"


def test_one_process_strategies_are_refused_under_several_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'single_process' trains in one process, but jax.process_count\(\) is 2"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), MLP(0), strategy="single_process")
    with pytest.raises(ValueError, match="num_processes must be an int >= 1, got 0"):
        mlp.distributed.launch(print, num_processes=0)
