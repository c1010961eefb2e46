"""PyTorch mixed precision: bfloat16 autocast (CPU), float16 with GradScaler (CPU scaler; CUDA where present).

Tolerances: low-precision gradients are compared with float32 ones relative to the largest gradient
magnitude of each tensor: bfloat16 (8 significant bits) within 3 %, float16 (11 bits) within 0.5 %.
"""

import sys
from pathlib import Path

import pytest
import torch

import mlpug.pytorch as mlp
from mlpug.pytorch.trainers.precision import FullPrecision, MixedPrecision

ROOT = Path(__file__).resolve().parents[2]


def make_classifier(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)).to(device)


def make_batches(num_batches, size=10, device="cpu"):
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(size, 6, generator=generator).to(device),
            torch.randint(0, 3, (size,), generator=generator).to(device),
        )
        for _ in range(num_batches)
    ]


class TrainModel(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        logits = self.classifier(features)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "auxiliary_results": logits}


def make_trainer(device="cpu", optimizer="adam", **kwargs):
    classifier = make_classifier(device=device)
    if optimizer == "adam":
        opt = torch.optim.Adam(classifier.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(classifier.parameters(), lr=0.1)
    trainer = mlp.trainers.DefaultTrainer(opt, classifier, **kwargs)
    trainer.set_training_model(TrainModel(classifier))
    return trainer, classifier, opt


def assert_grads_close(module, reference, relative):
    for parameter, expected in zip(module.parameters(), reference.parameters()):
        scale = expected.grad.abs().max().item()
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=0, atol=relative * scale)


def test_full_precision_is_the_default_null_policy():
    trainer, _, _ = make_trainer()
    assert type(trainer.precision) is FullPrecision
    assert "grad_scaler" not in trainer.get_state()
    outputs = trainer.train_on(make_batches(1)[0])
    assert outputs.auxiliary_results.dtype == torch.float32 and outputs.optimizer_step_skipped is False


@pytest.mark.parametrize("batch_chunk_size", [None, 4])
def test_bfloat16_autocast_on_cpu_trains_with_close_gradients(batch_chunk_size):
    batch = make_batches(1)[0]
    reference, reference_classifier, _ = make_trainer(optimizer="sgd")
    trainer, classifier, _ = make_trainer(
        optimizer="sgd", use_mixed_precision=True, autocast_dtype="bfloat16", batch_chunk_size=batch_chunk_size
    )
    assert isinstance(trainer.precision, MixedPrecision) and trainer.precision.device_type == "cpu"
    assert trainer.precision.grad_scaler is None  # bfloat16 needs no loss scaling
    reference_outputs = reference.train_on(batch)
    outputs = trainer.train_on(batch)
    assert outputs.auxiliary_results.dtype == torch.bfloat16  # the forward pass ran under autocast
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in classifier.parameters())
    assert_grads_close(classifier, reference_classifier, relative=0.03)
    torch.testing.assert_close(outputs.loss, reference_outputs.loss, rtol=0.02, atol=0)
    assert "grad_scaler" not in trainer.get_state()
    evaluated = trainer.evaluate_loss(batch)
    assert evaluated.auxiliary_results.dtype == torch.bfloat16  # evaluation uses the same autocast


@pytest.mark.parametrize("batch_chunk_size", [None, 4])
def test_float16_with_grad_scaler_gives_unscaled_gradients(batch_chunk_size):
    batch = make_batches(1)[0]
    reference, reference_classifier, _ = make_trainer(optimizer="sgd")
    trainer, classifier, _ = make_trainer(
        optimizer="sgd", use_mixed_precision=True, autocast_dtype="float16", batch_chunk_size=batch_chunk_size
    )
    scaler = trainer.precision.grad_scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    reference.train_on(batch)
    outputs = trainer.train_on(batch)
    assert outputs.auxiliary_results.dtype == torch.float16
    assert not outputs.optimizer_step_skipped
    assert scaler.get_scale() == 2.0**16  # one scale update per batch, not per chunk; no overflow
    assert_grads_close(classifier, reference_classifier, relative=0.005)  # scaler.step unscaled the gradients
    for parameter, expected in zip(classifier.parameters(), reference_classifier.parameters()):
        torch.testing.assert_close(parameter, expected, rtol=0, atol=1e-3)


def test_injected_inf_gradient_skips_the_step_lowers_the_scale_and_is_logged():
    trainer, classifier, optimizer = make_trainer(use_mixed_precision=True, autocast_dtype="float16")
    scaler = trainer.precision.grad_scaler
    batches = make_batches(4)
    inject = {"now": False}
    classifier[0].weight.register_hook(lambda grad: grad * float("inf") if inject["now"] else grad)
    observed = []

    class InjectAndObserve(mlp.callbacks.Callback):
        def on_batch_training_start(self, training_batch, logs):
            inject["now"] = logs["current"]["global_iter"] == 1
            self.before = [p.detach().clone() for p in classifier.parameters()]

        def on_batch_training_completed(self, training_batch, logs):
            unchanged = all(torch.equal(b, p) for b, p in zip(self.before, classifier.parameters()))
            skipped = logs["current"]["training_params"]["batch"]["optimizer_step_skipped"]
            observed.append((skipped, unchanged, scaler.get_scale()))

    manager = mlp.trainers.TrainingManager(trainer, batches, callbacks=[InjectAndObserve()], handle_signals=False)
    manager.start_training()
    assert observed == [
        (False, False, 2.0**16),
        (True, True, 2.0**15),
        (False, False, 2.0**15),
        (False, False, 2.0**15),
    ]
    assert optimizer.state_dict()["state"][0]["step"].item() == 3  # Adam counted only the steps taken


@pytest.mark.parametrize("made", ["fused_at_construction", "switched_by_the_one_call_api"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_fused_optimizer_skips_in_its_kernel_and_the_skip_is_reported(clip, made):
    """``Adam(fused=True)``, or an ``Adam`` switched by ``use_fused_implementation`` (what ``mlp.Trainer`` does):
    the scaler hands ``found_inf`` to the fused kernel and always calls ``step()``, which then skips inside the
    kernel; the trainer reports that skip (a lazy 0-d tensor), also after clipping's ``unscale_``, and the next
    good step is reported as taken."""
    classifier = make_classifier()
    if made == "fused_at_construction":
        optimizer = torch.optim.Adam(classifier.parameters(), lr=0.01, fused=True)
    else:
        optimizer = torch.optim.Adam(classifier.parameters(), lr=0.01)
        assert mlp.one_call.use_fused_implementation(optimizer, classifier)
    found_infs = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: found_infs.append(getattr(opt, "found_inf", None)))
    trainer = mlp.trainers.DefaultTrainer(
        optimizer, classifier, use_mixed_precision=True, autocast_dtype="float16", clip_gradients_norm=clip
    )
    trainer.set_training_model(TrainModel(classifier))
    first, second = make_batches(2)
    handle = classifier[2].bias.register_hook(lambda grad: grad * float("nan"))
    before = [p.detach().clone() for p in classifier.parameters()]
    skipped = trainer.train_on(first).optimizer_step_skipped
    handle.remove()
    assert bool(skipped) and all(torch.equal(b, p) for b, p in zip(before, classifier.parameters()))
    assert trainer.precision.grad_scaler.get_scale() == 2.0**15
    assert not bool(trainer.train_on(second).optimizer_step_skipped)
    assert not all(torch.equal(b, p) for b, p in zip(before, classifier.parameters()))
    assert len(found_infs) == 2 and all(isinstance(f, torch.Tensor) for f in found_infs)  # stepped in the kernel


def test_grad_scaler_state_round_trip():
    trainer, classifier, _ = make_trainer(use_mixed_precision=True, autocast_dtype="float16")
    handle = classifier[2].bias.register_hook(lambda grad: grad * float("nan"))
    for batch in make_batches(2):  # two skipped steps: the scale halves twice
        trainer.train_on(batch)
    handle.remove()
    state = trainer.get_state()
    assert state["grad_scaler"]["scale"] == 2.0**14
    restored, _, _ = make_trainer(use_mixed_precision=True, autocast_dtype="float16")
    assert restored.precision.grad_scaler.get_scale() == 2.0**16
    restored.set_state(state)
    assert restored.precision.grad_scaler.get_scale() == 2.0**14
    result = restored.train_on(make_batches(1)[0])
    assert restored.precision.grad_scaler.get_scale() == 2.0**14 and not result.optimizer_step_skipped
    without_scaler, _, _ = make_trainer(use_mixed_precision=True, autocast_dtype="bfloat16")
    without_scaler.set_state(state)  # a scaler state from a float16 run is ignored without a scaler
    full_precision_state = {k: v for k, v in state.items() if k != "grad_scaler"}
    restored.set_state(full_precision_state)  # no scaler state: the current scaler is kept
    assert restored.precision.grad_scaler.get_scale() == 2.0**14


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(use_mixed_precision=True, autocast_dtype="fp16"), ValueError, "autocast_dtype must be one of .* 'fp16'"),
        (dict(use_mixed_precision=True, autocast_dtype=torch.float16), ValueError, "torch.float16"),
        (dict(autocast_dtype="float16"), ValueError, "has no effect without use_mixed_precision=True"),
        (dict(use_mixed_precision="yes"), TypeError, "use_mixed_precision must be a bool, got 'yes'"),
    ],
)
def test_bad_precision_arguments_are_rejected_at_construction(kwargs, error, message):
    classifier = make_classifier()
    with pytest.raises(error, match=message):
        mlp.trainers.DefaultTrainer(torch.optim.SGD(classifier.parameters(), lr=0.1), classifier, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on the CI machines)")
def test_cuda_float16_with_grad_scaler_trains():
    trainer, classifier, _ = make_trainer(device="cuda", use_mixed_precision=True, autocast_dtype="float16")
    assert trainer.precision.device_type == "cuda" and trainer.precision.grad_scaler.is_enabled()
    losses = [trainer.train_on(batch).loss.item() for batch in make_batches(20, device="cuda")]
    assert all(torch.isfinite(p).all() for p in classifier.parameters())
    assert losses[-1] < losses[0]


def test_fashion_mnist_bfloat16_one_epoch_reaches_80_percent(fashion_mnist_dir, capsys):
    sys.path.insert(0, str(ROOT / "examples" / "fashion_mnist" / "pytorch"))
    try:
        import train as fashion_mnist_example
    finally:
        sys.path.pop(0)
    manager = fashion_mnist_example.main(
        ["--num-epochs", "1", "--data-dir", fashion_mnist_dir, "--log-period", "1000", "--mixed-precision", "bfloat16"]
    )
    assert manager.trainer.precision.autocast_dtype == "bfloat16"
    validation = manager.logs["current"]["validation"]["dataset"]
    assert validation["accuracy"] >= 0.80
    assert "Training completed. All good!" in capsys.readouterr().out
