"""Evaluation results as events (issue 26) on the pure-Python fake backend: ``RunContext.publish_result`` dispatches
``on_evaluation_result`` to every callback, once per result, oldest first, before the consumers' own part of the
hook; an undeclared dataset and a failing consumer are named."""

import pytest

from mlpug.callbacks import Callback, EarlyStopping, MetricsHistory
from mlpug.callbacks.lr_scheduler import LRSchedulerWrapper
from mlpug.logs import MetricValues
from mlpug.trainers.evaluation_result import EvaluationResult
from mlpug.trainers.run_context import RunContext
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import make_batches, make_trainer


class TwoAtOnce(Callback):
    """A producer that evaluates at every epoch end and publishes its results two epochs at a time (the epoch before
    and this one), as an asynchronous evaluation with a wait does: 0 at epoch 0's end... then (1, 2), (3, 4)."""

    publishes_results = frozenset({"holdout"})

    def __init__(self, losses):
        super().__init__("TwoAtOnce")
        self.losses, self.held = losses, []

    @property
    def produces(self):
        return frozenset({"holdout"})

    def on_epoch_completed(self, logs):
        current = logs["current"]
        epoch = current["epoch"]
        self.held.append(
            EvaluationResult("holdout", MetricValues(loss=self.losses[epoch]), epoch, current["batch_step"], epoch)
        )
        if epoch % 2 == 0:
            for result in self.held:
                self.context.publish_result(result)
            self.held = []
        return True


class Consumer(Callback):
    """Records each result it receives, and the order of its hooks."""

    def __init__(self):
        super().__init__("Consumer")
        self.events = []

    def on_evaluation_result(self, result, logs):
        self.events.append(("result", result.dataset_name, result.epoch))
        return True

    def on_epoch_completed(self, logs):
        self.events.append(("epoch_completed", logs["current"]["epoch"]))
        return True


class Plateau(LRSchedulerWrapper):
    """The neutral wrapper with a scheduler that records the metric of each step."""

    def __init__(self, stepped):
        super().__init__(object(), batch_level=False, metric_to_monitor="holdout.dataset.loss")
        self.stepped = stepped

    def check_scheduler(self, name, scheduler):
        pass

    def step_scheduler(self, name, scheduler, metric):
        self.stepped.append(metric)

    def scheduler_state(self, name, scheduler):
        return {}

    def load_scheduler_state(self, name, scheduler, state):
        pass


LOSSES = [5.0, 4.0, 4.5, 3.0, 6.0]


def train(callbacks, num_epochs=5):
    trainer, _ = make_trainer()
    manager = TrainingManager(trainer, make_batches(2), num_epochs=num_epochs, callbacks=callbacks)
    manager.start_training()
    return manager


def test_every_consumer_gets_every_result_once_in_order_before_its_own_epoch_end():
    consumer, history, stepped = Consumer(), MetricsHistory(), []
    stopping = EarlyStopping("holdout.dataset.loss", patience=10)
    train([consumer, stopping, history, Plateau(stepped), TwoAtOnce(LOSSES)])  # the producer last in the list
    assert consumer.events == [
        ("result", "holdout", 0),
        ("epoch_completed", 0),
        ("epoch_completed", 1),
        ("result", "holdout", 1),
        ("result", "holdout", 2),
        ("epoch_completed", 2),
        ("epoch_completed", 3),
        ("result", "holdout", 3),
        ("result", "holdout", 4),
        ("epoch_completed", 4),
    ]
    assert stepped == LOSSES  # LR on plateau: every result, once
    assert [row["holdout.dataset.loss"] for row in history.rows] == LOSSES  # each in its epoch's row
    assert (stopping.best, stopping.epochs_without_improvement) == (3.0, 1)  # 5, 4, 4.5 (+1), 3 (best), 6 (+1)


def test_the_context_is_typed_and_a_callback_is_told_when_it_has_none():
    consumer = Consumer()
    with pytest.raises(RuntimeError, match="'Consumer' is not part of a TrainingManager yet"):
        _ = consumer.context
    manager = train([consumer], num_epochs=1)
    assert isinstance(consumer.training_manager, RunContext) and consumer.context is manager.context
    assert consumer.context.global_iter == 2 and consumer.context.logs is manager.logs


def test_a_result_of_an_undeclared_dataset_is_refused_naming_it():
    class Undeclared(Callback):
        def on_epoch_completed(self, logs):
            self.context.publish_result(EvaluationResult("mystery", MetricValues(loss=1.0), 0, 0, 0))
            return True

    with pytest.raises(ValueError, match="'mystery' was published, but no callback declares it in publishes_results"):
        train([Undeclared("Undeclared")], num_epochs=1)


def test_a_consumer_that_fails_on_a_result_is_named_not_the_producer():
    class Failing(Callback):
        def on_evaluation_result(self, result, logs):
            raise RuntimeError("consumer broke")

    with pytest.raises(RuntimeError, match="consumer broke") as raised:
        train([TwoAtOnce(LOSSES), Failing("Failing")], num_epochs=1)
    notes = raised.value.__notes__
    assert "mlpug: raised by callback 'Failing' in on_evaluation_result" in notes
    assert not any("TwoAtOnce" in note for note in notes)


def test_a_repeated_epoch_end_does_not_step_the_schedule_again_after_a_resume():
    """A failed epoch-end hook leaves the state of that epoch end, with the schedule already stepped for its result
    (the emergency checkpoint holds that state); the resumed run repeats the epoch end, which publishes the result
    again, and the schedule must not step twice."""

    class FailsOnce(Callback):
        def on_epoch_completed(self, logs):
            raise RuntimeError("epoch-end hook failed")

    stepped = []
    trainer, _ = make_trainer()
    failing = TrainingManager(
        trainer, make_batches(2), num_epochs=3, callbacks=[TwoAtOnce(LOSSES), Plateau(stepped), FailsOnce("Hook")]
    )
    with pytest.raises(RuntimeError, match="epoch-end hook failed"):
        failing.start_training()
    state = failing.get_state()
    assert stepped == [LOSSES[0]] and (state["epoch"], state["batch_step"]) == (0, 2)
    resumed = TrainingManager(
        trainer, make_batches(2), num_epochs=3, callbacks=[TwoAtOnce(LOSSES), Plateau(stepped), Callback("Hook")]
    )
    resumed.set_state(state)
    resumed.start_training()
    assert stepped == LOSSES[:3]  # epoch 0 once, then 1 and 2
