"""The non-finite policies on the fake backend: weights that turn NaN while the loss stays finite, the points where
the weights are checked (never per step), a NaN monitored or dataset metric, and messages that are true when no
checkpoint was written yet (issue 25, items 3, 4 and 8)."""

import logging
import math
import os

import pytest

from mlpug.callbacks import Callback, CheckpointManager, TestMetricsLogger
from mlpug.checkpointing import NumpyCheckpointSaver
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.non_finite import NonFiniteLossError, NonFiniteMetricError, NonFiniteWeightsError
from mlpug.trainers.trainer import BackendTrainer
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import FakeScalar, FakeTrainer, TrainModel, make_batches, make_trainer
from tests.recording import RecordingCallback

NUM_BATCHES = 10


class NanGradientModel(TrainModel):
    """A finite loss at every call, but a NaN gradient of ``w`` at call ``nan_at`` (1-based): ``w`` turns NaN, and
    the loss stays finite afterwards (as a model that hides a NaN input row from its loss)."""

    def __init__(self, model, nan_at):
        super().__init__(model)
        self.nan_at = nan_at

    def __call__(self, batch, evaluate_settings, inference_mode=None):
        result = super().__call__(batch, evaluate_settings, inference_mode)
        if not math.isfinite(result["loss"].value):
            result["loss"] = FakeScalar(1.0)  # the loss says nothing
        if self.calls == self.nan_at:
            result["auxiliary_results"]["grads"] = (math.nan, 0.0)
        return result


class NanLossModel(TrainModel):
    def __call__(self, batch, evaluate_settings, inference_mode=None):
        result = super().__call__(batch, evaluate_settings, inference_mode)
        result["loss"] = FakeScalar(math.nan)
        return result


def nan_gradient_trainer(nan_at=3):
    trainer, model = make_trainer()
    trainer.set_training_model(NanGradientModel(model, nan_at))
    return trainer, model


@pytest.fixture
def logged(caplog):
    logging.getLogger("mlpug").propagate = True
    with caplog.at_level(logging.INFO, logger="mlpug"):
        yield caplog
    logging.getLogger("mlpug").propagate = False


def test_weights_that_turn_nan_with_a_finite_loss_end_the_run_at_the_epoch_end(logged):
    """Before the weight policy this run ended "Training completed. All good!" with w = nan."""
    trainer, model = nan_gradient_trainer(nan_at=3)
    recorder = RecordingCallback()
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=2, callbacks=[recorder])
    with pytest.raises(NonFiniteWeightsError) as caught:
        manager.start_training()
    error = caught.value
    assert error.names == ["model.w", "model.b"] and math.isnan(model.w)  # b followed at the next step
    assert (error.global_iter, error.epoch, error.batch_step, error.last_finite_iter) == (9, 0, 9, None)
    assert "after global iteration 9 (epoch 0, batch step 9): model.w, model.b (no earlier check in this run)" in str(
        error
    )
    assert recorder.ended_with["stopped_on_error"] is True
    assert ("on_epoch_completed", 0) not in recorder.calls  # found before the epoch-end hooks
    assert "All good" not in logged.text and "Training ended on an error" in logged.text


def test_the_weights_are_checked_every_n_steps_at_epoch_ends_and_at_the_end_never_per_step():
    trainer, _ = make_trainer()
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=2, check_weights_every=4)
    FakeTrainer.weight_checks = 0
    manager.start_training()
    # after 4 and 8 steps, the end of epoch 0 (10), 4 and 8 steps after it (14, 18), the end of epoch 1 (20); the
    # end of training is the same step as the last epoch end: one check
    assert FakeTrainer.weight_checks == 6
    FakeTrainer.weight_checks = 0
    TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=2, check_weights_every=None).start_training()
    assert FakeTrainer.weight_checks == 2


def test_every_n_steps_names_the_first_check_that_found_them():
    trainer, _ = nan_gradient_trainer(nan_at=3)
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=1, check_weights_every=2)
    with pytest.raises(NonFiniteWeightsError, match=r"after global iteration 3 \(epoch 0, batch step 3\)") as caught:
        manager.start_training()
    assert caught.value.last_finite_iter == 1
    assert "the previous check, after global iteration 1, found every weight finite" in str(caught.value)


def test_the_check_before_a_checkpoint_write_runs_on_every_rank_and_keeps_the_last_good_file(tmp_path, logged):
    trainer, _ = nan_gradient_trainer(nan_at=3)
    checkpoint_manager = CheckpointManager(
        NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None, batch_level=True, write_in_background=False
    )
    manager = TrainingManager(
        trainer, make_batches(NUM_BATCHES), num_epochs=1, callbacks=[checkpoint_manager], check_weights_every=None
    )
    with pytest.raises(NonFiniteWeightsError, match=r"after global iteration 2 \(epoch 0, batch step 2\)"):
        manager.start_training()
    state = NumpyCheckpointSaver().load(checkpoint_manager.file_names.training, kind="training")
    assert state["global_iter"] == 2 and math.isfinite(state["trainer"]["model_components"]["model"]["w"])
    assert "Not writing" not in logged.text  # stopped before a write of NaN weights was tried
    assert not os.path.exists(checkpoint_manager.file_names.emergency_training)
    assert (
        f"the last good training checkpoint is {checkpoint_manager.file_names.training} (written in this run, "
        "resuming at epoch 0, batch step 2, global iteration 2)" in logged.text
    )


def test_warn_goes_on_but_never_says_all_good(logged):
    trainer, model = nan_gradient_trainer(nan_at=3)
    manager = TrainingManager(
        trainer, make_batches(NUM_BATCHES), num_epochs=2, non_finite_weights="warn", check_weights_every=None
    )
    manager.start_training()  # returns: the user asked for it
    assert math.isnan(model.w)
    warnings = [r.getMessage() for r in logged.records if r.levelno == logging.WARNING]
    assert sum("The trainable weights hold NaN" in w for w in warnings) == 1  # once, at the first check
    assert any("Training ended with non-finite trainable weights (2: model.w, model.b)" in w for w in warnings)
    assert "Training completed, but the trainable weights are not finite" in logged.text
    assert "All good" not in logged.text


def test_a_nan_loss_before_any_checkpoint_says_none_was_written(tmp_path, logged):
    """Before: "the last good training checkpoint is <a file that does not exist>"."""
    trainer, model = make_trainer()
    trainer.set_training_model(NanLossModel(model))
    checkpoint_manager = CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None)
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), callbacks=[checkpoint_manager])
    with pytest.raises(NonFiniteLossError, match="an earlier one, if any, is kept"):
        manager.start_training()
    assert not os.path.exists(checkpoint_manager.file_names.training)
    assert "no training checkpoint was written yet" in logged.text and "last good" not in logged.text


# ----- non-finite metrics -----
def nan_validation_run(tmp_path, metric_to_monitor="validation.dataset.loss", run_async=False, **checkpoint_kwargs):
    trainer, _ = make_trainer()
    validation = make_batches(3)
    validation[1][0] = (math.nan, 0.0)  # one NaN input: the validation loss is NaN for any weights
    callbacks = [
        TestMetricsLogger(validation, "validation", MetricEvaluator(trainer=trainer), run_async=run_async),
        CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=metric_to_monitor,
                          **checkpoint_kwargs),
        RecordingCallback(),
    ]  # fmt: skip
    return TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=3, callbacks=callbacks), callbacks[1]


@pytest.mark.parametrize("run_async", [False, True], ids=["sync", "async"])
def test_a_nan_monitored_metric_is_an_error_naming_it_and_the_epoch(tmp_path, logged, run_async):
    manager, checkpoint_manager = nan_validation_run(tmp_path, run_async=run_async)
    with pytest.raises(NonFiniteMetricError, match="'validation.dataset.loss' is nan at epoch 0") as caught:
        manager.start_training()
    assert caught.value.epoch == 0
    assert "TestMetricsLogger[validation]: not finite for the weights of epoch 0" in logged.text
    assert not os.path.exists(checkpoint_manager.file_names.best_model) and "All good" not in logged.text


def test_a_nan_result_landing_at_the_end_of_training_is_raised_after_the_training_checkpoint(tmp_path, logged):
    """Asynchronous: a stop at the end of epoch 0 lands its evaluation in on_training_checkpoint."""
    manager, checkpoint_manager = nan_validation_run(tmp_path, run_async=True, create_checkpoint_every=5)
    manager.callbacks[2].actions = {("on_epoch_start", 1): lambda m: m.stop_training()}
    with pytest.raises(NonFiniteMetricError, match="is nan at epoch 0"):
        manager.start_training()
    state = NumpyCheckpointSaver().load(checkpoint_manager.file_names.training, kind="training")
    assert state["global_iter"] == NUM_BATCHES  # written by on_training_checkpoint (the stop), before the error
    assert "Training ended, but 1 end hook(s) raised" in logged.text and "All good" not in logged.text


def test_a_nan_dataset_metric_without_a_monitor_warns_every_epoch(tmp_path, logged):
    manager, _ = nan_validation_run(tmp_path, metric_to_monitor=None)
    manager.start_training()
    warnings = [r.getMessage() for r in logged.records if r.levelno == logging.WARNING]
    for epoch in range(3):
        assert sum(f"weights of epoch {epoch} " in w and "validation.dataset.loss = nan" in w for w in warnings) == 1


def test_non_finite_metric_warn_goes_on_and_summarises(tmp_path, logged):
    manager, checkpoint_manager = nan_validation_run(tmp_path, non_finite_metric="warn")
    manager.start_training()
    assert "was not finite at 3 check(s) of this run; no best model" in logged.text
    assert not os.path.exists(checkpoint_manager.file_names.best_model)


def test_with_several_steps_per_call_the_weights_are_checked_after_the_call(monkeypatch):
    """The every-n-steps check runs after the call that reaches n (the weights then are the call's last step's)."""
    trainer, _ = nan_gradient_trainer(nan_at=3)
    monkeypatch.setattr(trainer, "steps_per_execution", 4, raising=False)
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=1, check_weights_every=3)
    FakeTrainer.weight_checks = 0
    with pytest.raises(NonFiniteWeightsError, match=r"after global iteration 3 \(epoch 0, batch step 3\)") as caught:
        manager.start_training()
    assert FakeTrainer.weight_checks == 1 and caught.value.last_finite_iter is None


def test_the_failure_note_names_the_check_of_the_loop():
    trainer, _ = nan_gradient_trainer(nan_at=3)
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=1, check_weights_every=None)
    with pytest.raises(NonFiniteWeightsError) as caught:
        manager.start_training()
    assert caught.value.__notes__ == [
        "mlpug: training failed at the check of the losses and weights after global iteration 9 (epoch 0, batch step 9)"
    ]


class DelegatingTrainer(BackendTrainer):
    """A third-party ``Trainer`` written against the contract before ``non_finite_weights`` existed: it implements
    every other abstract method (delegating to the fake backend's trainer)."""

    def __init__(self):
        self.fake, _ = make_trainer()

    def set_training_model(self, training_model):
        self.fake.set_training_model(training_model)

    def train_on(self, batch, training_settings=None):
        return self.fake.train_on(batch, training_settings)

    def evaluate_loss(self, batch, evaluate_settings=None, inference_mode=True):
        return self.fake.evaluate_loss(batch, evaluate_settings, inference_mode)

    def get_state(self):
        return self.fake.get_state()

    def set_state(self, state):
        self.fake.set_state(state)

    def set_learning_rate(self, learning_rate, optimizer_name=None):
        self.fake.set_learning_rate(learning_rate, optimizer_name)

    def get_learning_rate(self, optimizer_name=None):
        return self.fake.get_learning_rate(optimizer_name)

    def ensure_ready(self):
        self.fake.ensure_ready()


class OtherDelegatingTrainer(DelegatingTrainer):
    pass


def test_a_trainer_without_non_finite_weights_trains_and_warns_once_per_class_that_weights_are_unchecked(
    caplog, monkeypatch
):
    """A ``Trainer`` subclass that does not implement ``non_finite_weights`` (added to the contract by issue 25) still
    constructs and trains; the default reports no non-finite weights and warns, once per class, that this trainer
    cannot check them. Broken on purpose (``non_finite_weights`` abstract), constructing it raises TypeError: this
    test fails."""
    monkeypatch.setattr(BackendTrainer, "_warned_unchecked_weights", set())  # none warned before, whatever ran earlier
    with caplog.at_level(logging.WARNING, logger="mlpug"):  # pytest attaches its handler to "mlpug" too
        for trainer_type in (DelegatingTrainer, DelegatingTrainer, OtherDelegatingTrainer):
            trainer = trainer_type()
            manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=2, check_weights_every=3)
            manager.start_training()  # checks at every 3 steps, at epoch ends and at the end: each time []
            assert trainer.non_finite_weights() == []
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    for warning, name in zip(warnings, ("DelegatingTrainer", "OtherDelegatingTrainer")):
        assert warning.startswith(f"{name} does not implement non_finite_weights()"), warning
        assert "cannot be checked for NaN or infinite values" in warning


def test_weights_swapped_in_by_an_epoch_end_hook_are_checked_again_before_the_checkpoint_write(tmp_path, caplog):
    """A callback swaps other weights in at the epoch end (EMA / SWA style, here NaN ones), after the loop checked the
    weights at that step: the CheckpointManager's check before its write checks them again, so the policy (``"raise"``)
    ends training before the write (it always checks: at most one more device wait per write, which waits anyway).
    Broken on purpose (two checks at one step are one), the write is refused only by the saver ("Not writing", an
    ERROR) and training goes on with NaN weights: this test fails."""
    trainer, model = make_trainer()

    class SwapInWeights(Callback):
        def on_epoch_completed(self, logs):
            model.w = math.nan
            return True

    checkpoint_manager = CheckpointManager(
        NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None, write_in_background=False
    )
    callbacks = [SwapInWeights(), checkpoint_manager]
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=2, callbacks=callbacks)
    with caplog.at_level(logging.INFO, logger="mlpug"), pytest.raises(NonFiniteWeightsError) as caught:
        manager.start_training()
    assert caught.value.global_iter == NUM_BATCHES - 1 and caught.value.names == ["model.w"]
    assert "Not writing" not in caplog.text and not os.path.exists(checkpoint_manager.file_names.training)
