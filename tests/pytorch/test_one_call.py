"""PyTorch specifics of the one-call API ``mlp.Trainer``: map-style datasets and the quickstart example."""

import logging
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mlpug.pytorch as mlp
from tests.contract.backends import make_numpy_data

ROOT = Path(__file__).resolve().parents[2]


def train(dataset, batch_size=8, num_epochs=2, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    trainer = mlp.Trainer(model, torch.nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=0.01))
    trainer.train(dataset, num_epochs=num_epochs, batch_size=batch_size, seed=4, progress=None, **options)
    return [p.detach().clone() for p in model.parameters()]


def test_a_map_style_dataset_is_batched_in_the_order_of_the_same_arrays():
    features, labels = (torch.from_numpy(a) for a in make_numpy_data(37, seed=0))
    from_arrays = train((features, labels))
    from_dataset = train(torch.utils.data.TensorDataset(features, labels))
    assert all(torch.equal(a, b) for a, b in zip(from_arrays, from_dataset))
    assert not all(torch.equal(a, b) for a, b in zip(from_arrays, train((features, labels), shuffle=False)))


def test_an_iterable_dataset_must_come_in_a_data_loader():
    class Samples(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([(torch.zeros(6), torch.tensor(0))] * 4)

    with pytest.raises(TypeError, match=r"train_dataset is an IterableDataset \(.*Samples\).*DataLoader\(dataset"):
        train(Samples())
    train(torch.utils.data.DataLoader(Samples(), batch_size=2), batch_size=None, num_batches_per_epoch=2)


@pytest.mark.timeout(600)
def test_the_quickstart_reaches_85_percent_validation_accuracy_in_3_epochs(fashion_mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLPUG_FASHION_MNIST_DIR", fashion_mnist_dir)
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(ROOT / "examples/quickstart/pytorch/train.py"), run_name="__main__")
    rows = names["history"].rows
    assert len(rows) == 3 and rows[-1]["validation.dataset.accuracy"] >= 0.85
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} >= {
        "model-best-model-checkpoint.safetensors",
        "model-training-checkpoint.safetensors",
    }


@pytest.mark.timeout(300)
def test_the_one_call_api_trains_data_parallel_on_two_processes(tmp_path):
    """The same script on 2 gloo ranks: each trains its half of every epoch (4 of 8 batches), the ranks end with the
    same weights and the same validation losses (arrays, and a torch Dataset sharded over the ranks), the primary
    prints, and the checkpoint files are there."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "WORLD_SIZE")}
    script = str(Path(__file__).parent / "scripts" / "one_call_ddp.py")
    result = subprocess.run(
        [sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=240, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_iter"] for r in ranks] == [8, 8]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]))
    assert ranks[0]["validation_loss"] == ranks[1]["validation_loss"]
    assert ranks[0]["dataset_validation_loss"] == pytest.approx(ranks[0]["validation_loss"], rel=1e-6)
    assert "cannot be sharded" not in result.stdout + result.stderr  # every validation sample on one rank
    assert result.stdout.count("Training completed. All good!") == 2  # once per run, on the primary
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3


def _one_call_trainer(optimizer_factory, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return mlp.Trainer(model, torch.nn.CrossEntropyLoss(), optimizer_factory(model.parameters()), **options)


def test_the_optimizer_steps_fused_where_torch_has_it_and_the_user_left_it_open(caplog):
    """Adam with ``fused`` unset becomes ``fused=True`` (one info line); an explicit ``fused=False``, ``foreach=True``,
    an optimizer without a fused implementation, one that already stepped, and ``fused_optimizer=False`` stay as
    they are. The fused run trains to the weights of the default implementation within float rounding."""
    mlpug_logger = logging.getLogger("mlpug")
    mlpug_logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="mlpug"):
            fused = _one_call_trainer(lambda p: torch.optim.Adam(p, lr=0.01))
    finally:
        mlpug_logger.propagate = False
    assert fused.optimizer.param_groups[0]["fused"] is True
    assert "optimizer (Adam) steps with torch's fused implementation" in caplog.text
    assert _one_call_trainer(lambda p: torch.optim.Adam(p, lr=0.01, fused=False)).optimizer.defaults["fused"] is False
    assert _one_call_trainer(lambda p: torch.optim.Adam(p, foreach=True)).optimizer.param_groups[0]["fused"] is None
    assert _one_call_trainer(lambda p: torch.optim.Adam(p, foreach=False)).optimizer.param_groups[0]["fused"] is None
    assert "fused" not in _one_call_trainer(lambda p: torch.optim.RMSprop(p)).optimizer.param_groups[0]
    kept = _one_call_trainer(lambda p: torch.optim.Adam(p, lr=0.01), fused_optimizer=False)
    assert kept.optimizer.param_groups[0]["fused"] is None
    stepped = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    stepped.param_groups[0]["params"][0].grad = torch.ones(2)
    stepped.step()
    assert not mlp.one_call.use_fused_implementation(stepped) and stepped.param_groups[0]["fused"] is None
    with pytest.raises(TypeError, match="fused_optimizer must be True or False, got 'yes'"):
        _one_call_trainer(lambda p: torch.optim.Adam(p), fused_optimizer="yes")

    data = tuple(torch.from_numpy(a) for a in make_numpy_data(37, seed=0))
    for trainer in (fused, kept):
        trainer.train(data, num_epochs=2, batch_size=8, seed=4, progress=None)
    for a, b in zip(fused.model.parameters(), kept.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # 10 Adam steps of lr 0.01: rounding only


def test_a_tensor_dataset_is_sliced_like_its_arrays():
    """A ``TensorDataset`` of (inputs, targets) is batched as arrays (no per-sample collation); other datasets go
    through the resumable DataLoader."""
    features, labels = (torch.from_numpy(a) for a in make_numpy_data(37, seed=0))
    trainer = _one_call_trainer(lambda p: torch.optim.Adam(p, lr=0.01))
    trainer.train(torch.utils.data.TensorDataset(features, labels), num_epochs=1, batch_size=8, progress=None)
    assert isinstance(trainer.manager.training_dataset, mlp.data.ResumableArrayBatches)

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 37

        def __getitem__(self, index):
            return features[index], labels[index]

    trainer.train(Samples(), num_epochs=1, batch_size=8, progress=None)
    assert isinstance(trainer.manager.training_dataset, torch.utils.data.DataLoader)


def test_a_model_with_sparse_gradients_keeps_its_optimizer_and_trains():
    """``nn.Embedding(sparse=True)`` gives sparse gradients, which torch's fused SGD and Adagrad refuse at the first
    step: the one-call API leaves such a model's optimizer as it is, and it trains."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4, sparse=True), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    trainer = mlp.Trainer(model, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert trainer.optimizer.param_groups[0]["fused"] is None
    tokens = torch.randint(0, 20, (24, 2))
    before = model[0].weight.detach().clone()
    trainer.train((tokens, tokens[:, 0] % 3), num_epochs=1, batch_size=8, progress=None)
    assert not torch.equal(before, model[0].weight)


# ----- first-batch checks: one batch, no optimizer step -----


def regression(num_samples=40):
    features = np.random.default_rng(0).normal(size=(num_samples, 3)).astype(np.float32)
    return torch.from_numpy(features), torch.from_numpy(features @ np.array([1.0, 2.0, 3.0], np.float32))


def regression_trainer(model=None, loss_func=None, **options):
    torch.manual_seed(0)
    model = model if model is not None else torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, mlp.Trainer(model, loss_func or torch.nn.MSELoss(), optimizer, **options)


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(before, model):
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch's own broadcast warning
def test_targets_that_broadcast_against_the_outputs_fail_before_the_first_step():
    features, targets = regression()
    model, trainer = regression_trainer()
    before = parameters(model)
    expected = (
        r"outputs have shape \[8, 1\] and the targets \[8\]; in loss_func they broadcast to \[8, 8\].*"
        r"the loss of the first batch is .*targets\[\.\.\., None\].*allow_broadcast=True"
    )
    with pytest.raises(ValueError, match=expected):
        trainer.train((features, targets), batch_size=8, progress=None)
    assert_unchanged(before, model)
    zeros = torch.nn.Linear(3, 1)
    torch.nn.init.zeros_(zeros.weight)  # constant outputs: the first batch's loss is the same both ways
    with pytest.raises(ValueError, match=r"broadcast to \[8, 8\].*the loss of made-up values of these shapes"):
        regression_trainer(zeros)[1].train((features, targets), batch_size=8, progress=None)
    # the fixes train: targets of the outputs' shape, or the broadcast allowed on purpose
    regression_trainer()[1].train((features, targets[:, None]), batch_size=8, progress=None)
    model, allowed = regression_trainer(allow_broadcast=True)
    allowed.train((features, targets), batch_size=8, progress=None)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # class indices [B] against logits [B, C] are no broadcast, also where B == C
    classes = torch.from_numpy(np.arange(40) % 8)
    regression_trainer(torch.nn.Linear(3, 8), torch.nn.CrossEntropyLoss())[1].train(
        (features, classes), batch_size=8, progress=None
    )


@pytest.mark.parametrize(
    "loss_func",
    [
        lambda outputs, targets: torch.nn.functional.mse_loss(outputs.squeeze(-1), targets),
        lambda outputs, targets: torch.nn.functional.mse_loss(outputs.view(-1), targets),
        lambda outputs, targets: torch.nn.functional.mse_loss(outputs, targets[:, None]),
    ],
    ids=["outputs_squeezed", "outputs_viewed", "targets_expanded"],
)
def test_a_loss_that_aligns_the_shapes_itself_either_way_trains_without_a_warning(loss_func):
    features, targets = regression()
    model, trainer = regression_trainer(loss_func=loss_func)
    before = parameters(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train((features, targets), batch_size=8, progress=None)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not [w for w in caught if "target size" in str(w.message)]  # torch's broadcast warning, from the check


@pytest.mark.filterwarnings("ignore:Using a target size")  # from the training step's own call, not the check's
def test_the_fix_for_targets_that_broadcast_names_both_ways_to_align_them():
    features, targets = regression()
    expected = (
        r"Fix: reshape one to the other's shape, either the targets to \[8, 1\] \(e.g. targets\[\.\.\., None\]\) "
        r"or, in loss_func, the outputs to \[8\] \(e.g. outputs\[\.\.\., 0\]\)"
    )
    with pytest.raises(ValueError, match=expected):
        regression_trainer()[1].train((features, targets), batch_size=8, progress=None)


def test_a_model_that_returns_a_tuple_gets_an_error_naming_what_it_returned():
    class OutputsAndFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, features):
            return self.linear(features), features

    features, targets = regression()
    model, trainer = regression_trainer(OutputsAndFeatures())
    before = parameters(model)
    expected = (
        r"raised by loss_func\(outputs, targets\) of mlp.Trainer, with the model's outputs tuple of 2 "
        r"\(Tensor\[8, 1\] float32, Tensor\[8, 3\] float32\) and the targets Tensor\[8, 1\] float32.*"
        r"make the model return one tensor.*'tuple' object has no attribute 'size'"
    )
    with pytest.raises(TypeError, match=expected):
        trainer.train((features, targets[:, None]), batch_size=8, progress=None)
    assert_unchanged(before, model)


def test_a_loss_per_sample_gets_an_error_naming_its_shape_and_the_fix():
    features, targets = regression()
    model, trainer = regression_trainer(loss_func=torch.nn.MSELoss(reduction="none"))
    before = parameters(model)
    expected = (
        r"must return a scalar loss tensor .*got torch.Tensor as the loss: Tensor\[8, 1\] float32.*reduction='mean'"
    )
    with pytest.raises(TypeError, match=expected):
        trainer.train((features, targets[:, None]), batch_size=8, progress=None)
    assert_unchanged(before, model)


def test_metric_functions_fail_before_the_first_step():
    def mae(y_true, y_pred):
        return (y_true - y_pred).abs().mean()

    features, targets = regression()
    for metrics, error, expected in (
        ({"mae": mae}, TypeError, r"metric function 'mae' is .*mae\(y_true, y_pred\), but metric functions take"),
        ({"top_5": mlp.metrics.top_k_accuracy(5)}, ValueError, r"k=5 exceeds the 1 classes of the logits"),
    ):
        model, trainer = regression_trainer(metrics=metrics)
        before = parameters(model)
        with pytest.raises(error, match=expected):
            trainer.train((features, targets[:, None]), batch_size=8, progress=None)
        assert_unchanged(before, model)
