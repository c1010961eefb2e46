"""PyTorch CUDA memory callbacks: a clear error without CUDA; with the ``torch.cuda`` counters replaced by fakes
(no GPU on CI), what they write into ``logs`` and when they empty the cache; with a GPU, real numbers."""

import pytest
import torch

import mlpug.pytorch as mlp


def make_problem(num_batches=4):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)

    class TrainModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch_data, evaluate_settings, inference_mode=None):
            inputs, targets = batch_data
            return torch.nn.functional.mse_loss(self.model(inputs), targets)

    trainer = mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    trainer.set_training_model(TrainModel())
    return trainer, [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(num_batches)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_without_cuda_both_callbacks_are_an_error_at_construction():
    for callback in (mlp.callbacks.LogCudaMemory, mlp.callbacks.EmptyCudaCache):
        with pytest.raises(
            RuntimeError, match=rf"{callback.__name__} needs a CUDA device, but torch.cuda.is_available"
        ):
            callback()


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` counters that grow by 1 MiB per read; calls to reset and empty_cache recorded."""
    calls = {"reads": 0, "reset": 0, "empty_cache": 0}

    def counter(offset):
        def read(device=None):
            calls["reads"] += 1
            return offset + calls["reads"] * 2**20

        return read

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for name, offset in (("memory_allocated", 0), ("memory_reserved", 2**30), ("max_memory_allocated", 2**31),
                         ("max_memory_reserved", 2**32)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, counter(offset))
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.__setitem__("reset", calls["reset"] + 1)
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.__setitem__("empty_cache", calls["empty_cache"] + 1))
    return calls


def test_log_cuda_memory_writes_the_counters_into_logs_at_its_periods(fake_cuda, tmp_path):
    trainer, batches = make_problem()
    seen = []

    class Read(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            seen.append(("batch", logs["current"].get("cuda_memory", {}).get("batch")))
            return True

        def on_epoch_completed(self, logs):
            seen.append(("epoch", logs["current"]["cuda_memory"]["epoch"]))
            return True

    memory = mlp.callbacks.LogCudaMemory(log_period=2)
    board = mlp.callbacks.Tensorboard("cuda_memory.batch.allocated_bytes", log_dir=str(tmp_path), log_period=2)
    manager = mlp.trainers.TrainingManager(trainer, batches, num_epochs=1, callbacks=[memory, Read(), board])
    manager.start_training()
    batch_values = [values for level, values in seen if level == "batch"]
    assert [values is None for values in batch_values] == [True, False, True, False]  # every 2nd batch
    assert set(batch_values[1]) == {"allocated_bytes", "reserved_bytes", "max_allocated_bytes", "max_reserved_bytes"}
    assert all(type(value) is int for value in batch_values[1].values())
    assert seen[-1][0] == "epoch" and seen[-1][1]["reserved_bytes"] > 2**30
    assert fake_cuda["reset"] == 2  # at the start and after the epoch
    assert (tmp_path / "cuda_memory-batch").is_dir()  # a consumer path that check_log_path accepts


def test_empty_cuda_cache_at_epoch_ends_and_every_n_batches(fake_cuda):
    trainer, batches = make_problem()
    manager = mlp.trainers.TrainingManager(
        trainer, batches, num_epochs=2, callbacks=[mlp.callbacks.EmptyCudaCache(every_n_batches=3)]
    )
    manager.start_training()
    assert fake_cuda["empty_cache"] == 2 + 2  # two epoch ends, global iterations 2 and 5 of 0..7
    with pytest.raises(ValueError, match="every_n_batches must be an int >= 1 or None, got 0"):
        mlp.callbacks.EmptyCudaCache(every_n_batches=0)
    with pytest.raises(ValueError, match="log_period must be an int >= 1, got 0"):
        mlp.callbacks.LogCudaMemory(log_period=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on the CI machines)")
def test_on_a_gpu_the_counters_are_the_allocators():
    memory = mlp.callbacks.LogCudaMemory()
    before = memory.statistics()["allocated_bytes"]
    block = torch.empty(2**20, dtype=torch.uint8, device="cuda")
    assert memory.statistics()["allocated_bytes"] >= before + 2**20
    del block
