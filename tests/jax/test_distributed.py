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


def run_worker(directory, num_processes, devices_per_process, steps_per_execution=1):
    environment = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices_per_process), "MLPUG_DISTRIBUTED_TIMEOUT_S": "60"}
    environment.pop("XLA_FLAGS", None)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.jax.distributed_worker",
            str(directory),
            str(num_processes),
            str(TIMEOUT_S - 20),
            str(steps_per_execution),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return dict(np.load(directory / "results.npz"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The run of one process on one device with batches of 8, one step per call: what every run must equal."""
    return run_worker(tmp_path_factory.mktemp("one"), 1, 1)


def assert_same_training(two, one):
    """Equal to 1e-6: the batch losses, accuracies, validation accuracy and final weights; the auxiliary results
    reach the metric as the model wrote them (process 0's, as ``results.npz`` keeps them)."""
    assert int(two["world_size"]) == 2 and int(one["world_size"]) == 1
    assert two["auxiliary_keys"].tolist() == one["auxiliary_keys"].tolist() == [["probabilities", "logits"]]
    assert two["loss_devices"].tolist() == one["loss_devices"].tolist() == [1]  # the loss: on this process's device
    assert len(two["losses"]) == len(one["losses"]) == 12
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(two["accuracies"], one["accuracies"], rtol=0, atol=1e-6)
    assert float(two["validation_accuracy"]) == pytest.approx(float(one["validation_accuracy"]), abs=1e-6)
    # sum(correct) / inputs.num_samples is the accuracy only when num_samples counts this process's part; a metric
    # weighted by a count that differs between the processes' parts is reduced to the global batch's value
    np.testing.assert_allclose(two["weighted"][:, 0], two["accuracies"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(two["weighted"], one["weighted"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(two["validation_weighted"], one["validation_weighted"], rtol=0, atol=1e-6)
    assert float(two["validation_weighted"][0]) == pytest.approx(float(two["validation_accuracy"]), abs=1e-6)
    assert one["batch_sizes"].tolist() == [8, 8, 8, 8, 8, 4] * 2  # the logged batch_size: samples per process
    assert two["batch_sizes"].tolist() == [4, 4, 4, 4, 4, 2] * 2
    names = [name for name in one if name.startswith("weight.")]
    assert names and set(names) == {name for name in two if name.startswith("weight.")}
    differences = {name: float(np.max(np.abs(two[name] - one[name]))) for name in names}
    assert max(differences.values()) <= 1e-6, differences
    return differences


REFUSED = {
    "num_samples": "ValueError: the training model returned num_samples=",
    "run_async": "RuntimeError: asynchronous evaluation (TestMetricsLogger(run_async=True)) cannot run with 2 JAX",
    "run_async_logger": "RuntimeError: asynchronous evaluation (TestMetricsLogger(run_async=True)) cannot run",
    "auxiliary_sum": "ValueError: auxiliary_results['correct'] is a 0-d array (shape ()) while 2 JAX processes train",
    "batch_number": "ValueError: batch[2] is a value without a sample axis (shape ()",
    "training_sizes": "ValueError: with 2 JAX processes, this process's training batches would have [4, 1] samples",
    "evaluation_sizes": "ValueError: with 2 JAX processes, this process's evaluation batches would have [4, 3] samples",
    "uneven_shards": "ValueError: the shards of the evaluation dataset have different numbers of batches on the 2 JAX "
    "processes: [2, 3] (by process)",
    "shard_without_len": "TypeError: the shard of the evaluation dataset (list_iterator, from _refusals.<locals>.",
}
"""What each process of a 2-process run refuses (``distributed_worker._refusals``): how each message starts."""


def assert_refusals(directory, one):
    """One process allows everything ``distributed_worker._refusals`` tries; each of 2 processes refuses it, before
    any step or evaluation that would give a wrong number or hang (the messages name the value and the fix)."""
    assert str(one["refused"]).splitlines() == [f"{name}: allowed" for name in REFUSED]
    for rank in (0, 1):
        refused = dict(line.split(": ", 1) for line in (directory / f"refused_{rank}.txt").read_text().splitlines())
        assert list(refused) == list(REFUSED)
        for name, start in REFUSED.items():
            assert refused[name].startswith(start), (name, refused[name])
    assert "while 2 JAX processes train" in refused["num_samples"]
    assert "return per-sample values instead" in refused["auxiliary_sum"].lower()
    assert "training / evaluation settings" in refused["batch_number"]
    assert "[1] cannot be split evenly over this process's 2 devices" in refused["training_sizes"]
    assert "[3] cannot be split evenly over this process's 2 devices" in refused["evaluation_sizes"]
    assert ".shard) has no len()" in refused["shard_without_len"]


def test_two_processes_train_as_one_process_on_the_global_batch(tmp_path, one_process):
    """2 processes x 2 CPU devices, 4 samples per process per batch (a global batch of 8) vs one process on one
    device with batches of 8: 10 steps with metrics, validation and checkpoints. Process 1 starts from other
    weights (another seed): process 0's are broadcast."""
    two, one = run_worker(tmp_path / "two", 2, 2), one_process
    differences = assert_same_training(two, one)
    contexts = sorted((tmp_path / "two").glob("context_*.txt"))
    assert [path.read_text() for path in contexts] == ["0 2 True 4", "1 2 False 4"]
    assert (tmp_path / "two" / "batch_sizes_1.txt").read_text().split() == ["4", "4", "4", "4", "4", "2"] * 2
    assert not (tmp_path / "two" / "checkpoints_of_1").exists()  # process 1's own path: it wrote nothing
    assert_refusals(tmp_path / "two", one)
    assert sorted(path.name for path in (tmp_path / "two" / "checkpoints").iterdir()) == [
        "model-latest-model-checkpoint.safetensors",
        "model-training-checkpoint.safetensors",
    ]
    checkpoint = mlp.load_training_checkpoint(
        str(tmp_path / "two" / "checkpoints" / "model-training-checkpoint.safetensors")
    )
    print(f"2 processes vs 1: largest weight difference {max(differences.values()):.3g}")
    assert checkpoint["mlpug"]["backend"] == "jax"


def test_two_processes_with_several_steps_per_call_train_as_one_process(tmp_path, one_process):
    """``steps_per_execution=3`` in 2 processes x 2 CPU devices: per epoch (6 batches) a call of 3 stacked batches,
    then one of 2 and the short last batch alone, the validation in stacked calls too; each batch's auxiliary results
    are this process's rows (the accuracy compares them with its own labels) and the run equals one process with one
    step per call."""
    two = run_worker(tmp_path / "two", 2, 2, steps_per_execution=3)
    differences = assert_same_training(two, one_process)
    print(f"2 processes, 3 steps per call vs 1 process: largest weight difference {max(differences.values()):.3g}")


def test_one_process_strategies_are_refused_under_several_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"'single_process' trains in one process, but jax.process_count\(\) is 2"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), MLP(0), strategy="single_process")
    with pytest.raises(ValueError, match="num_processes must be an int >= 1, got 0"):
        mlp.distributed.launch(print, num_processes=0)


def test_the_launcher_reports_the_failing_process_with_its_traceback(tmp_path):
    """Process 1 raises, process 0 returns: the RuntimeError names process 1 and holds its traceback."""
    from tests.jax.distributed_worker import fail_in_process_1

    with pytest.raises(RuntimeError) as raised:
        mlp.distributed.launch(fail_in_process_1, str(tmp_path), num_processes=2, timeout_s=TIMEOUT_S)
    message = str(raised.value)
    assert message.startswith("JAX process 1 of 2 failed first, with the following error:\nTraceback")
    assert "ValueError: process 1 fails on purpose" in message and "in fail_in_process_1" in message


def test_launch_in_a_process_of_a_launched_run_calls_the_function_here(monkeypatch):
    """As PyTorch's launch under torchrun: a process that is already one of a run starts no others."""
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert mlp.distributed.launch(lambda value: value * 2, 21, num_processes=2) == 42
