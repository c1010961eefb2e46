"""PyTorch ``LRSchedulerWrapper``: the logged learning rates are the scheduler's own sequence, a resume continues
it, ReduceLROnPlateau follows the monitored metric, and a skipped optimizer step does not step the schedule."""

import pytest
import torch

import mlpug.pytorch as mlp

NUM_BATCHES = 3


def make_problem(nan_at_batch=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(NUM_BATCHES)
    ]
    if nan_at_batch is not None:
        batches[nan_at_batch][0][0, 0] = float("nan")

    class TrainModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch_data, evaluate_settings, inference_mode=None):
            inputs, targets = batch_data
            return torch.nn.functional.mse_loss(self.model(inputs), targets)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model)
    trainer.set_training_model(TrainModel())
    return trainer, optimizer, batches


class RecordLR(mlp.callbacks.Callback):
    def __init__(self):
        super().__init__("RecordLR")
        self.rates = []

    def on_batch_training_completed(self, training_batch, logs):
        self.rates.append(logs["current"]["training_params"]["batch"]["lr"])
        return True


class Scripted(mlp.callbacks.Callback):
    """``logs.current.scripted.dataset.loss`` from a fixed sequence, and a stop after epoch ``stop_after``."""

    def __init__(self, values=None, stop_after=None):
        super().__init__("Scripted")
        self.values, self.stop_after = values or [0.0] * 10, stop_after

    @property
    def produces(self):
        return frozenset({"scripted"})

    def on_epoch_completed(self, logs):
        epoch = logs["current"]["epoch"]
        logs["current"]["scripted"] = {"dataset": {"loss": self.values[epoch]}}
        if epoch == self.stop_after:
            self.training_manager.stop_training()
        return True


def run(make_scheduler, num_epochs=2, wrapper_options=None, scripted=None, directory=None, resume=False, **problem):
    trainer, optimizer, batches = make_problem(**problem)
    recorder = RecordLR()
    callbacks = [
        mlp.callbacks.LRSchedulerWrapper(make_scheduler(optimizer), **(wrapper_options or {})),
        recorder,
        scripted or Scripted(),
    ]
    if directory is not None:
        callbacks.append(mlp.callbacks.CheckpointManager(checkpoints_path=str(directory), metric_to_monitor=None))
    manager = mlp.trainers.TrainingManager(
        trainer, batches, num_epochs=num_epochs, callbacks=callbacks, resume_from="latest" if resume else None,
        non_finite_loss="skip_step", handle_signals=False,
    )  # fmt: skip
    manager.start_training()
    return recorder.rates


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def own_sequence(make_scheduler, steps):
    """The scheduler's own learning rates for ``steps`` optimizer steps, stepped by hand."""
    _, optimizer, _ = make_problem()
    scheduler, rates = make_scheduler(optimizer), []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_logged_learning_rates_are_the_schedulers_own_sequence():
    rates = run(step_lr)
    assert rates == own_sequence(step_lr, 2 * NUM_BATCHES) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    warm_up = lambda optimizer: torch.optim.lr_scheduler.SequentialLR(  # noqa: E731
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, 0.25, total_iters=2),
            torch.optim.lr_scheduler.StepLR(optimizer, 2),
        ],
        milestones=[2],
    )
    assert run(warm_up) == pytest.approx(own_sequence(warm_up, 2 * NUM_BATCHES))


def test_a_resumed_run_continues_the_schedule(tmp_path):
    first = run(step_lr, num_epochs=2, scripted=Scripted(stop_after=0), directory=tmp_path)
    resumed = run(step_lr, num_epochs=2, directory=tmp_path, resume=True)
    assert first + resumed == own_sequence(step_lr, 2 * NUM_BATCHES)


def test_reduce_lr_on_plateau_follows_the_monitored_metric_at_epoch_ends():
    """The metric improves twice, then gets worse: with patience 0 the rate halves after epochs 2 and 3."""
    plateau = lambda optimizer: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)  # noqa: E731
    options = {"batch_level": False, "metric_to_monitor": "scripted.dataset.loss"}
    rates = run(plateau, num_epochs=5, wrapper_options=options, scripted=Scripted([1.0, 0.5, 0.7, 0.9, 1.1]))
    assert rates == pytest.approx([0.1] * 9 + [0.05] * 3 + [0.025] * 3)


def test_a_skipped_optimizer_step_does_not_step_the_schedule():
    """Batch 1 of each epoch has a NaN input: its step is skipped (non_finite_loss="skip_step"), the schedule
    waits: 4 steps taken in 6 batches."""
    rates = run(step_lr, nan_at_batch=1)
    assert rates == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])


def test_bad_schedulers_are_errors_at_construction():
    _, optimizer, _ = make_problem()
    with pytest.raises(TypeError, match="must be a torch.optim.lr_scheduler scheduler .* got a builtins.str"):
        mlp.callbacks.LRSchedulerWrapper("cosine")
    with pytest.raises(ValueError, match="is a ReduceLROnPlateau, which steps on a metric"):
        mlp.callbacks.LRSchedulerWrapper(torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer), batch_level=False)
    with pytest.raises(ValueError, match="does not take a metric"):
        mlp.callbacks.LRSchedulerWrapper(
            step_lr(optimizer), batch_level=False, metric_to_monitor="scripted.dataset.loss"
        )
    with pytest.raises(ValueError, match="is read at the end of an epoch: pass batch_level=False"):
        mlp.callbacks.LRSchedulerWrapper(step_lr(optimizer), metric_to_monitor="validation.dataset.loss")
