"""Sharded data-parallel training with ``strategy="fsdp"`` (FSDP2 on gloo, 2 processes on the loopback address) and
its sharded training checkpoints (DCP). The ranks run ``tests/pytorch/ddp_worker.py`` as in ``test_distributed.py``."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

import mlpug.pytorch as mlp
from mlpug.checkpointing import CheckpointError
from mlpug.pytorch.strategies.fsdp import _unit_policy, _units
from tests.pytorch import ddp_worker
from tests.pytorch.test_distributed import (
    ROOT,
    TIMEOUT_S,
    WORKER,
    _assert_ok,
    _assert_process_group_destroyed_at_exit,
    _assert_same_weights,
    _final_weights,
    _free_port,
    run_ranks,
)

TOLERANCES = {"plain": 1e-5, "accumulation": 1e-5, "bf16": 2e-2, "clipping": 1e-5}
TRAINING_CHECKPOINT = "model-training-checkpoint.safetensors"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-equivalence")
    _assert_ok(run_ranks("equivalence-fsdp", str(out)))
    torch.set_num_threads(1)
    runs = {
        variant: (
            [torch.load(out / f"fsdp-{variant}-rank{rank}.pt") for rank in range(2)],
            ddp_worker.run_equivalence(variant, batch_size=16),  # one process, batch 2b, the same samples
        )
        for variant in ddp_worker.FSDP_VARIANTS
    }
    runs["async"] = ([torch.load(out / f"fsdp-async-rank{rank}.pt") for rank in range(2)], None)
    return runs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("variant", ddp_worker.FSDP_VARIANTS)
def test_two_fsdp_ranks_of_batch_b_train_as_one_process_of_batch_2b(fsdp_runs, variant):
    """2 gloo ranks x 8 samples under FSDP (every Linear a unit of its own, and the root) against 1 process x 16
    samples, 6 steps of SGD with momentum: the same weights and logged losses (plain; gradient accumulation in chunks
    of 3, with the reduce-scatter in the last chunk only; clipping by norm over the sharded gradients), and the
    validation metrics over 10,001 samples evaluated on the gathered model; the ranks bit-identical to each other.
    bf16 (FSDP's MixedPrecisionPolicy: bfloat16 compute, float32 reduction) against one process under bf16 autocast
    agrees to bfloat16 rounding (2e-2), not 1e-5: the per-rank bf16 sums differ from the whole batch's."""
    (rank0, rank1), single = fsdp_runs[variant]
    tolerance = TOLERANCES[variant]
    assert (rank0["strategy"], rank1["strategy"], single["strategy"]) == ("fsdp", "fsdp", "single_process")
    for name, value in single["weights"].items():
        assert torch.equal(rank0["weights"][name], rank1["weights"][name]), name
        torch.testing.assert_close(rank0["weights"][name], value, rtol=tolerance, atol=tolerance)
    for key in ("batch_losses", "window_losses"):
        assert rank0[key] == rank1[key]
        assert rank0[key] == pytest.approx(single[key], rel=tolerance, abs=tolerance)
    assert rank0["validation"] == rank1["validation"]
    assert rank0["validation"] == pytest.approx(single["validation"], rel=tolerance, abs=tolerance)
    if variant == "clipping":  # the clipping was active: another model than without it
        (plain, _), _ = fsdp_runs["plain"]
        assert not torch.allclose(rank0["weights"]["2.weight"], plain["weights"]["2.weight"], atol=1e-3)


def test_asynchronous_validation_of_the_sharded_model_gives_the_synchronous_metrics(fsdp_runs):
    """3 epochs validated every epoch: asynchronously (a snapshot gathered from the shards at every epoch end,
    evaluated on a worker thread, rank 1 slower) the dataset metrics equal the synchronous ones exactly, on both
    ranks, which land the same results at the same epoch ends."""
    (rank0, rank1), _ = fsdp_runs["async"]
    assert rank0 == rank1
    assert rank0["async"]["rows"] == rank0["sync"]["rows"]
    assert len(rank0["sync"]["rows"]) == 3
    assert sum(len(landed) for landed in rank0["async"]["landed"]) == 3


@pytest.fixture(scope="module")
def uninterrupted_fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-uninterrupted")
    results = run_ranks("train", str(out), "--fsdp")
    _assert_ok(results)
    _assert_process_group_destroyed_at_exit(results)
    weights = _final_weights(out)
    _assert_same_weights(weights[1], weights[0])
    return out, weights[0]


def _shard_directories(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if "-shards-" in name)


@pytest.mark.timeout(600)
def test_sigterm_resume_from_background_sharded_checkpoints_is_exact(tmp_path, uninterrupted_fsdp):
    """Sharded training checkpoints written in the background (DCP's async_save on a process group of its own):
    SIGTERM on rank 1 after global iteration 6; every rank writes its shards, rank 0 commits the training checkpoint
    file, which names the one shard directory left. Resumed on 2 ranks, the final weights equal an uninterrupted
    run's bit for bit."""
    results = run_ranks("train", str(tmp_path), "--fsdp", "--background", "--stop-at", "6", "--stop-how", "TERM")
    (code0, output0, _), (code1, output1, _) = results
    assert code1 == 128 + signal.SIGTERM, output1
    assert code0 == 0, output0
    checkpoint = mlp.load_training_checkpoint(str(tmp_path / TRAINING_CHECKPOINT))
    assert (checkpoint["epoch"], checkpoint["batch_step"], checkpoint["global_iter"]) == (0, 9, 9)
    reference = checkpoint["trainer"]["mlpug_sharded"]
    assert reference["world_size"] == 2 and reference["format"] == "torch-dcp"
    assert _shard_directories(tmp_path) == [os.path.basename(reference["directory"])]
    _assert_ok(run_ranks("train", str(tmp_path), "--fsdp", "--background", "--resume"))
    _assert_same_weights(_final_weights(tmp_path)[0], uninterrupted_fsdp[1])
    assert len(_shard_directories(tmp_path)) == 1  # the older ones removed after each commit


def _load_in_one_process(path: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    """The training checkpoint at ``path`` read into a single-process trainer (no process group)."""
    model = ddp_worker.make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model)
    trainer.set_training_model(ddp_worker.TrainModel(model))
    checkpoint = mlp.load_training_checkpoint(path)
    trainer.set_state(checkpoint["trainer"])
    return model, optimizer, checkpoint


def test_a_two_rank_sharded_checkpoint_loads_into_one_process_and_trains_on(uninterrupted_fsdp):
    """The final training checkpoint of the 2-rank FSDP run, read in one process without a process group: the model
    equals the 2-rank run's final (gathered) weights bit for bit, Adam's moments are whole tensors at step 24, and
    one more step trains (finite loss, the weights move)."""
    out, final = uninterrupted_fsdp
    model, optimizer, checkpoint = _load_in_one_process(str(out / TRAINING_CHECKPOINT))
    assert checkpoint["global_iter"] == 24
    _assert_same_weights(model.state_dict(), final)
    for index, parameter in enumerate(model.parameters()):
        state = optimizer.state_dict()["state"][index]
        assert state["exp_avg"].shape == parameter.shape and float(state["step"]) == 24
    inputs, targets = ddp_worker.make_data(8, seed=9)
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model.state_dict()["0.weight"], final["0.weight"])


@pytest.mark.timeout(600)
def test_a_two_rank_sharded_checkpoint_continues_in_one_process_as_on_two_ranks(tmp_path):
    """2 FSDP ranks train epoch 0 (3 steps of 2 x 8 samples) and write a sharded training checkpoint; one process
    (batches of 16, the same samples per step) resumes it and trains epoch 1. Its final weights equal those of 2 ranks
    training both epochs without a break (1e-5: the sums run over other rows)."""
    uninterrupted, split = tmp_path / "uninterrupted", tmp_path / "split"
    uninterrupted.mkdir()
    split.mkdir()
    _assert_ok(run_ranks("continue", str(uninterrupted), "--num-epochs", "2"))
    _assert_ok(run_ranks("continue", str(split), "--num-epochs", "1"))
    torch.set_num_threads(1)
    continued = ddp_worker.run_continue(str(split), num_epochs=2, resume=True)
    expected = torch.load(uninterrupted / "continued-rank0.pt")
    before = torch.load(split / "continued-rank0.pt")
    for name, value in expected.items():
        torch.testing.assert_close(continued[name], value, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before[name], value, atol=1e-4), name  # epoch 1 changed the weights


@pytest.mark.timeout(600)
def test_a_one_process_training_checkpoint_loads_into_two_fsdp_ranks(tmp_path):
    """A single-file training checkpoint of one process (1 epoch of the training run, Adam) read by 2 FSDP ranks: each
    takes its shards (the parameters stay DTensors), and the gathered weights and Adam moments and step equal the
    checkpoint's, bit for bit, on both ranks."""
    _assert_ok(run_ranks("train", str(tmp_path), "--num-epochs", "1", world_size=1))
    saved = mlp.load_training_checkpoint(str(tmp_path / TRAINING_CHECKPOINT))["trainer"]
    _assert_ok(run_ranks("load-whole", str(tmp_path)))
    for rank in range(2):
        loaded = torch.load(tmp_path / f"loaded-rank{rank}.pt")
        assert all(loaded["sharded"])
        _assert_same_weights(loaded["weights"], saved["model_components"]["model"])
        for index, entry in saved["optimizers"]["optimizer"]["state"].items():
            for key, value in entry.items():
                assert torch.equal(loaded["adam"][index][key], value), (index, key)


@pytest.mark.timeout(600)
def test_sigkill_of_a_rank_during_a_sharded_save_leaves_the_previous_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed in the second sharded save (end of epoch 1), after writing its shard files and before the
    checkpoint is complete; rank 0's save fails on the lost peer. The training checkpoint file still names the
    shards of the end of epoch 0 (global iteration 12), which load in one process and equal the latest model
    checkpoint of that period (the gathered weights)."""
    results = run_ranks("train", str(tmp_path), "--fsdp", "--kill-in-save", "2")
    (code0, output0, _), (code1, _, _) = results
    assert code1 == -signal.SIGKILL and code0 == 1, output0
    assert len(_shard_directories(tmp_path)) == 2  # the committed one and the incomplete one
    model, _, checkpoint = _load_in_one_process(str(tmp_path / TRAINING_CHECKPOINT))
    assert (checkpoint["epoch"], checkpoint["batch_step"], checkpoint["global_iter"]) == (1, 0, 12)
    latest = mlp.load_model_checkpoint(str(tmp_path / "model-latest-model-checkpoint.safetensors"))
    assert latest["progress"]["global_iter"] == 11  # the last batch trained (the training state: the next one)
    _assert_same_weights(model.state_dict(), latest["model_components"]["model"])


@pytest.mark.timeout(600)
def test_torchrun_restart_after_a_sigkilled_fsdp_worker_ends_where_an_uninterrupted_run_ends(
    tmp_path, uninterrupted_fsdp
):
    """``torchrun --max-restarts 1`` under FSDP: rank 1 is SIGKILLed mid-epoch 0 (global iteration 7) on the first
    attempt; torchrun restarts both workers, which resume from the latest sharded training checkpoint (one per batch)
    and end with the weights of an uninterrupted run, bit for bit."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "1",
        "--monitor-interval", "0.2", WORKER, "train", str(tmp_path), "--fsdp", "--resume",
        "--stop-at", "7", "--stop-how", "KILL", "--stop-rank", "1",
    ]  # fmt: skip
    result = subprocess.run(
        command, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming training from" in result.stdout, result.stdout
    for weights in _final_weights(tmp_path):
        _assert_same_weights(weights, uninterrupted_fsdp[1])


@pytest.mark.timeout(600)
def test_non_finite_shards_on_one_rank_stop_the_writes_of_every_rank(tmp_path):
    """Under ``non_finite_weights="warn"`` rank 1's shards become NaN in epoch 1 (rank 0's stay finite): the ranks
    agree that the weights are not finite, so neither the epoch-end checkpoint nor the final one is written (no rank
    waits for another in a save); both end, and the training checkpoint is still the one of epoch 0."""
    results = run_ranks("train", str(tmp_path), "--fsdp", "--nan-at", "14")
    _assert_ok(results)
    for _, output, _ in results:
        assert "Not writing checkpoints: the weights hold NaN or infinite values" in output
    checkpoint = mlp.load_training_checkpoint(str(tmp_path / TRAINING_CHECKPOINT))
    assert checkpoint["global_iter"] == 12
    model, _, _ = _load_in_one_process(str(tmp_path / TRAINING_CHECKPOINT))
    assert all(torch.isfinite(value).all() for value in model.state_dict().values())


@pytest.mark.timeout(600)
def test_the_one_call_api_trains_under_fsdp_as_in_one_process(tmp_path):
    """``mlp.Trainer(model, loss, optimizer, strategy=FSDPStrategy(...))``: 2 epochs on 2 ranks (batches of 8, in
    order) give one process's weights (batches of 16) and validation history within 1e-5, and its checkpoints are
    written (the training checkpoint sharded)."""
    _assert_ok(run_ranks("one-call-fsdp", str(tmp_path)))
    torch.set_num_threads(1)
    single = ddp_worker.run_one_call(str(tmp_path / "single"), fsdp=False)
    for rank in range(2):
        result = torch.load(tmp_path / f"one-call-rank{rank}.pt")
        for name, value in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-5, atol=1e-5)
        assert len(result["rows"]) == len(single["rows"]) == 2
        for row, expected in zip(result["rows"], single["rows"]):
            assert row["validation.dataset.loss"] == pytest.approx(expected["validation.dataset.loss"], rel=1e-5)
    assert len(_shard_directories(tmp_path)) == 1


class _Hostile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_shard_metadata_file_runs_no_code(tmp_path, uninterrupted_fsdp):
    """The ``.metadata`` of a copy of the sharded checkpoint replaced by a pickle that would run a shell command:
    loading it is a CheckpointError naming the file, and the command never ran."""
    import shutil

    out, _ = uninterrupted_fsdp
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (shards,) = _shard_directories(copy)
    marker = tmp_path / "ran"
    metadata = copy / shards / ".metadata"
    metadata.write_bytes(pickle.dumps(_Hostile(str(marker))))
    with pytest.raises(CheckpointError, match=".metadata"):
        _load_in_one_process(str(copy / TRAINING_CHECKPOINT))
    assert not marker.exists()


def test_fsdp_needs_a_launch_and_a_valid_unit_policy():
    """One process: strategy='fsdp' is a ValueError saying it needs a data-parallel launch. The unit policies: the
    size policy, classes and a function; anything else is a TypeError naming the value."""
    with pytest.raises(ValueError, match="needs a data-parallel launch"):
        mlp.trainers.DefaultTrainer(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), torch.nn.Linear(1, 1),
                                    strategy="fsdp")  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Sequential(torch.nn.Linear(10, 1000)))
    assert _units(model, _unit_policy(None, 1000)) == [model[1][0]]  # 11,000 parameters: a unit; its parent then 0
    assert _units(model, _unit_policy([torch.nn.Linear], 1)) == [model[0], model[1][0]]
    assert _units(model, _unit_policy(lambda module: module is model[1], 1)) == [model[1]]
    with pytest.raises(TypeError, match="shard_modules must be"):
        _unit_policy("size", 1)
    with pytest.raises(ValueError, match="min_num_params"):
        _unit_policy(None, 0)
