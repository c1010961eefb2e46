"""Several optimisation steps per trainer call (``BackendTrainer.steps_per_execution``) in the neutral TrainingManager,
on the pure-Python fake backend: how the batches are grouped into calls, that every batch hook still runs for every
batch with that batch's result, and that checkpoints, stops and failures stay exact."""

import logging

import numpy as np
import pytest

from mlpug.callbacks import (
    Callback,
    CheckpointManager,
    TestMetricsLogger,
    TrainingMetricsLogger,
)
from mlpug.callbacks.lr_scheduler import LRSchedulerWrapper
from mlpug.checkpointing import NumpyCheckpointSaver
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import SGD, FakeTrainer, LinearModel, TrainModel, make_batches

NUM_BATCHES = 10


class CallingTrainer(FakeTrainer):
    """The fake trainer with several steps per call: records the size of every call (and of every evaluation
    call), and trains them with the default ``train_on_batches`` (one ``train_on`` per batch)."""

    def __init__(self, steps_per_execution, evaluation_steps_per_execution=1):
        self.model = LinearModel()
        super().__init__(optimizers=SGD(0.1), model_components=self.model)
        self.set_training_model(TrainModel(self.model))
        self.steps_per_execution = steps_per_execution
        self.evaluation_steps_per_execution = evaluation_steps_per_execution
        self.calls, self.evaluation_calls = [], []

    def train_on_batches(self, batches, training_settings=None):
        self.calls.append(len(batches))
        return super().train_on_batches(batches, training_settings)

    def evaluate_losses(self, batches, evaluate_settings=None, inference_mode=True):
        self.evaluation_calls.append(len(batches))
        return super().evaluate_losses(batches, evaluate_settings, inference_mode)


class Record(Callback):
    """Per batch: the counters, the loss of the step result and the model weights seen in the batch-end hook."""

    def __init__(self, stop_at=None, fail_at=None):
        super().__init__("Record")
        self.rows, self.stop_at, self.fail_at = [], stop_at, fail_at

    def on_batch_training_completed(self, training_batch, logs):
        current, manager = logs["current"], self.training_manager
        self.rows.append((current["epoch"], current["batch_step"], current["global_iter"],
                          manager.step_result.loss.value, training_batch[0]))  # fmt: skip
        if self.stop_at == current["global_iter"]:
            manager.stop_training()
        if self.fail_at == current["global_iter"]:
            raise RuntimeError("injected failure in a batch hook")


def train(steps, num_epochs=2, callbacks=(), **manager_kwargs):
    trainer = CallingTrainer(steps)
    record = Record()
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=num_epochs,
                              callbacks=[record, *callbacks], **manager_kwargs)  # fmt: skip
    manager.start_training()
    return trainer, record, manager


def test_calls_hold_steps_per_execution_batches_and_end_at_epoch_ends():
    trainer, record, _ = train(4)
    assert trainer.calls == [4, 4, 2, 4, 4, 2]
    single, single_record, _ = train(1)
    assert single.calls == []  # one step per call: train_on, as before
    assert record.rows == single_record.rows  # every batch hook, in order, with that batch's loss and batch
    assert (trainer.model.w, trainer.model.b) == (single.model.w, single.model.b)


def checkpoint_manager(directory, **kwargs):
    return CheckpointManager(NumpyCheckpointSaver(), checkpoints_path=str(directory), metric_to_monitor=None,
                             batch_level=True, write_in_background=False, **kwargs)  # fmt: skip


def test_a_batch_level_checkpoint_ends_the_call_at_its_batch(tmp_path):
    manager_checkpoints = checkpoint_manager(tmp_path, create_checkpoint_every=3)
    assert [manager_checkpoints.batches_until_model_access(g) for g in (0, 1, 2, 3, 10)] == [3, 2, 1, 3, 2]
    trainer, _, _ = train(4, callbacks=[manager_checkpoints])
    # calls end at global iterations 3, 6, 9 (checkpoints), 10 (epoch end), 12, 15, 18 and 20
    assert trainer.calls == [3, 3, 3, 1, 2, 3, 3, 2]


def test_callbacks_that_need_the_model_every_batch_turn_calls_into_single_steps(caplog):
    class BeforeEveryStep(Callback):
        def on_batch_training_start(self, training_batch, logs):
            return True

    with caplog.at_level(logging.WARNING, logger="mlpug.TrainingManager"):
        trainer, _, _ = train(4, callbacks=[BeforeEveryStep()])
    assert trainer.calls == [1] * 2 * NUM_BATCHES
    assert "steps_per_execution=4 has no effect: callbacks ['BeforeEveryStep']" in caplog.text


def test_batch_level_evaluation_and_lr_schedules_need_every_batch_epoch_level_ones_do_not():
    evaluator = MetricEvaluator(trainer=CallingTrainer(4))
    assert (
        TestMetricsLogger(make_batches(2), "validation", evaluator, batch_level=True).batches_until_model_access(0) == 1
    )
    assert TestMetricsLogger(make_batches(2), "validation", evaluator).batches_until_model_access(0) is None
    assert TrainingMetricsLogger(evaluator).batches_until_model_access(0) is None

    class Schedule(LRSchedulerWrapper):
        def check_scheduler(self, name, scheduler):
            pass

    assert Schedule({"s": object()}, batch_level=True).batches_until_model_access(5) == 1
    assert Schedule({"s": object()}, batch_level=False).batches_until_model_access(5) is None


def test_a_stop_requested_inside_a_call_takes_effect_at_its_end():
    record_stop = Record(stop_at=5)
    trainer = CallingTrainer(4)
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=2, callbacks=[record_stop])
    manager.start_training()
    assert trainer.calls == [4, 4]  # asked during the second call (global iteration 5): it ends with that call
    assert [row[2] for row in record_stop.rows] == list(range(8))  # every trained batch got its hooks
    assert (manager.epoch, manager.batch_step, manager.global_iter) == (0, 8, 8)


def run_with_checkpoints(directory, steps, resume_from=None, record=None, num_epochs=2):
    trainer = CallingTrainer(steps)
    record = record or Record()
    callbacks = [record, checkpoint_manager(directory, create_checkpoint_every=3)]
    manager = TrainingManager(trainer, make_batches(NUM_BATCHES), num_epochs=num_epochs, callbacks=callbacks,
                              resume_from=resume_from)  # fmt: skip
    return trainer, record, manager


def test_resume_from_a_checkpoint_inside_a_call_of_four_is_exact(tmp_path):
    straight, straight_record, manager = run_with_checkpoints(tmp_path / "straight", 1)
    manager.start_training()
    first, _, manager = run_with_checkpoints(tmp_path / "run", 4, record=Record(stop_at=4))
    manager.start_training()  # checkpoint at global iteration 3 (the call ended there), stopped after 6
    assert first.calls == [3, 3]
    resumed, resumed_record, manager = run_with_checkpoints(tmp_path / "run", 4, resume_from="latest")
    manager.start_training()
    assert resumed.calls == [3, 1, 2, 3, 3, 2]  # from global iteration 6 (the training checkpoint at the stop)
    assert (resumed.model.w, resumed.model.b) == (straight.model.w, straight.model.b)
    assert resumed_record.rows == straight_record.rows[6:]


def test_a_failing_hook_inside_a_call_leaves_the_counters_after_the_call(tmp_path):
    """The model has trained every batch of the call: the emergency checkpoint resumes after them (the rest of
    their batch hooks is lost, as the rest of the failing batch's hooks is with one step per call)."""
    straight, straight_record, manager = run_with_checkpoints(tmp_path / "straight", 1)
    manager.start_training()
    failing, _, manager = run_with_checkpoints(tmp_path / "run", 4, record=Record(fail_at=4))
    with pytest.raises(RuntimeError, match="injected failure"):
        manager.start_training()
    assert (manager.batch_step, manager.global_iter) == (6, 6)  # the call of global iterations 3, 4 and 5
    emergency = str(tmp_path / "run" / "model-emergency-training-checkpoint.safetensors")
    resumed, resumed_record, manager = run_with_checkpoints(tmp_path / "run", 4, resume_from=emergency)
    manager.start_training()
    assert (resumed.model.w, resumed.model.b) == (straight.model.w, straight.model.b)
    assert resumed_record.rows == straight_record.rows[6:]


def test_dataset_evaluation_goes_to_evaluate_losses_in_blocks_with_the_same_values():
    values = {}
    for per_call in (1, 3):
        trainer = CallingTrainer(1, evaluation_steps_per_execution=per_call)
        trainer.model.w, trainer.model.b = 0.5, 0.25
        evaluator = MetricEvaluator(trainer=trainer)
        values[per_call] = float(evaluator.evaluate_dataset(make_batches(7))["loss"])
        assert trainer.evaluation_calls == ([] if per_call == 1 else [3, 3, 1])
    assert values[1] == values[3]
    assert np.isfinite(values[1]) and values[1] > 0
