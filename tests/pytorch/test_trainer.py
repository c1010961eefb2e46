"""The PyTorch DefaultTrainer: return forms, modes, state, learning rate and bad input."""

import pytest
import torch

import mlpug.pytorch as mlp


class Model(torch.nn.Module):
    """Linear regression; the return form is chosen per test."""

    def __init__(self, form="loss"):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.form = form
        self.seen_modes = []
        self.seen_grad_enabled = []

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        self.seen_modes.append(self.training)
        self.seen_grad_enabled.append(torch.is_grad_enabled())
        x, y = batch_data
        predictions = self.linear(x).squeeze(1)
        loss = ((predictions - y) ** 2).mean()
        return {
            "loss": loss,
            "tuple2": (loss, predictions),
            "tuple3": (loss, 5, predictions),
            "dict": {"loss": loss, "num_samples": 7, "auxiliary_results": predictions},
            "no_loss": {"predictions": predictions},
            "none": None,
            "vector": (predictions - y) ** 2,
            "tuple4": (loss, 4, predictions, y),
            "swapped": (predictions, loss),
        }[self.form]


def make(form="loss", **kwargs):
    torch.manual_seed(0)
    model = Model(form)
    trainer = mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)
    trainer.set_training_model(model)
    return trainer, model


BATCH = (torch.randn(4, 3), torch.randn(4))


@pytest.mark.parametrize(
    "form,num_samples,has_aux", [("loss", 4, False), ("tuple2", 4, True), ("tuple3", 5, True), ("dict", 7, True)]
)
def test_model_return_forms(form, num_samples, has_aux):
    trainer, _ = make(form)
    outputs = trainer.train_on(BATCH)
    assert outputs.num_samples == num_samples
    assert not outputs.loss.requires_grad and outputs.loss.dim() == 0
    if has_aux:
        assert outputs.auxiliary_results.shape == (4,) and not outputs.auxiliary_results.requires_grad
    else:
        assert outputs.auxiliary_results is None


@pytest.mark.parametrize(
    "form,error,match",
    [
        ("no_loss", ValueError, r"returned a dict without a 'loss' key \(keys: \['predictions'\]\)"),
        ("none", TypeError, "must return a scalar loss tensor.*got builtins.NoneType"),
        ("vector", TypeError, "must return a scalar loss tensor.*torch.Tensor"),
    ],
)
def test_model_without_loss_is_a_clear_error(form, error, match):
    trainer, _ = make(form)
    with pytest.raises(error, match=match):
        trainer.train_on(BATCH)


@pytest.mark.parametrize(
    "form,error,match",
    [
        (
            "tuple4",
            ValueError,
            r"returned a tuple of 4 items: tuple of 4 \(Tensor\[\] float32, int 4, Tensor\[4\] float32, Tensor\[4\] "
            r"float32\); expected loss, \(loss,\), \(loss, auxiliary_results\), \(loss, num_samples, auxiliary_",
        ),
        (
            "swapped",
            TypeError,
            r"got torch.Tensor as the loss: Tensor\[4\] float32, in tuple of 2 \(Tensor\[4\] float32, Tensor\[\] "
            r"float32\); item 1 is a scalar: the loss comes first",
        ),
        ("vector", TypeError, r"as the loss: Tensor\[4\] float32.*must be reduced to its mean over the batch"),
    ],
)
def test_a_return_value_without_a_scalar_loss_names_its_types_and_shapes_before_any_step(form, error, match):
    trainer, model = make(form)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=match):
        trainer.train_on(BATCH)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_and_eval_modes_and_no_grad_in_evaluation():
    trainer, model = make()
    before = [p.clone() for p in model.parameters()]
    trainer.evaluate_loss(BATCH)
    assert model.seen_modes == [False] and model.seen_grad_enabled == [False]
    assert model.training  # mode restored after evaluation
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    trainer.train_on(BATCH)
    assert model.seen_modes[-1] is True and model.seen_grad_enabled[-1] is True
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_state_round_trip():
    trainer, model = make()
    trainer.train_on(BATCH)
    state = {
        k: {n: {key: (v.clone() if torch.is_tensor(v) else v) for key, v in sd.items()} for n, sd in d.items()}
        for k, d in trainer.get_state().items()
    }
    assert set(state) == {"model_components", "optimizers"} and set(state["model_components"]) == {"model"}
    other, other_model = make()
    other.set_state(state)
    for a, b in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"model_components in state \['other'\] do not match"):
        other.set_state({"model_components": {"other": {}}, "optimizers": {}})


def test_learning_rate():
    trainer, _ = make()
    assert trainer.get_learning_rate() == pytest.approx(0.1)
    trainer.set_learning_rate(0.01)
    assert trainer.optimizers["optimizer"].param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="optimizer_name 'adam' unknown"):
        trainer.set_learning_rate(0.1, "adam")


def test_named_optimizers_and_components():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    trainer = mlp.trainers.DefaultTrainer(
        optimizers={
            "encoder": torch.optim.SGD(a.parameters(), lr=0.1),
            "decoder": torch.optim.SGD(b.parameters(), lr=1),
        },
        model_components=[a, b],
    )
    assert list(trainer.optimizers) == ["encoder", "decoder"]
    assert list(trainer.model_components) == ["model_0", "model_1"]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(optimizers="adam"),
            TypeError,
            "optimizers: expected a torch.optim.optimizer.Optimizer.*'optimizer' is a builtins.str",
        ),
        (
            dict(model_components=[torch.nn.Linear(1, 1), 3]),
            TypeError,
            "model_components: expected a torch.nn.modules.module.Module",
        ),
        (dict(optimizers={1: None}), TypeError, "optimizers: names must be str, got key 1"),
        (dict(optimizers=[]), ValueError, "optimizers must not be empty"),
    ],
)
def test_bad_trainer_arguments(kwargs, error, match):
    """Wrong types are TypeErrors, wrong values ValueErrors (each case asserts its own)."""
    model = torch.nn.Linear(1, 1)
    arguments = dict(optimizers=torch.optim.SGD(model.parameters(), lr=0.1), model_components=model)
    arguments.update(kwargs)
    with pytest.raises(error, match=match) as raised:
        mlp.trainers.DefaultTrainer(**arguments)
    assert type(raised.value) is error


def test_bad_training_model():
    model = torch.nn.Linear(1, 1)
    trainer = mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(TypeError, match="training_model must be a torch.nn.Module"):
        trainer.set_training_model(lambda batch, settings: 0)
    with pytest.raises(TypeError, match=r"Linear.forward must accept \(batch_data, evaluate_settings"):
        trainer.set_training_model(model)


HOST_TRANSFERS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


def test_no_host_transfer_per_step_when_nothing_reads(monkeypatch):
    """Tensors become numbers only at the log period: no device sync at other steps. Every way a tensor reaches
    the host is counted (item, tolist, numpy, cpu, float(), int(), bool(), index); a deliberate break (logs
    converting the batch loss with float() at every step) makes every batch show a transfer."""
    conversions = []
    for name in HOST_TRANSFERS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _o=original, **k: conversions.append(_n) or _o(self, *a, **k)
        )
    trainer, _ = make()
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    printed, per_batch = [], []

    class CountTransfers(mlp.callbacks.Callback):
        def on_batch_checkpoint(self, logs):  # after every callback's batch-end hook
            per_batch.append(len(conversions))

    manager = mlp.trainers.TrainingManager(
        trainer,
        [BATCH] * 10,
        num_epochs=1,
        callbacks=[
            mlp.callbacks.TrainingMetricsLogger(evaluator),
            mlp.callbacks.LogProgress(log_period=5, set_names=["training"], write=printed.append),
            CountTransfers(),
        ],
    )
    manager.start_training()
    transfers = [after - before for before, after in zip([0, *per_batch], per_batch)]
    # Batch blocks after batch 5 and 10: one tolist() for the non-finite check of the 5 pending losses, one item()
    # for the batch loss, one tolist() for the window sums each; nothing at the other batches.
    assert transfers == [0, 0, 0, 0, 3, 0, 0, 0, 0, 3]
    assert conversions[:6] == ["tolist", "item", "tolist"] * 2
    assert len(printed) == 3


def test_device_placement_moves_batches(monkeypatch):
    """Every tensor of a batch is moved with ``.to(device, non_blocking=True)`` before the forward pass (it used to
    check only that a CPU batch gave a CPU loss, which holds without any move). Broken on purpose (no move in
    _forward), the recorded list is empty."""
    moved, original_to = [], torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor,
        "to",
        lambda self, *args, **kwargs: moved.append((args, kwargs)) or original_to(self, *args, **kwargs),
    )
    trainer, model = make(device="cpu")
    trainer.train_on((torch.randn(4, 3), torch.randn(4)))
    batch_moves = [(args, kwargs) for args, kwargs in moved if args and args[0] == torch.device("cpu")]
    assert batch_moves == [((torch.device("cpu"),), {"non_blocking": True})] * 2
