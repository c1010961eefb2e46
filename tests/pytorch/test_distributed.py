"""Data-parallel training on ``torch.distributed`` (gloo, 2 processes on the loopback address, bounded time-outs).

Every test starts real processes (``tests/pytorch/ddp_worker.py``) with the environment ``torchrun`` sets, or
``torchrun`` itself, and compares with a single-process run of the same worker functions in this process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mlpug.pytorch as mlp
from mlpug.distributed import SerialContext
from tests.pytorch import ddp_worker

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(rank: int, world_size: int, port: int) -> dict:
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )


def run_ranks(*args: str, world_size: int = 2, timeout_s: float = TIMEOUT_S) -> list[tuple[int, str, float]]:
    """Start ``world_size`` worker processes as torchrun would; per rank (exit status, output, seconds to exit).
    A process still running after ``timeout_s`` is killed and the test fails."""
    port = _free_port()
    start = time.monotonic()
    processes = [
        subprocess.Popen(
            [sys.executable, WORKER, *args],
            env=_environment(rank, world_size, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    results = []
    try:
        for process in processes:
            remaining = max(timeout_s - (time.monotonic() - start), 1)
            output, _ = process.communicate(timeout=remaining)
            results.append((process.returncode, output, time.monotonic() - start))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        outputs = [process.communicate()[0] for process in processes]
        pytest.fail(f"a rank did not end within {timeout_s} s:\n" + "\n".join(outputs))
    return results


def _assert_ok(results):
    for rank, (code, output, _) in enumerate(results):
        assert code == 0, f"rank {rank} exited with {code}:\n{output}"


def _assert_process_group_destroyed_at_exit(results, ranks=(0, 1)):
    """mlpug destroyed the process group it created before the interpreter's own teardown (the worker's trace runs
    after mlpug's exit handler)."""
    for rank in ranks:
        output = results[rank][1]
        assert f"rank {rank}: {ddp_worker.EXIT_TRACE}destroyed" in output, output


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-equivalence")
    _assert_ok(run_ranks("equivalence", str(out)))
    torch.set_num_threads(1)
    runs = {
        variant: (
            [torch.load(out / f"{variant}-rank{rank}.pt") for rank in range(2)],
            ddp_worker.run_equivalence(variant, batch_size=16),  # one process, batch 2b, the same samples
        )
        for variant in ddp_worker.EQUIVALENCE_VARIANTS
    }
    runs["async"] = ([torch.load(out / f"async-rank{rank}.pt") for rank in range(2)], None)
    return runs


def test_two_ranks_with_asynchronous_validation_give_the_synchronous_dataset_metrics(equivalence_runs):
    """3 epochs on 2 ranks, validated over 10,001 samples every epoch: asynchronously (each rank evaluates its
    shard of a snapshot on a worker thread, rank 1 slower, up to 2 evaluations pending) the dataset metrics equal
    the synchronous ones exactly, on both ranks, and both ranks land the same results at the same epoch ends
    (agreed, although rank 1 finishes later)."""
    (rank0, rank1), _ = equivalence_runs["async"]
    for rank in (rank0, rank1):
        assert rank["async"]["rows"] == rank["sync"]["rows"]
        assert all(value is not None for row in rank["async"]["rows"] for value in row)
    assert rank0["async"] == rank1["async"]
    landed = rank0["async"]["landed"]
    assert sum(landed, []) == [0, 1, 2] and landed[-1][-1] == 2  # in order, the last at the last epoch end
    assert rank0["sync"]["landed"] == [[0], [1], [2]]


# float32 all-reduce (sum of two gradients / 2) against one gradient of 16 samples: rounding only.
# bfloat16 autocast: matmuls in bfloat16 of 8 against 16 rows, so the tolerance is bfloat16's (8 bits of mantissa).
# compiled (aot_eager): the same graphs' decompositions round a few operations differently.
TOLERANCES = {"plain": 1e-5, "data_loader": 1e-5, "accumulation": 1e-5, "bf16": 2e-2, "clipping": 1e-5}
TOLERANCES["compiled"] = 1e-5


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", list(ddp_worker.EQUIVALENCE_VARIANTS))
def test_two_ranks_of_batch_b_train_as_one_process_of_batch_2b(equivalence_runs, variant):
    """2 gloo ranks x 8 samples against 1 process x 16 samples, 6 steps of SGD with momentum: the same weights
    (plain, DataLoader with a DistributedSampler, gradient accumulation in chunks of 3, bf16 autocast, clipping
    by norm after the all-reduce of the accumulated gradients, the compiled step with chunks of 3), the ranks
    bit-identical to each other, the same logged batch and window losses on both ranks (and as one process), and
    the validation metrics over 10,001 samples (shards of 5,001 and 5,000) equal to the single-process values.
    Broken on purpose (no ``no_sync``: DDP all-reduces in every chunk's backward), the accumulation case counts
    18 gradient all-reduces instead of 6."""
    (rank0, rank1), single = equivalence_runs[variant]
    tolerance = TOLERANCES[variant]
    # gradients all-reduced once per batch, also with 3 chunks per batch (no_sync for the first two)
    assert rank0["gradient_all_reduces"] == rank1["gradient_all_reduces"] == 6
    assert (rank0["strategy"], rank1["strategy"], single["strategy"]) == ("ddp", "ddp", "single_process")  # default
    assert rank0["num_batches_per_epoch"] == rank1["num_batches_per_epoch"] == single["num_batches_per_epoch"] == 6
    for name, value in single["weights"].items():
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
        torch.testing.assert_close(rank0["weights"][name], value, rtol=tolerance, atol=tolerance)
    for key in ("batch_losses", "window_losses"):
        assert rank0[key] == rank1[key]
        assert rank0[key] == pytest.approx(single[key], rel=tolerance, abs=tolerance)
    assert rank0["validation"] == rank1["validation"]
    assert rank0["validation"] == pytest.approx(single["validation"], rel=tolerance, abs=tolerance)
    if variant == "clipping":  # the clipping was active: another model than without it
        (plain, _), _ = equivalence_runs["plain"]
        assert not torch.allclose(rank0["weights"]["2.weight"], plain["weights"]["2.weight"], atol=1e-3)


def test_dataset_metrics_count_every_sample_once_on_two_ranks(equivalence_runs):
    """Before any training the model is the same: the validation loss over 10,001 samples on 2 ranks (shards of
    5,001 and 5,000, no padding) equals the single-process loss to float64-reduction precision. Broken on purpose
    (``DistributedSampler``, which pads to 5,001 + 5,001), it differs by the duplicated sample."""
    model = ddp_worker.make_model()
    inputs, targets = ddp_worker.make_data(ddp_worker.VALIDATION_SAMPLES, seed=2)
    # a rank's shard as mlpug makes it, evaluated here: every sample exactly once over the two shards
    from mlpug.pytorch.distributed import ShardSampler

    shards = [list(ShardSampler(ddp_worker.VALIDATION_SAMPLES, rank, 2)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(ddp_worker.VALIDATION_SAMPLES))
    assert (len(shards[0]), len(shards[1])) == (5001, 5000)
    with torch.no_grad():
        squared = (model(inputs) - targets).pow(2).double()
    sharded = sum(squared[shard].sum() for shard in shards) / ddp_worker.VALIDATION_SAMPLES
    assert float(sharded) == pytest.approx(float(squared.mean()), rel=1e-12)
    # and the trained runs report the single-process value on both ranks (see the equivalence test)
    (rank0, rank1), single = equivalence_runs["plain"]
    assert rank0["validation"]["loss"] == rank1["validation"]["loss"]
    assert rank0["validation"]["loss"] == pytest.approx(single["validation"]["loss"], rel=1e-5)


@pytest.mark.timeout(300)
def test_uneven_shards_are_reduced_as_sample_weighted_means_and_the_group_outlives_training(tmp_path):
    """Batches of 1 and 3 samples on the two ranks (lr 0, so the model stays the reference model) and validation
    shards of 2 and 1 samples: the logged batch loss, the validation loss and the mae are the means over the samples
    of all ranks, never a mean of the ranks' means (chosen to differ here: 4.67 instead of 2.5 for the batch loss,
    1.25 instead of 1.67 for the validation loss). The script's own all-reduce after training still has mlpug's
    process group; the group is destroyed at exit, and both ranks exit 0."""
    results = run_ranks("uneven", str(tmp_path), timeout_s=120)
    _assert_ok(results)
    _assert_process_group_destroyed_at_exit(results)
    assert not any("at exit, not every rank arrived" in output for _, output, _ in results)  # both met at exit
    training = torch.tensor(ddp_worker.UNEVEN_TRAINING_ERRORS)
    validation = torch.tensor(ddp_worker.UNEVEN_VALIDATION_ERRORS)
    expected_loss = float(training.pow(2).mean())
    mean_of_means = (float(training[:1].pow(2).mean()) + float(training[1:].pow(2).mean())) / 2
    assert abs(mean_of_means - expected_loss) > 1  # the data tells the two apart
    for rank in range(2):
        run = torch.load(tmp_path / f"uneven-rank{rank}.pt")
        assert run["batch_losses"] == [pytest.approx(expected_loss, rel=1e-6)]
        assert run["validation"]["loss"] == pytest.approx(float(validation.pow(2).mean()), rel=1e-6)
        assert run["validation"]["mae"] == pytest.approx(float(validation.abs().mean()), rel=1e-6)
        assert run["samples_after_training"] == len(training)


def _final_weights(directory: Path) -> list[dict]:
    return [torch.load(directory / f"final-rank{rank}.pt") for rank in range(2)]


def _assert_same_weights(actual: dict, expected: dict) -> None:
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


RANDOM_STATES_DIFFER = "torch random state differs from rank 0's"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-uninterrupted")
    results = run_ranks("train", str(out))
    _assert_ok(results)
    _assert_process_group_destroyed_at_exit(results)  # after a success
    assert not any(RANDOM_STATES_DIFFER in output for _, output, _ in results)  # seeded alike: no warning
    weights = _final_weights(out)
    _assert_same_weights(weights[1], weights[0])
    return weights[0]


@pytest.mark.timeout(600)
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_batch_and_resumes_exactly(tmp_path, uninterrupted):
    """SIGTERM reaches rank 1 only, after global iteration 6 of 24. The ranks agree to stop after the same batch
    (otherwise rank 0 would wait in the next step's all-reduce until the time-out): the worker's StopAt callback has
    a batch hook and declares no read points, so every batch is one; the flag goes into the collective of batch 7
    and is read two batch boundaries later, before batch 9; rank 1 ends with 143, rank 0
    stops early, the primary writes the training checkpoint that continues at batch 9; both destroy the process
    group at exit. Resumed on 2 ranks, the final weights equal an uninterrupted 2-rank run bit for bit."""
    results = run_ranks("train", str(tmp_path), "--stop-at", "6", "--stop-how", "TERM", "--stop-rank", "1")
    (code0, output0, _), (code1, output1, _) = results
    assert code1 == 128 + signal.SIGTERM, output1
    assert code0 == 0, output0
    _assert_process_group_destroyed_at_exit(results)  # after a stop
    assert "Training stopped early" in output0 and "interrupted by signal SIGTERM" in output1
    checkpoint = mlp.load_training_checkpoint(str(tmp_path / "model-training-checkpoint.safetensors"))
    assert (checkpoint["epoch"], checkpoint["batch_step"], checkpoint["global_iter"]) == (0, 9, 9)
    _assert_ok(run_ranks("train", str(tmp_path), "--resume"))
    for weights in _final_weights(tmp_path):
        _assert_same_weights(weights, uninterrupted)


@pytest.mark.timeout(600)
def test_torchrun_restart_after_a_sigkilled_worker_ends_where_an_uninterrupted_run_ends(tmp_path, uninterrupted):
    """``torchrun --max-restarts 1``: rank 1 is SIGKILLed mid-epoch 0 (global iteration 7) on the first attempt;
    rank 0's next collective fails, torchrun restarts both workers, which resume from the latest training
    checkpoint (one per batch) and end with the weights of an uninterrupted run, bit for bit."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "1",
        "--monitor-interval", "0.2", WORKER, "train", str(tmp_path), "--resume",
        "--stop-at", "7", "--stop-how", "KILL", "--stop-rank", "1",
    ]  # fmt: skip
    result = subprocess.run(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming training from" in result.stdout, result.stdout
    for weights in _final_weights(tmp_path):
        _assert_same_weights(weights, uninterrupted)


@pytest.mark.timeout(300)
def test_when_one_rank_raises_every_rank_exits_within_the_bound(tmp_path):
    """Rank 1 raises at global iteration 3, without a launcher that would stop rank 0 for it. Rank 1 reports
    the original error; rank 0, waiting in a collective, fails as soon as rank 1's process is gone (gloo:
    connection closed) instead of waiting for the process-group time-out. Both have exited within 60 s, each after
    destroying the process group (without waiting for the other at exit)."""
    results = run_ranks("train", str(tmp_path), "--stop-at", "3", "--stop-how", "RAISE", timeout_s=60)
    (code0, output0, seconds0), (code1, output1, seconds1) = results
    assert code1 == 1 and "ValueError: rank 1 fails on purpose at global iteration 3" in output1
    assert code0 == 1, output0
    assert max(seconds0, seconds1) < 60
    _assert_process_group_destroyed_at_exit(results)  # after an error
    assert "at exit, not every rank arrived" not in output0 + output1


@pytest.mark.timeout(300)
def test_ranks_seeded_differently_are_warned_about_at_the_start(tmp_path):
    """A checkpoint holds rank 0's random states, which every rank restores: rank 1, seeded differently, is told
    at the start that its random draws will not continue exactly after a resume; rank 0 is not."""
    (code0, output0, _), (code1, output1, _) = run_ranks("train", str(tmp_path), "--num-epochs", "1", "--seed-by-rank")
    assert code0 == code1 == 0, output0 + output1
    assert f"[rank 1] WARNING : distributed::warn_if_random_states_differ : rank 1's {RANDOM_STATES_DIFFER}" in (
        output1
    )
    assert RANDOM_STATES_DIFFER not in output0


def _return_rank_and_world_size(queue_path):
    context = mlp.trainers.DefaultTrainer(
        torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), torch.nn.Linear(1, 1)
    ).distributed_context()
    return context.rank, context.world_size


def test_launch_runs_in_this_process_for_one_and_refuses_a_bad_count(monkeypatch):
    """``launch`` with one process (or one device) calls the function here, unchanged; a bad count is refused."""
    from mlpug.pytorch.distributed import launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch(_return_rank_and_world_size, None, num_processes=1) == (0, 1)
    if not torch.cuda.is_available():
        assert launch(_return_rank_and_world_size, None) == (0, 1)  # no GPU: one process
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=f"num_processes must be an int >= 1, got {bad!r}"):
            launch(_return_rank_and_world_size, None, num_processes=bad)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["KILL", "RAISE"])
def test_launch_names_the_process_that_failed_first(monkeypatch, how):
    """Rank 1 fails (SIGKILL; or raises and its interpreter takes 3 s more to end) while rank 0 waits in an
    all-reduce, which then fails: ``launch`` names process 1 and what it did, and how process 0 ended after it. When
    rank 1 raised, rank 0 ends first, with an error (torch's own join named the first process it saw end: 0)."""
    from mlpug.pytorch.distributed import launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MLPUG_DISTRIBUTED_TIMEOUT_S", "60")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    expected = (
        torch.multiprocessing.ProcessExitedException if how == "KILL" else torch.multiprocessing.ProcessRaisedException
    )
    with pytest.raises(expected) as raised:
        launch(ddp_worker.fail_on_rank_1, how, num_processes=2)
    assert raised.value.error_index == 1
    message = str(raised.value)
    if how == "KILL":  # process 0 raised, or was terminated by the launcher before it noticed
        assert message.startswith("process 1 of 2 failed first: it was killed by signal SIGKILL"), message
        assert "-- after it: process 0 " in message, message
    else:
        assert "Process 1 of 2 failed first, with the following error" in message, message
        assert "ValueError: rank 1 fails on purpose" in message
        assert "-- after it: process 0 raised RuntimeError" in message, message


def test_the_first_failure_is_a_process_gone_without_raising_else_the_earliest_to_raise():
    """What ``launch`` names: a process that ended without raising (a signal, a crash) among those seen ending,
    else the one that raised first, also when its own end was not seen yet."""
    from mlpug.distributed import first_failure

    assert first_failure([5.0, 0.0], seen=[0, 1]) == 1  # 1 was killed; 0's collective failed after
    assert first_failure([5.0, 3.0], seen=[0]) == 1  # 1 raised first, its exit is slow
    assert first_failure([0.0, 0.0, 0.0], seen=[2]) == 2
    assert first_failure([2.0, 3.0], seen=[0, 1]) == 0


def test_an_incomplete_launch_environment_is_an_early_error(monkeypatch):
    """``WORLD_SIZE=2`` without ``MASTER_ADDR`` (a launcher other than torchrun): a clear error at construction."""
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 is set, but \['RANK', 'MASTER_ADDR', 'MASTER_PORT'\] not"):
        mlp.trainers.DefaultTrainer(optimizer, model)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE is 'two', not an int"):
        mlp.trainers.DefaultTrainer(optimizer, model)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: one process
    assert isinstance(mlp.trainers.DefaultTrainer(optimizer, model).distributed_context(), SerialContext)
