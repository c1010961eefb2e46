"""The neutral TrainingManager driven by the pure-Python fake backend."""

import itertools
import logging
import math
import signal

import pytest

from mlpug.callbacks import HOOKS, Callback, LogProgress, TestMetricsLogger, TrainingMetricsLogger
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.callback import dispatch_order
from mlpug.trainers.hook_dispatcher import HookDispatcher
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import FakeScalar, make_batches, make_trainer
from tests.recording import RecordingCallback


def make_manager(callbacks, num_epochs=2, num_batches=3, fail_at_call=None, **kwargs):
    trainer, model = make_trainer(fail_at_call)
    dataset = kwargs.pop("dataset", make_batches(num_batches))
    return TrainingManager(trainer, dataset, num_epochs=num_epochs, callbacks=callbacks, **kwargs), model


def expected_calls(num_epochs, num_batches):
    calls = [("set_training_manager", None), ("on_training_start", (num_epochs, num_batches, 0, 0, 0))]
    global_iter = 0
    for epoch in range(num_epochs):
        calls.append(("on_epoch_start", epoch))
        for step in range(num_batches):
            calls.append(("on_batch_training_start", (epoch, step, global_iter)))
            calls.append(("on_batch_training_completed", (epoch, step, global_iter)))
            calls.append(("on_batch_checkpoint", (epoch, step, global_iter)))
            global_iter += 1
        calls.append(("on_epoch_completed", epoch))
        calls.append(("on_epoch_checkpoint", epoch))
    calls.append(("on_training_checkpoint", (False, False, False)))
    calls.append(
        (
            "on_training_ended",
            dict(stopped_early=False, stopped_on_error=False, interrupted=False, callback_calls_success=True),
        )
    )
    return calls


@pytest.mark.parametrize("num_epochs,num_batches", [(1, 1), (2, 3), (3, 5)])
def test_exact_hook_order_and_counts(num_epochs, num_batches):
    recorder = RecordingCallback()
    manager, _ = make_manager([recorder], num_epochs, num_batches)
    manager.start_training()
    assert recorder.calls == expected_calls(num_epochs, num_batches)
    assert (manager.epoch, manager.batch_step, manager.global_iter) == (num_epochs, 0, num_epochs * num_batches)


def test_training_changes_the_model():
    manager, model = make_manager([], num_epochs=40, num_batches=10)
    manager.start_training()
    assert model.w == pytest.approx(2.0, abs=0.3) and model.b == pytest.approx(-1.0, abs=0.1)


def test_hook_list_matches_callback_base():
    public = {name for name in vars(Callback) if name.startswith(("on_", "set_training_manager"))}
    assert public == set(HOOKS)


def test_unknown_hook_dispatch_raises():
    dispatcher = HookDispatcher([RecordingCallback()], {})
    with pytest.raises(ValueError, match="unknown hook 'on_batch_complete'.*on_batch_training_completed"):
        dispatcher.dispatch("on_batch_complete", {})


def test_stop_training_finishes_batch_then_runs_end_hooks():
    recorder = RecordingCallback(actions={("on_batch_training_completed", 4): lambda m: m.stop_training()})
    manager, _ = make_manager([recorder], num_epochs=3, num_batches=3)
    manager.start_training()
    assert recorder.count("on_batch_training_completed") == 5
    assert recorder.count("on_epoch_completed") == 1
    assert recorder.hook_names()[-1] == "on_training_ended"
    assert recorder.ended_with["stopped_early"] is True
    assert (manager.epoch, manager.batch_step, manager.global_iter) == (1, 2, 5)


def test_stop_on_last_batch_of_epoch_completes_the_epoch():
    recorder = RecordingCallback(actions={("on_batch_training_completed", 2): lambda m: m.stop_training()})
    manager, _ = make_manager([recorder], num_epochs=3, num_batches=3)
    manager.start_training()
    assert recorder.count("on_epoch_completed") == 1
    assert (manager.epoch, manager.batch_step) == (1, 0)


def test_exception_in_step():
    recorder = RecordingCallback()
    manager, _ = make_manager([recorder], fail_at_call=4)
    with pytest.raises(FloatingPointError) as raised:
        manager.start_training()
    assert recorder.hook_names()[-4:] == [
        "on_batch_training_start", "on_batch_training_failed", "on_training_checkpoint", "on_training_ended"
    ]  # fmt: skip
    assert recorder.calls[-3] == ("on_batch_training_failed", "FloatingPointError")
    assert recorder.calls[-2] == ("on_training_checkpoint", (False, True, False))
    assert recorder.ended_with["stopped_on_error"] is True and recorder.ended_with["stopped_early"] is False
    assert "mlpug: training failed at epoch 1, batch step 0 (global iteration 3)" in raised.value.__notes__


def test_exception_in_data_iterator():
    def batches():
        yield from make_batches(2)
        raise OSError("disk went away")

    recorder = RecordingCallback()
    manager, _ = make_manager([recorder], num_epochs=1, dataset=batches(), num_batches_per_epoch=3)
    with pytest.raises(OSError, match="disk went away"):
        manager.start_training()
    assert recorder.count("on_batch_training_completed") == 2
    assert recorder.count("on_batch_training_failed") == 0
    assert recorder.ended_with["stopped_on_error"] is True


def test_exception_in_hook_runs_end_hooks_of_all_callbacks():
    class Failing(Callback):
        def on_epoch_completed(self, logs):
            raise ValueError("bad hook")

    first, last = RecordingCallback("first"), RecordingCallback("last")
    manager, _ = make_manager([first, Failing(), last])
    with pytest.raises(ValueError, match="bad hook") as raised:
        manager.start_training()
    assert "mlpug: raised by callback 'Failing' in on_epoch_completed" in raised.value.__notes__
    assert first.ended_with["stopped_on_error"] and last.ended_with["stopped_on_error"]
    assert last.count("on_epoch_completed") == 0


def test_num_batches_per_epoch_beyond_dataset_length_fails_at_construction():
    with pytest.raises(ValueError, match="num_batches_per_epoch is 3, but training_dataset has only 2 batches"):
        make_manager([], dataset=make_batches(2), num_batches_per_epoch=3)


def test_iterable_without_len_running_out_is_an_error():
    class TwoBatches:
        def __iter__(self):
            return iter(make_batches(2))

    manager, _ = make_manager([], dataset=TwoBatches(), num_batches_per_epoch=3)
    with pytest.raises(RuntimeError, match="ran out after 2 batches in epoch 0, but num_batches_per_epoch is 3"):
        manager.start_training()


def test_failing_epoch_end_hook_leaves_the_epoch_unfinished_in_the_state():
    states = []

    class Failing(Callback):
        def on_epoch_completed(self, logs):
            raise ValueError("validation crashed")

        def on_training_ended(self, stopped_early, stopped_on_error, interrupted, callback_calls_success):
            states.append(self.training_manager.get_state())

    manager, _ = make_manager([Failing()], num_epochs=2, num_batches=3)
    with pytest.raises(ValueError, match="validation crashed"):
        manager.start_training()
    # the state written on the failure path points at the end of epoch 0, whose end hooks did not complete
    assert (states[0]["epoch"], states[0]["batch_step"], states[0]["global_iter"]) == (0, 3, 3)


def test_infinite_iterable_with_given_batch_count():
    recorder = RecordingCallback()
    infinite = itertools.cycle(make_batches(2))
    manager, _ = make_manager([recorder], num_epochs=2, dataset=_Reiterable(infinite), num_batches_per_epoch=5)
    manager.start_training()
    assert recorder.count("on_batch_training_completed") == 10


class _Reiterable:
    def __init__(self, iterator):
        self.iterator = iterator

    def __iter__(self):
        return self.iterator


def test_infinite_iterable_without_batch_count_is_rejected_at_construction():
    trainer, _ = make_trainer()
    with pytest.raises(ValueError, match=r"no known length \(object of type '_Reiterable' has no len\(\)\); give num"):
        TrainingManager(trainer, _Reiterable(iter([])), num_epochs=1)


@pytest.mark.parametrize("signum,exception", [(signal.SIGTERM, SystemExit), (signal.SIGINT, KeyboardInterrupt)])
def test_signal_mid_epoch_ends_cleanly(signum, exception):
    recorder = RecordingCallback(actions={("on_batch_training_start", 4): lambda m: signal.raise_signal(signum)})
    manager, _ = make_manager([recorder], num_epochs=3, num_batches=3)
    previous = signal.getsignal(signum)
    with pytest.raises(exception) as raised:
        manager.start_training()
    if exception is SystemExit:
        assert raised.value.code == 128 + signal.SIGTERM
    assert recorder.count("on_batch_training_completed") == 5
    assert recorder.hook_names()[-1] == "on_training_ended"
    assert recorder.ended_with == dict(
        stopped_early=True, stopped_on_error=False, interrupted=True, callback_calls_success=True
    )
    assert (manager.epoch, manager.batch_step, manager.global_iter) == (1, 2, 5)
    assert signal.getsignal(signum) is previous


def test_callback_returning_false_is_reported_not_fatal(caplog):
    class Grumpy(Callback):
        def on_epoch_completed(self, logs):
            return False

    recorder = RecordingCallback()
    manager, _ = make_manager([Grumpy(), recorder])
    with caplog.at_level(logging.WARNING, logger="mlpug"):
        logging.getLogger("mlpug").propagate = True
        try:
            manager.start_training()
        finally:
            logging.getLogger("mlpug").propagate = False
    assert manager.logs["cb_calls_success"] is False
    assert recorder.ended_with["callback_calls_success"] is False
    assert recorder.count("on_epoch_completed") == 2
    assert "Callback 'Grumpy' reported a problem in on_epoch_completed" in caplog.text


def test_producers_get_every_hook_first_wherever_they_stand_in_the_list():
    trainer, _ = make_trainer()
    evaluator = MetricEvaluator(trainer=trainer)
    printed = []
    progress = LogProgress(log_period=1, set_names=["training", "validation"], write=printed.append)
    recorder = RecordingCallback(snapshot_logs=True)
    callbacks = [
        progress,
        recorder,
        TrainingMetricsLogger(evaluator),
        TestMetricsLogger(make_batches(1), "validation", evaluator, batch_level=True),
    ]
    manager = TrainingManager(trainer, make_batches(2), callbacks=callbacks)
    assert manager.callbacks == callbacks  # the list itself is kept as given
    manager.start_training()
    assert all("training       : loss" in block and "validation     : loss" in block for block in printed[:2])
    (kind, first), *_ = recorder.snapshots
    assert kind == "batch" and set(first["current"]["training"]["batch"]) == {"loss"}


def test_dispatch_order_sorts_producers_by_what_they_consume_and_refuses_cycles():
    class Role(Callback):
        def __init__(self, name, produces=(), consumes=()):
            super().__init__(name)
            self._produces, self._consumes = frozenset(produces), frozenset(consumes)

        @property
        def produces(self):
            return self._produces

        @property
        def consumes(self):
            return self._consumes

    plain = Role("plain")
    best = Role("best", produces={"best"}, consumes={"validation"})
    validation = Role("validation", produces={"validation"}, consumes={"training"})
    training = Role("training", produces={"training"})
    assert [c.name for c in dispatch_order([plain, best, validation, training])] == [
        "training", "validation", "best", "plain"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="cycle: 'a' produces \\['x'\\], consumes \\['y'\\]"):
        dispatch_order([Role("a", produces={"x"}, consumes={"y"}), Role("b", produces={"y"}, consumes={"x"})])


def test_state_round_trip_continues_training_identically():
    straight, straight_model = make_manager([], num_epochs=2, num_batches=3)
    straight.start_training()

    # Stop after the last batch of epoch 0 (mid-epoch data positions are the CheckpointManager's tests).
    stopper = RecordingCallback(actions={("on_batch_training_completed", 2): lambda m: m.stop_training()})
    first, first_model = make_manager([stopper], num_epochs=2, num_batches=3)
    first.start_training()
    state, trainer_state = first.get_state(), first.trainer.get_state()
    assert (state["epoch"], state["batch_step"], state["global_iter"]) == (1, 0, 3)

    resumed_recorder = RecordingCallback(name="RecordingCallback")
    resumed, resumed_model = make_manager([resumed_recorder], num_epochs=2, num_batches=3)
    resumed.set_state(state)
    resumed.trainer.set_state(trainer_state)
    resumed.start_training()
    assert resumed_recorder.calls[1] == ("on_training_start", (2, 3, 1, 0, 3))
    assert resumed_recorder.count("on_batch_training_completed") == 3
    assert (resumed_model.w, resumed_model.b) == (straight_model.w, straight_model.b)


def test_set_state_with_other_callbacks_is_rejected():
    manager, _ = make_manager([RecordingCallback("a")])
    with pytest.raises(ValueError, match=r"\['a', 'b'\] present on only one side"):
        manager.set_state({"epoch": 0, "batch_step": 0, "global_iter": 0, "callbacks": {"b": {}}})


def test_no_conversion_to_numbers_unless_a_consumer_reads():
    trainer, _ = make_trainer()
    evaluator = MetricEvaluator(trainer=trainer)
    printed = []
    manager = TrainingManager(
        trainer,
        make_batches(10),
        num_epochs=1,
        callbacks=[
            TrainingMetricsLogger(evaluator),
            LogProgress(log_period=5, set_names=["training"], write=printed.append, batch_level=True),
        ],
    )
    FakeScalar.conversions = 0
    manager.start_training()
    # Two batch blocks (after batch 5 and 10) read the batch loss (1 conversion each) and the window average
    # (5 resp. 10 batches), and the epoch summary re-reads the already resolved window average: 17 in all,
    # instead of one per metric per batch; plus one non-finite check of the pending losses per block (the epoch
    # end and the end of training find none pending).
    assert FakeScalar.conversions == 1 + 5 + 1 + 10 + 2
    assert len(printed) == 3


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(trainer="trainer"), TypeError, "trainer must be an mlpug BackendTrainer"),
        (dict(dataset=42), TypeError, "training_dataset must be iterable, got int"),
        (dict(num_epochs=0), ValueError, "num_epochs must be an int >= 1, got 0"),
        (dict(num_epochs=2.5), ValueError, "num_epochs must be an int >= 1, got 2.5"),
        (dict(num_batches_per_epoch=0), ValueError, "num_batches_per_epoch must be an int >= 1, got 0"),
        (dict(check_stop_every=0), ValueError, "check_stop_every must be an int >= 1, got 0"),
        (dict(check_stop_every=True), ValueError, "check_stop_every must be an int >= 1, got True"),
        (
            dict(callbacks=[print]),
            TypeError,
            r"callbacks\[0\] must be an mlpug Callback instance, got builtin_function",
        ),
        (dict(callbacks=[RecordingCallback("x"), RecordingCallback("x")]), ValueError, r"duplicated: \['x'\]"),
    ],
)
def test_bad_manager_arguments_fail_at_construction(kwargs, error, match):
    trainer, _ = make_trainer()
    arguments = dict(trainer=trainer, dataset=make_batches(2))
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        TrainingManager(arguments.pop("trainer"), arguments.pop("dataset"), **arguments)


def test_start_without_training_model_fails_before_any_hook():
    from tests.core.fake_backend import SGD, FakeTrainer, LinearModel

    recorder = RecordingCallback()
    trainer = FakeTrainer(optimizers=SGD(), model_components=LinearModel())
    manager = TrainingManager(trainer, make_batches(2), callbacks=[recorder])
    with pytest.raises(RuntimeError, match=r"Call trainer.set_training_model\(train_model\) before"):
        manager.start_training()
    assert recorder.hook_names() == ["set_training_manager"]


def test_logged_learning_rate_is_that_of_its_step_even_when_read_later():
    kept = []

    class Schedule(Callback):
        def on_batch_training_completed(self, training_batch, logs):
            kept.append(logs["current"]["training_params"]["batch"])
            self.training_manager.trainer.set_learning_rate(0.1 * (logs["current"]["global_iter"] + 2))

    manager, _ = make_manager([Schedule()], num_epochs=1, num_batches=4)
    manager.start_training()
    assert [params["lr"] for params in kept] == pytest.approx([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(
    "callbacks,match",
    [
        (LogProgress(), r"got a single LogProgress; pass \[LogProgress\(\.\.\.\)\]"),
        ({RecordingCallback()}, r"got set: \{"),
    ],
)
def test_callbacks_that_are_not_a_list_are_refused_naming_the_fix(callbacks, match):
    """One callback instead of a list is named with the fix. Broken on purpose (``list(callbacks or [])`` as before),
    a single callback gives "'LogProgress' object is not iterable" and a set is accepted: this test fails."""
    trainer, _ = make_trainer()
    with pytest.raises(TypeError, match=r"callbacks must be a list of Callback instances, " + match):
        TrainingManager(trainer, make_batches(2), callbacks=callbacks)


@pytest.mark.parametrize("num_batches_per_epoch", [None, 2])
def test_empty_training_dataset_is_named_not_num_batches_per_epoch(num_batches_per_epoch):
    """Broken on purpose (the length checks as before), an empty list gives "num_batches_per_epoch must be an int
    >= 1, got 0" (an argument the user never passed) or "has only 0 batches": this test fails."""
    trainer, _ = make_trainer()
    with pytest.raises(ValueError, match=r"training_dataset \(list\) is empty: len\(\) is 0"):
        TrainingManager(trainer, [], num_batches_per_epoch=num_batches_per_epoch)


def test_a_len_that_raises_type_error_means_no_known_length():
    """A dataset whose ``len()`` raises TypeError (tf.data of unknown length) trains with num_batches_per_epoch and
    without it is refused naming the reason. Broken on purpose (``len()`` called whenever ``__len__`` exists, as
    before), construction raises the bare TypeError: this test fails."""

    class UnknownLength(_Reiterable):
        def __len__(self):
            raise TypeError("The dataset length is unknown.")

    trainer, _ = make_trainer()
    with pytest.raises(ValueError, match=r"has no known length \(The dataset length is unknown.\); give num_batches"):
        TrainingManager(trainer, UnknownLength(iter(make_batches(2))))
    recorder = RecordingCallback()
    dataset = UnknownLength(itertools.cycle(make_batches(2)))
    TrainingManager(trainer, dataset, num_batches_per_epoch=3, callbacks=[recorder]).start_training()
    assert recorder.count("on_batch_training_completed") == 3


@pytest.mark.parametrize(
    "hook,at,note",
    [
        ("on_batch_training_start", 4, "at epoch 1, batch step 1 (global iteration 4)"),
        ("on_batch_training_completed", 4, "at epoch 1, batch step 1 (global iteration 4)"),
        ("on_batch_checkpoint", 5, "at epoch 1, batch step 2 (global iteration 5)"),
        ("on_epoch_completed", 0, "at the end of epoch 0"),
        ("on_epoch_checkpoint", 1, "at the end of epoch 1"),
    ],
)
def test_failure_note_names_the_batch_whose_hook_raised(hook, at, note):
    """The counters advance right after the step, so a batch-end hook that raised used to be reported one batch later
    ("batch step 2" for step 1) and an epoch-end hook at batch 0 of the next epoch. Broken on purpose (the note made
    from the counters, as before), the after-step and epoch-end cases fail."""

    class Failing(Callback):
        def _fail(self, position):
            if position == at:
                raise ValueError(f"failure in {hook}")

    def batch_hook(self, *args):
        self._fail(args[-1]["current"]["global_iter"])

    def epoch_hook(self, logs):
        self._fail(logs["epoch"])

    setattr(Failing, hook, epoch_hook if "epoch" in hook else batch_hook)
    manager, _ = make_manager([Failing()], num_epochs=3, num_batches=3)
    with pytest.raises(ValueError, match=f"failure in {hook}") as raised:
        manager.start_training()
    assert f"mlpug: training failed {note}" in raised.value.__notes__


def test_a_generator_continues_across_epochs_and_a_resume_skips_what_was_trained():
    """A generator is its own iterator: epoch 1 takes the batches after epoch 0's (it used to be handed to the
    epoch loop as a fresh source every epoch, which after a resume restarted it at its first batch)."""
    batches = make_batches(6)
    seen = []

    state_after_epoch_0 = {}

    class Record(Callback):
        def on_batch_training_start(self, training_batch, logs):
            seen.append(batches.index(training_batch))

        def on_epoch_checkpoint(self, logs):
            state_after_epoch_0.setdefault("s", self.training_manager.get_state())

    trainer, _ = make_trainer()
    manager = TrainingManager(trainer, iter(batches), num_epochs=3, num_batches_per_epoch=2, callbacks=[Record()])
    manager.start_training()
    assert seen == [0, 1, 2, 3, 4, 5]
    seen.clear()
    trainer, _ = make_trainer()
    resumed = TrainingManager(trainer, iter(batches), num_epochs=3, num_batches_per_epoch=2, callbacks=[Record()])
    resumed.set_state(state_after_epoch_0["s"])
    resumed.start_training()
    assert seen == [2, 3, 4, 5]  # a new generator of the same sequence: the 2 batches of epoch 0 are skipped


def test_early_stopping_stops_the_fake_backend_after_patience_epochs():
    """The neutral EarlyStopping on the fake backend: a monitored value that improves twice, then never again;
    patience 2 stops after epoch 4 of 10, with the normal end of training."""
    from mlpug.callbacks import EarlyStopping

    values = [3.0, 2.0, 1.0, 1.5, 1.2, 0.1, 0.1, 0.1, 0.1, 0.1]

    class Scripted(Callback):
        @property
        def produces(self):
            return frozenset({"scripted"})

        def on_epoch_completed(self, logs):
            logs["current"]["scripted"] = {"dataset": {"loss": values[logs["current"]["epoch"]]}}
            return True

    recorder, stopping = RecordingCallback(), EarlyStopping("scripted.dataset.loss", patience=2)
    manager, _ = make_manager([Scripted(), stopping, recorder], num_epochs=10)
    manager.start_training()
    assert (stopping.stopped_epoch, stopping.best, manager.epoch) == (4, 1.0, 5)
    assert recorder.ended_with["stopped_early"] is True


@pytest.mark.parametrize(
    "mode, values, best, non_finite_epochs",
    [
        ("min", [math.nan] * 4, None, [0, 1]),  # never a finite value: stops after patience, loudly
        ("min", [1.0, math.nan, 0.5, math.nan, math.nan, 0.1], 0.5, [1, 3, 4]),
        ("max", [1.0, math.inf, 2.0, math.inf, math.inf, 9.0], 2.0, [1, 3, 4]),  # inf is not the best in mode max
        ("min", [1.0, -math.inf, 0.5, -math.inf, -math.inf, 0.1], 0.5, [1, 3, 4]),  # nor -inf in mode min
    ],
    ids=["nan_only", "nan", "inf_max", "minus_inf_min"],
)
def test_early_stopping_warns_at_every_non_finite_value_and_never_counts_it_as_an_improvement(
    caplog, mode, values, best, non_finite_epochs
):
    """Issue 25 (no silent wrong result): a NaN / inf monitored value logs a WARNING naming the metric, the epoch and
    the value, and is never an improvement (it counts against the patience, 2 here). Broken on purpose (NaN silently
    never improves, inf is the best in mode max), there is no warning, inf becomes the best: this test fails."""
    from mlpug.callbacks import EarlyStopping

    class Scripted(Callback):
        @property
        def produces(self):
            return frozenset({"scripted"})

        def on_epoch_completed(self, logs):
            logs["current"]["scripted"] = {"dataset": {"loss": values[logs["current"]["epoch"]]}}
            return True

    stopping = EarlyStopping("scripted.dataset.loss", mode=mode, patience=2)
    manager, _ = make_manager([Scripted(), stopping], num_epochs=len(values))
    with caplog.at_level(logging.INFO, logger="mlpug"):  # pytest attaches its handler to the "mlpug" logger too
        manager.start_training()
    assert (stopping.best, stopping.stopped_epoch) == (best, non_finite_epochs[-1])
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == len(non_finite_epochs)
    for epoch, warning in zip(non_finite_epochs, warnings):
        value = values[epoch]
        assert f"'scripted.dataset.loss' is {value} at epoch {epoch}" in warning, warning
        assert "never an improvement" in warning
    assert "did not improve on None" not in caplog.text


def test_tensorboard_on_the_fake_backend_purges_what_a_resumed_run_writes_again(tmp_path):
    """A run of 2 epochs x 2 batches writes steps 0-3; a run resumed from the state after epoch 0 writes steps 2-3
    again. TensorBoard's purge marker at the resumed step (SessionLog.START) makes the reader keep each step once,
    with the resumed run's values; without it, steps 2 and 3 would appear twice."""
    import copy

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlpug.callbacks import Tensorboard

    class Capture(Callback):
        state = None

        def on_epoch_checkpoint(self, logs):
            if logs["current"]["epoch"] == 0:
                Capture.state = copy.deepcopy(self.training_manager.get_state())
            return True

    def callbacks():
        evaluator = MetricEvaluator(trainer=trainer)
        board = Tensorboard("training.batch.loss", log_dir=str(tmp_path), log_period=1)
        return [TrainingMetricsLogger(metric_evaluator=evaluator), board, Capture()]

    trainer, _ = make_trainer()
    TrainingManager(trainer, make_batches(2), num_epochs=2, callbacks=callbacks()).start_training()
    trainer, _ = make_trainer()
    resumed = TrainingManager(trainer, make_batches(2), num_epochs=2, callbacks=callbacks(), resume_from=Capture.state)
    resumed.start_training()
    accumulator = EventAccumulator(str(tmp_path / "training-batch"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("loss")] == [0, 1, 2, 3]


def test_tensorboard_imports_no_backend(tmp_path):
    """A run of the fake backend with Tensorboard, in a fresh process: neither torch nor tensorflow is imported
    (TensorBoard's own EventFileWriter would import TensorFlow whenever it is installed)."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import sys
from mlpug.evaluation import MetricEvaluator
from mlpug.callbacks import Tensorboard, TrainingMetricsLogger
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import make_batches, make_trainer
trainer, _ = make_trainer()
board = Tensorboard("training.batch.loss", log_dir={str(tmp_path)!r}, log_period=1)
logger = TrainingMetricsLogger(MetricEvaluator(trainer=trainer))
TrainingManager(trainer, make_batches(3), callbacks=[logger, board]).start_training()
print("backends:", sorted(name for name in ("torch", "tensorflow") if name in sys.modules))
"""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "backends: []" in result.stdout
    assert list((tmp_path / "training-batch").iterdir())


class BatchesThisEpoch(Callback):
    """A per-epoch accumulator with a state: the batches trained in the current epoch, reset at an epoch start unless
    training continues the epoch mid-way (``logs["resumed_mid_epoch"]``)."""

    def __init__(self):
        super().__init__("BatchesThisEpoch")
        self.count, self.per_epoch, self.epoch_starts = 0, [], []

    def on_epoch_start(self, logs):
        self.epoch_starts.append((logs["epoch"], logs["current"]["batch_step"], logs["resumed_mid_epoch"]))
        if not logs["resumed_mid_epoch"]:
            self.count = 0

    def on_batch_training_completed(self, training_batch, logs):
        self.count += 1

    def on_epoch_completed(self, logs):
        self.per_epoch.append(self.count)

    def get_state(self):
        return {"count": self.count}

    def set_state(self, state):
        self.count = state["count"]


def test_a_mid_epoch_resume_calls_on_epoch_start_told_so_and_keeps_the_restored_accumulator():
    """Issue 25 item 8: a mid-epoch resume calls on_epoch_start for the resumed epoch (per-epoch set-up such as a
    progress bar happens), with logs["resumed_mid_epoch"] True, so the accumulator that set_state restored is kept.
    Broken on purpose (no resumed_mid_epoch in the loop), the hook cannot tell and the test fails (KeyError)."""
    straight = BatchesThisEpoch()
    make_manager([straight], num_epochs=2, num_batches=3)[0].start_training()
    assert straight.per_epoch == [3, 3]
    assert straight.epoch_starts == [(0, 0, False), (1, 0, False)]

    first = BatchesThisEpoch()
    stopper = RecordingCallback(actions={("on_batch_training_completed", 0): lambda m: m.stop_training()})
    first_manager, _ = make_manager([first, stopper], num_epochs=2, num_batches=3)
    first_manager.start_training()
    state = first_manager.get_state()
    assert (state["epoch"], state["batch_step"], state["callbacks"]["BatchesThisEpoch"]) == (0, 1, {"count": 1})

    resumed = BatchesThisEpoch()
    resumed_manager, _ = make_manager([resumed, RecordingCallback()], num_epochs=2, num_batches=3)
    resumed_manager.set_state(state)
    resumed_manager.start_training()
    assert resumed.epoch_starts == [(0, 1, True), (1, 0, False)]
    assert resumed.per_epoch == straight.per_epoch
    assert resumed_manager.logs["resumed_mid_epoch"] is False  # only during the continued epoch

    first_manager.start_training()  # the same manager continues after its stop: the same rule
    assert first.epoch_starts == [(0, 0, False), (0, 1, True), (1, 0, False)]
    assert first.per_epoch == straight.per_epoch


@pytest.mark.parametrize(
    "counters,problem",
    [
        ((10**9, 0, 8), "epoch 1000000000 is past the last epoch of this run \\(num_epochs=2, num_batches_per_epoch=3"),
        ((1, 0, 8), "global_iter should be epoch \\* num_batches_per_epoch \\+ batch_step = 3"),
        ((0, 4, 4), "batch_step 4 is past the end of an epoch"),
        ((2, 1, 7), "epoch 2 is the end of this run \\(.*\\), where batch_step is 0"),
    ],
)
def test_set_state_checks_the_counters_together(counters, problem):
    """Issue 25 item 8: counters that do not fit together (or this run) are refused, naming the file and the values,
    before anything is applied. Broken on purpose (the counters checked one by one), they are accepted."""
    manager, _ = make_manager([RecordingCallback()], num_epochs=2, num_batches=3)
    state = manager.get_state()
    state["mlpug"] = {"path": "/runs/model-training-checkpoint.safetensors"}
    state["epoch"], state["batch_step"], state["global_iter"] = counters
    values = "epoch={}, batch_step={}, global_iter={}".format(*counters)
    with pytest.raises(
        ValueError,
        match=f"/runs/model-training-checkpoint.safetensors: the training state's counters do not fit together: "
        f"{values}: {problem}",
    ):
        manager.set_state(state)
    assert (manager.epoch, manager.batch_step, manager.global_iter) == (0, 0, 0)
    # every position a run saves is accepted: after an epoch's last batch before its end hooks (batch_step ==
    # num_batches_per_epoch), a finished run, mid-epoch
    for position in [(0, 3, 3), (2, 0, 6), (1, 2, 5)]:
        state["epoch"], state["batch_step"], state["global_iter"] = position
        manager.set_state(state)
        assert (manager.epoch, manager.batch_step, manager.global_iter) == position


@pytest.mark.parametrize("key,value", [("epoch", -1), ("batch_step", 1.0), ("global_iter", True)])
def test_set_state_refuses_counters_that_are_not_ints_at_least_0(key, value):
    """A training state given as a dict to set_state (not through a file's checks) with a counter that is not an
    int >= 0. Broken on purpose (no check_counters), it is applied."""
    manager, _ = make_manager([RecordingCallback()], num_epochs=2, num_batches=3)
    state = manager.get_state()
    state[key] = value
    with pytest.raises(ValueError, match=f"the training state's {key} is {value!r}, not an int >= 0"):
        manager.set_state(state)
