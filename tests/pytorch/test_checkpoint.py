"""PyTorch checkpoints: exact resume with DataLoader + dropout + float16 loss scaling + chunks, format, safe loading."""

import fractions
import os
import pickle

import numpy as np
import pytest
import torch

import mlpug.pytorch as mlp
from mlpug.checkpointing import CheckpointError, NumpyCheckpointSaver, make_header
from tests.contract.backends import make_numpy_data

NUM_SAMPLES, BATCH_SIZE = 44, 8  # 6 batches per epoch, the last one smaller


class TrainModel(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        return torch.nn.functional.cross_entropy(self.classifier(features), labels)


def run(directory, init_seed=0, stop_at=None, resume_from=None, num_epochs=2):
    torch.manual_seed(init_seed)
    classifier = torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3)
    )
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=0.01)
    trainer = mlp.trainers.DefaultTrainer(
        optimizers=optimizer,
        model_components=classifier,
        batch_chunk_size=3,
        use_mixed_precision=True,
        autocast_dtype="float16",
    )
    features, labels = make_numpy_data(NUM_SAMPLES, 3)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    loader = mlp.data.resumable_data_loader(dataset, BATCH_SIZE, shuffle=True, seed=4)
    losses = []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])
            if logs["current"]["global_iter"] == stop_at:
                self.training_manager.stop_training()

    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=trainer)),
        Record("Record"),
        mlp.callbacks.CheckpointManager(checkpoints_path=str(directory), metric_to_monitor=None, batch_level=True),
    ]
    manager = mlp.trainers.TrainingManager(
        trainer, loader, num_epochs=num_epochs, callbacks=callbacks, resume_from=resume_from
    )
    trainer.set_training_model(TrainModel(classifier))
    manager.start_training()
    return trainer, losses


def flat_state(trainer):
    state = trainer.get_state()
    assert "grad_scaler" in state  # the AMP scaler is part of what is saved
    flat = {}

    def walk(value, path):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{path}/{index}")
        else:
            flat[path] = value

    walk(state, "")
    return flat


def assert_same(expected, actual):
    assert sorted(expected) == sorted(actual)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, actual[key]), key
        else:
            assert value == actual[key], key


@pytest.mark.parametrize("stop_at", [5, 8], ids=["epoch_end", "mid_epoch"])
def test_exact_resume_with_dataloader_dropout_float16_scaling_and_chunks(tmp_path, stop_at):
    straight_trainer, straight_losses = run(tmp_path / "straight")
    _, first_losses = run(tmp_path / "resumed", stop_at=stop_at)
    trainer, second_losses = run(tmp_path / "resumed", init_seed=7, resume_from="latest")
    assert first_losses + second_losses == straight_losses
    assert_same(flat_state(straight_trainer), flat_state(trainer))


def test_snapshot_is_independent_of_later_training(tmp_path):
    saver = mlp.checkpointing.CheckpointSaver()
    module = torch.nn.Linear(3, 2)
    state = module.state_dict()
    before = module.weight.detach().clone()
    snapshot = saver.snapshot({"mlpug": make_header("model", "pytorch"), "model": state})
    with torch.no_grad():
        module.weight.add_(1.0)
    path = str(tmp_path / "m.safetensors")
    saver.save(snapshot, path)
    loaded = saver.load(path, kind="model")
    assert torch.equal(loaded["model"]["weight"], before) and not torch.equal(before, module.weight.detach())
    assert loaded["model"]._metadata == state._metadata  # state_dict version metadata survives


def test_round_trip_keeps_dtypes_structure_and_saves_shared_and_non_contiguous_tensors(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3)).to(torch.bfloat16)
    module[1].weight = torch.nn.Parameter(module[0].weight.detach().T)  # tied: shares memory, not contiguous
    optimizer = torch.optim.Adam(module.parameters())
    module(torch.ones(2, 3, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    big = torch.arange(12.0).reshape(3, 4)
    state = {
        "mlpug": make_header("training", "pytorch"),
        **{"epoch": 0, "batch_step": 0, "global_iter": 0, "callbacks": {}},  # what a training checkpoint needs
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),  # int keys, 0-d step tensors
        "views": (big, big[1], big.T, big[:, 1]),
        "scalars": [torch.tensor(7), torch.tensor(0.5, dtype=torch.float64), torch.zeros(0, 2), torch.tensor([True])],
        "plain": {None: 1, 2.5: "x", (1, "a"): [1.5, float("inf")]},
    }
    path = str(tmp_path / "state.safetensors")
    mlp.checkpointing.CheckpointSaver(reuse_buffers=False).save(state, path)  # without a snapshot copy
    loaded = mlp.load_training_checkpoint(path)
    assert type(loaded["model"]) is type(state["model"]) and loaded["model"]._metadata == state["model"]._metadata
    assert all(loaded["model"][key].dtype == torch.bfloat16 for key in state["model"])
    assert all(torch.equal(loaded["model"][key], value) for key, value in state["model"].items())
    assert sorted(loaded["optimizer"]["state"]) == [0, 1, 2, 3] and loaded["optimizer"]["param_groups"][0]["params"]
    assert loaded["optimizer"]["state"][0]["step"].shape == () and loaded["optimizer"]["state"][0]["step"] == 1
    assert isinstance(loaded["views"], tuple) and all(
        torch.equal(a, b) for a, b in zip(loaded["views"], state["views"])
    )
    for expected, actual in zip(state["scalars"], loaded["scalars"]):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape and torch.equal(actual, expected)
    assert loaded["plain"] == state["plain"]
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3)).to(torch.bfloat16)
    fresh.load_state_dict(loaded["model"])
    torch.optim.Adam(fresh.parameters()).load_state_dict(loaded["optimizer"])
    with pytest.raises(TypeError, match=r"checkpoint\['x'\] is a numpy.ndarray"):
        mlp.checkpointing.CheckpointSaver().save({"mlpug": make_header("model", "pytorch"), "x": np.ones(2)}, path)
    with pytest.raises(TypeError, match=r"checkpoint\['x'\] is a torch.strided tensor of dtype torch.complex128"):
        mlp.checkpointing.CheckpointSaver().save(
            {"mlpug": make_header("model", "pytorch"), "x": torch.zeros(2, dtype=torch.complex128)}, path
        )


class Hostile:
    """Unpickling it would create a file (what an attacker would make run any code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_and_old_torch_save_files_are_never_unpickled(tmp_path):
    marker = str(tmp_path / "pwned")
    old = str(tmp_path / "old.pt")
    torch.save({"mlpug": make_header("training", "pytorch"), "value": fractions.Fraction(1, 3)}, old)
    with pytest.raises(CheckpointError, match="old.pt is not an mlpug pytorch checkpoint: it is a zip archive"):
        mlp.load_training_checkpoint(old)
    hostile = str(tmp_path / "hostile.safetensors")
    with open(hostile, "wb") as file:
        pickle.dump({"mlpug": Hostile(marker)}, file)
    with pytest.raises(CheckpointError, match="hostile.safetensors is not an mlpug pytorch checkpoint: it is a pickle"):
        mlp.load_training_checkpoint(hostile)
    zipped = str(tmp_path / "hostile.pt")
    torch.save({"mlpug": Hostile(marker)}, zipped)
    with pytest.raises(CheckpointError, match="hostile.pt is not an mlpug pytorch checkpoint: it is a zip archive"):
        mlp.load_training_checkpoint(zipped)
    assert not os.path.exists(marker)


def test_wrong_backend_is_named(tmp_path):
    path = str(tmp_path / "tf-like.safetensors")
    NumpyCheckpointSaver(backend="tensorflow").save(
        {"mlpug": make_header("training", "tensorflow"), "x": np.ones(2)}, path
    )
    with pytest.raises(CheckpointError, match="written by the 'tensorflow' backend, but is loaded with the 'pytorch'"):
        mlp.load_training_checkpoint(path)
    torch_path = str(tmp_path / "model.safetensors")
    mlp.checkpointing.CheckpointSaver().save(
        {"mlpug": make_header("model", "pytorch"), "w": torch.ones(2, dtype=torch.bfloat16)}, torch_path
    )
    with pytest.raises(CheckpointError, match="written by the 'pytorch' backend, but is loaded with the 'tensorflow'"):
        NumpyCheckpointSaver(backend="tensorflow").load(torch_path)  # its bfloat16 array is never read


def random_state_providers():
    model = torch.nn.Linear(2, 1)
    return mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.1), model).random_state_providers()


def test_torch_random_state_round_trip():
    from mlpug.random_state import get_random_states, set_random_states

    providers = random_state_providers()
    state = get_random_states(providers)
    assert set(state) == {"python", "numpy", "torch"}  # the trainer's providers, nothing registered globally
    expected = torch.rand(5)
    set_random_states(providers, state)
    assert torch.equal(torch.rand(5), expected)


def test_random_states_are_plain_so_every_saver_stores_them(tmp_path):
    from mlpug.random_state import get_random_states

    path = str(tmp_path / "random.safetensors")
    saver = NumpyCheckpointSaver()
    saver.save({"mlpug": make_header("model", "numpy"), "random": get_random_states(random_state_providers())}, path)
    assert saver.load(path)["random"]["torch"]["cpu"] == torch.get_rng_state().tolist()
