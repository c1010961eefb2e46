"""PyTorch checkpoints: exact resume with DataLoader + dropout + float16 loss scaling + chunks, safe loading."""

import fractions

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
    path = str(tmp_path / "m.pt")
    saver.save(snapshot, path)
    loaded = saver.load(path, kind="model")
    assert torch.equal(loaded["model"]["weight"], before) and not torch.equal(before, module.weight.detach())
    assert hasattr(loaded["model"], "_metadata")  # state_dict version metadata survives


def test_pickled_objects_are_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"mlpug": make_header("training", "pytorch"), "value": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match="pickled objects that weights_only loading refuses"):
        mlp.load_training_checkpoint(path)


def test_wrong_backend_is_named(tmp_path):
    path = str(tmp_path / "tf-like.npz")
    NumpyCheckpointSaver(backend="tensorflow").save(
        {"mlpug": make_header("training", "tensorflow"), "x": np.ones(2)}, path
    )
    with pytest.raises(CheckpointError, match="NumPy-format .* loaded with the 'pytorch' backend"):
        mlp.load_training_checkpoint(path)
    torch_path = str(tmp_path / "model.pt")
    mlp.checkpointing.CheckpointSaver().save({"mlpug": make_header("model", "pytorch")}, torch_path)
    with pytest.raises(CheckpointError, match="is a PyTorch checkpoint, but is loaded with the 'tensorflow'"):
        NumpyCheckpointSaver(backend="tensorflow").load(torch_path)


def test_torch_random_state_round_trip():
    from mlpug.checkpointing import get_random_state, set_random_state

    state = get_random_state()
    assert {"python", "numpy", "torch"} <= set(state)
    expected = torch.rand(5)
    set_random_state(state)
    assert torch.equal(torch.rand(5), expected)


def test_random_states_are_plain_so_every_saver_stores_them(tmp_path):
    from mlpug.checkpointing import get_random_state

    path = str(tmp_path / "random.npz")
    saver = NumpyCheckpointSaver()
    saver.save({"mlpug": make_header("training", "numpy"), "random": get_random_state()}, path)
    assert saver.load(path)["random"]["torch"]["cpu"] == torch.get_rng_state().tolist()
