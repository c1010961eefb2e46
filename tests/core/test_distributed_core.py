"""The neutral core in data-parallel training, with fake distributed contexts (pure Python, no processes).

The fake context of a rank records every collective the core issues. All ranks of a run must issue the same
collectives in the same order, whatever a rank's consumers read: consumers such as ``LogProgress`` and the
``CheckpointManager`` act on the primary rank only, so a reduction issued lazily, where a value is read, would
be issued on the primary alone and hang the others. ``ThreadWorld`` runs two ranks as two threads whose
collectives really reduce over both, so that values, stops and errors can be compared rank against rank.
"""

import math
import threading
import time

import pytest

from mlpug import logging as mlpug_logging
from mlpug.callbacks import (
    Callback,
    CheckpointManager,
    LogProgress,
    ProgressBar,
    Tensorboard,
    TestMetricsLogger,
    TrainingMetricsLogger,
)
from mlpug.checkpointing import NumpyCheckpointSaver
from mlpug.distributed import DistributedContext
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.non_finite import NonFiniteLossError
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import FakeScalar, TrainModel, make_batches, make_trainer


@pytest.fixture(autouse=True)
def single_process_logging_afterwards():
    yield
    mlpug_logging.set_rank(0, 1)


class FakeRankContext(DistributedContext):
    """Rank ``rank`` of a world of 2 whose other rank holds the same values: sums are doubled; ``stop_from_other``
    says at which collective the other rank asks to stop (its stop flag, the last value, is 1)."""

    def __init__(self, rank, stop_from_other=None):
        self.rank, self.world_size = rank, 2
        self.collectives = []
        self.stop_from_other = stop_from_other

    def barrier(self):
        self.collectives.append("barrier")

    def all_reduce_sum(self, values):
        self.collectives.append(("all_reduce_sum", len(values)))
        sums = [2 * value for value in values]
        if len(self.collectives) == self.stop_from_other:
            sums[len(values) // 2 - 1] += 1.0  # the other rank's stop flag in a step's reduction
        return sums

    def any_rank(self, flag):
        self.collectives.append("any_rank")
        return flag


class Reader(Callback):
    """Reads every value of ``logs.current`` at every batch on the primary only, as a consumer would."""

    def on_batch_training_completed(self, training_batch, logs):
        if self.training_manager.distributed.is_primary:
            str(logs["current"]["training"]["batch"]["loss"]), str(logs["current"]["training"]["window_average"])
        return True


def run_rank(rank, stop_from_other=None, num_epochs=2):
    trainer, _ = make_trainer()
    context = FakeRankContext(rank, stop_from_other)
    evaluator = MetricEvaluator(trainer=trainer, batch_metric_funcs={"same": lambda inputs: inputs.loss})
    callbacks = [
        TrainingMetricsLogger(evaluator),
        TestMetricsLogger(make_batches(3, w=1.0), "validation", evaluator),
        TestMetricsLogger(make_batches(2, w=0.5), "probe", evaluator, batch_level=True),
        LogProgress(log_period=1, set_names=["training", "validation", "probe"]),
        Reader("Reader"),
    ]
    manager = TrainingManager(
        trainer, make_batches(3), num_epochs=num_epochs, callbacks=callbacks, distributed=context, handle_signals=False
    )
    manager.start_training()
    return manager, context


def test_every_rank_issues_the_same_collectives_in_the_same_order_whatever_it_reads(capsys):
    """Rank 0 prints and reads every value, rank 1 reads nothing: the same sequence of collectives, at fixed
    points: the Reader, which declares nothing, makes every batch a read point, so per batch one, of the loss, the
    training metrics, the batch-level test metrics (2 each) and the stop flag (6 pairs as sums and counts); per
    epoch end one reduction of the dataset metrics and a stop agreement."""
    primary, primary_context = run_rank(0)
    printed = capsys.readouterr().out
    other, other_context = run_rank(1)
    assert "Epoch 1/1\tREADY" in printed and capsys.readouterr().out == ""  # rank 1 prints nothing
    assert primary_context.collectives == other_context.collectives
    per_batch = [("all_reduce_sum", 12)]
    per_epoch = per_batch * 3 + [("all_reduce_sum", 4), "any_rank"]  # validation dataset, then the epoch-end stop
    assert primary_context.collectives == per_epoch * 2
    # values reduced as sums and counts: the other rank holds the same values, so the means are this rank's
    assert primary.logs["current"]["validation"]["dataset"]["loss"] == pytest.approx(
        other.logs["current"]["validation"]["dataset"]["loss"]
    )


def test_a_stop_asked_by_another_rank_stops_this_rank_after_the_same_batch():
    """The other rank asks in the reduction of the 4th step (collectives: 3 steps, the dataset metrics and the
    epoch-end stop agreement of epoch 0, then step 4; its SIGTERM or a callback's stop_training). The flag is
    read at the boundary after the next step (its collective ran during that step, so reading it does not wait):
    this rank stops there too, after 5 batches."""
    manager, context = run_rank(1, stop_from_other=6)
    assert context.collectives[5] == ("all_reduce_sum", 12)
    assert manager.global_iter == 5
    assert (manager.epoch, manager.batch_step) == (1, 2)


def test_dataset_metrics_are_sums_and_counts_over_the_ranks_never_means_of_means():
    """A rank with 1 sample of loss 4 and a rank with 3 samples of loss 0: the reduced mean is 1, not 2."""

    class TwoRanks(DistributedContext):
        rank, world_size = 0, 2

        def all_reduce_sum(self, values):  # this rank's (4 * 1, 1) plus the other rank's (0 * 3, 3)
            return [values[0] + 0.0, values[1] + 3.0]

    assert TwoRanks().all_reduce_weighted([(4.0, 1)]) == [(1.0, 4.0)]


def test_tensorboard_writes_on_the_primary_rank_only(tmp_path):
    """Two fake ranks with the same log_dir: only rank 0's events exist; rank 1 issues the same collectives."""
    from mlpug.callbacks import Tensorboard

    contexts = []
    for rank in (0, 1):
        trainer, _ = make_trainer()
        contexts.append(FakeRankContext(rank))
        board = Tensorboard(["training.batch.loss", "validation.dataset.loss"], log_dir=str(tmp_path / str(rank)))
        evaluator = MetricEvaluator(trainer=trainer)
        callbacks = [TrainingMetricsLogger(evaluator), TestMetricsLogger(make_batches(3), "validation", evaluator)]
        manager = TrainingManager(
            trainer, make_batches(3), num_epochs=1, callbacks=[*callbacks, board], distributed=contexts[-1],
            handle_signals=False,
        )  # fmt: skip
        manager.start_training()
    assert sorted(path.name for path in (tmp_path / "0").iterdir()) == ["validation-dataset"]  # log_period 50
    assert not (tmp_path / "1").exists()
    assert contexts[0].collectives == contexts[1].collectives


# ----- values reduced only where they are read (read points) -----
def test_with_log_progress_the_ranks_reduce_at_its_periods_not_at_every_step():
    """24 batches, ``LogProgress(log_period=8)``, nothing else reading batch values: collectives only at the read
    points, batches 7, 15 and 23 (log periods; 23 also ends the epoch) and the scheduled stop checks 9 and 19
    (``check_stop_every`` 10), each reducing every step since the last one (2 pairs per step: the loss and the
    logged loss metric, plus the stop flag), then the epoch-end stop agreement: 6 collectives, not 25."""
    trainer, _ = make_trainer()
    context = FakeRankContext(rank=1)
    callbacks = [TrainingMetricsLogger(MetricEvaluator(trainer=trainer)), LogProgress(log_period=8)]
    manager = TrainingManager(
        trainer, make_batches(24), num_epochs=1, callbacks=callbacks, distributed=context, handle_signals=False
    )
    manager.start_training()
    steps_per_collective = [8, 2, 6, 4, 4]  # batches 0-7, 8-9, 10-15, 16-19, 20-23
    assert context.collectives == [("all_reduce_sum", 2 * (2 * steps + 1)) for steps in steps_per_collective] + [
        "any_rank"
    ]


def test_the_read_points_that_the_callbacks_declare():
    """``batches_until_values_read(global_iter)``: LogProgress and Tensorboard at their log periods, ProgressBar at
    its refreshes within an epoch (7 batches, refresh 3: batch indices 2, 5 and the last, 6), a batch-level
    CheckpointManager at its periods, the metric loggers never; a callback that implements a batch hook and
    declares nothing at every batch; one without batch hooks never."""
    trainer, _ = make_trainer()
    evaluator = MetricEvaluator(trainer=trainer)
    bar = ProgressBar(refresh_period=3, metrics={})
    checkpoints = CheckpointManager(
        NumpyCheckpointSaver(), "unused", metric_to_monitor=None, batch_level=True, create_checkpoint_every=4
    )
    TrainingManager(
        trainer, make_batches(7), callbacks=[TrainingMetricsLogger(evaluator), bar], distributed=FakeRankContext(0)
    )
    assert [bar.batches_until_values_read(g) for g in (0, 2, 3, 5, 6, 7, 8)] == [3, 1, 3, 1, 1, 3, 2]
    assert [LogProgress(log_period=4).batches_until_values_read(g) for g in (0, 3, 4, 6)] == [4, 1, 4, 2]
    assert LogProgress(batch_level=False).batches_until_values_read(0) is None
    assert Tensorboard(["training.batch.loss"], log_period=5).batches_until_values_read(7) == 3
    assert [checkpoints.batches_until_values_read(g) for g in (0, 3, 5)] == [4, 1, 3]
    assert TrainingMetricsLogger(evaluator).batches_until_values_read(0) is None
    assert TestMetricsLogger(make_batches(2), "probe", evaluator, batch_level=True).batches_until_values_read(0) is None
    assert Reader("Reader").batches_until_values_read(5) == 1
    assert Callback("Plain").batches_until_values_read(5) is None


class ThreadRank(DistributedContext):
    """One rank of a :class:`ThreadWorld`; records its collectives as ``FakeRankContext`` does."""

    def __init__(self, world, rank):
        self.world, self.rank, self.world_size = world, rank, world.size
        self.collectives = []

    def barrier(self):
        self.collectives.append("barrier")
        self.world.all_reduce_sum(self.rank, [])

    def all_reduce_sum(self, values):
        self.collectives.append(("all_reduce_sum", len(values)))
        return self.world.all_reduce_sum(self.rank, values)

    def any_rank(self, flag):
        self.collectives.append("any_rank")
        return self.world.all_reduce_sum(self.rank, [1.0 if flag else 0.0])[0] > 0


class ThreadWorld:
    """Ranks as threads of this process whose collectives reduce over all of them (element-wise sums through a
    barrier). Collectives of different lengths on the ranks (another order) are an AssertionError on every rank;
    a rank that raises breaks the barrier, so the others fail at their next collective instead of hanging."""

    def __init__(self, size=2, timeout_s=30.0):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout_s)
        self._slots = [None] * size

    def all_reduce_sum(self, rank, values):
        self._slots[rank] = [float(value) for value in values]
        self._barrier.wait()
        slots = list(self._slots)
        self._barrier.wait()
        lengths = [len(slot) for slot in slots]
        assert len(set(lengths)) == 1, f"the ranks issued collectives of lengths {lengths}: not the same order"
        return [sum(column) for column in zip(*slots)]

    def run(self, run_rank, timeout_s=120.0):
        """``run_rank(rank, context)`` on every rank, each in its own thread; per rank (result, exception). When a
        rank has raised and another still runs a second later, the barrier is broken (as a lost peer breaks gloo's
        collectives), so that a rank waiting in a collective fails instead of hanging."""
        outcomes = [(None, None)] * self.size
        raised_at = []

        def target(rank):
            try:
                outcomes[rank] = (run_rank(rank, ThreadRank(self, rank)), None)
            except BaseException as error:  # noqa: BLE001 - handed to the test
                outcomes[rank] = (None, error)
                raised_at.append(time.monotonic())

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout_s
        while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
            threads[0].join(timeout=0.05)
            if raised_at and time.monotonic() > raised_at[0] + 1.0:
                self._barrier.abort()
        assert not any(thread.is_alive() for thread in threads), "a rank did not end"
        return outcomes


class LocalSteps(Callback):
    """Keeps this rank's own loss and sample count of every step (local values: it reads nothing reduced)."""

    def __init__(self):
        super().__init__("LocalSteps")
        self.steps = []

    def batches_until_values_read(self, global_iter):
        return None

    def on_batch_training_completed(self, training_batch, logs):
        result = self.context.step_result
        self.steps.append((result.loss.value, result.num_samples))
        return True


class ReadEvery(Callback):
    """Keeps every batch's batch values and reads them every ``period`` batches (declared), with the window average
    of the batch it reads at, and at epoch ends; or at every batch without declaring anything (``period`` None: the
    default of a callback with a batch hook)."""

    def __init__(self, period=None):
        super().__init__("ReadEvery")
        self.period = period
        self.kept, self.batch_losses, self.window_losses = [], [], {}  # window_losses: global_iter -> value

    def batches_until_values_read(self, global_iter):
        if self.period is None:
            return super().batches_until_values_read(global_iter)
        return self.period - global_iter % self.period

    def on_batch_training_completed(self, training_batch, logs):
        current = logs["current"]
        self.kept.append(current["training"]["batch"])
        if self.period is None or (current["global_iter"] + 1) % self.period == 0:
            self.batch_losses += [values["loss"] for values in self.kept]
            self.window_losses[current["global_iter"]] = current["training"]["window_average"]["loss"]
            self.kept = []
        return True

    def on_epoch_completed(self, logs):  # the epoch's last batches, read at its end
        self.batch_losses += [values["loss"] for values in self.kept]
        self.kept = []
        return True


def _rank_batches(rank, num_batches):
    """Rank 0: batches of 4 samples, rank 1 of 2 samples of another line: the ranks' losses and weights differ."""
    return make_batches(num_batches, batch_size=4) if rank == 0 else make_batches(num_batches, batch_size=2, w=-3.0)


@pytest.mark.parametrize("period", [None, 5], ids=["reads every batch, undeclared", "declares every 5th batch"])
def test_every_value_read_is_the_sample_weighted_mean_over_the_ranks_of_its_own_step(period):
    """Two thread ranks with different losses and batch sizes (4 and 2), 2 epochs of 12 batches, a window of 5:
    whether a callback reads every batch (declaring nothing) or reads at every 5th batch the batch values of all
    batches since its last read, every batch loss it reads is that step's sum(loss * samples) / sum(samples) over
    both ranks, and every window average the sample-weighted mean of the last 5 steps', identically on both ranks.
    Broken on purpose (a read point reducing only its own step), the reads of earlier steps raise."""

    def run_rank(rank, context):
        trainer, _ = make_trainer()
        local, reader = LocalSteps(), ReadEvery(period)
        callbacks = [TrainingMetricsLogger(MetricEvaluator(trainer=trainer), window_length=5), local, reader]
        manager = TrainingManager(
            trainer, _rank_batches(rank, 12), num_epochs=2, callbacks=callbacks, distributed=context,
            handle_signals=False,
        )  # fmt: skip
        manager.start_training()
        return local.steps, (reader.batch_losses, reader.window_losses), context.collectives

    outcomes = ThreadWorld().run(run_rank)
    assert [error for _, error in outcomes] == [None, None]
    (steps0, read0, collectives0), (steps1, read1, collectives1) = (result for result, _ in outcomes)
    assert collectives0 == collectives1
    sums = [(l0 * n0 + l1 * n1, n0 + n1) for (l0, n0), (l1, n1) in zip(steps0, steps1)]
    expected_batch = [total / weight for total, weight in sums]
    windows = [sums[max(step - 4, 0) : step + 1] for step in range(len(sums))]
    expected_window = [sum(total for total, _ in window) / sum(weight for _, weight in window) for window in windows]
    (batch_losses, window_losses) = read0
    assert read0 == read1
    assert batch_losses == pytest.approx(expected_batch, rel=1e-12)
    assert sorted(window_losses) == (list(range(24)) if period is None else [4, 9, 14, 19])
    assert list(window_losses.values()) == pytest.approx([expected_window[g] for g in window_losses], rel=1e-12)
    assert abs(expected_batch[0] - steps0[0][0]) > 0.1  # the ranks' values differ: the reduction is visible
    if period == 5:  # read points: batches 4, 9, 11 (epoch end), 14, 19, 23 (epoch end) and the epoch ends
        assert len(collectives0) == 6 + 2


class StopAt(Callback):
    """Asks to stop at global iteration ``at`` (a callback reading no reduced value: not a read point)."""

    def __init__(self, at):
        super().__init__("StopAt")
        self.at = at

    def batches_until_values_read(self, global_iter):
        return None

    def on_batch_training_completed(self, training_batch, logs):
        if logs["current"]["global_iter"] == self.at:
            self.context.stop_training()
        return True


@pytest.mark.parametrize(
    "check_stop_every, stopped_after",
    [(None, 11), (4, 9)],
    ids=["default check_stop_every 10", "check_stop_every 4"],
)
def test_a_stop_asked_on_one_rank_stops_every_rank_after_the_same_batch_within_the_bound(
    check_stop_every, stopped_after
):
    """Rank 1 alone asks to stop in a batch-end hook of batch 3, no callback reads batch values: the flag goes
    into the collective of the next scheduled stop check (batch 9; with ``check_stop_every=4``: 7, since batch 3's
    collective was issued before the request) and is read after one more batch, so both ranks stop after the same
    batch (10; 8), within ``check_stop_every + 1`` batches of the request. They issue the same collectives, and
    the steps after the last read point are reduced when the loop is left: the last window average is readable and
    the same on both. Broken on purpose (no scheduled stop check), both train to the end of the epoch."""

    def run_rank(rank, context):
        trainer, _ = make_trainer()
        callbacks = [TrainingMetricsLogger(MetricEvaluator(trainer=trainer)), StopAt(3 if rank == 1 else -1)]
        options = {} if check_stop_every is None else {"check_stop_every": check_stop_every}
        manager = TrainingManager(
            trainer, _rank_batches(rank, 20), num_epochs=2, callbacks=callbacks, distributed=context,
            handle_signals=False, **options,
        )  # fmt: skip
        manager.start_training()
        return manager.global_iter, manager.logs["current"]["training"]["window_average"]["loss"], context.collectives

    outcomes = ThreadWorld().run(run_rank)
    assert [error for _, error in outcomes] == [None, None]
    (global_iter0, window0, collectives0), (global_iter1, window1, collectives1) = (result for result, _ in outcomes)
    assert global_iter0 == global_iter1 == stopped_after
    assert stopped_after - 1 - 3 <= (check_stop_every or 10) + 1
    assert window0 == window1 and math.isfinite(window0)
    assert collectives0 == collectives1


class NanLossOnRank(TrainModel):
    """A NaN loss at the ``at``-th call (0-based), on the rank that uses it."""

    def __init__(self, model, at):
        super().__init__(model)
        self.at = at

    def __call__(self, batch, evaluate_settings, inference_mode=None):
        result = super().__call__(batch, evaluate_settings, inference_mode)
        if self.calls - 1 == self.at:
            result["loss"] = FakeScalar(math.nan)
        return result


def test_a_nan_loss_on_one_rank_is_found_on_every_rank_naming_its_step_and_no_checkpoint_follows_it(tmp_path):
    """Rank 1's loss is NaN at global iteration 5; a batch-level CheckpointManager writes every 4 batches and the
    weights are checked every 3 steps (between read points, where the losses of unreduced steps wait): both ranks
    raise NonFiniteLossError naming iteration 5, at the checkpoint period after it (batch 7), before writing, so the
    training checkpoint is that of batch 3 (resuming at 4) and no emergency checkpoint is written."""

    def run_rank(rank, context):
        trainer, model = make_trainer()
        if rank == 1:
            trainer.set_training_model(NanLossOnRank(model, at=5))
        checkpoints = CheckpointManager(
            NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None, batch_level=True,
            create_checkpoint_every=4, write_in_background=False,
        )  # fmt: skip
        callbacks = [TrainingMetricsLogger(MetricEvaluator(trainer=trainer)), checkpoints]
        manager = TrainingManager(
            trainer, _rank_batches(rank, 12), num_epochs=1, callbacks=callbacks, distributed=context,
            handle_signals=False, check_weights_every=3,
        )  # fmt: skip
        manager.start_training()

    outcomes = ThreadWorld().run(run_rank)
    errors = [error for _, error in outcomes]
    assert all(isinstance(error, NonFiniteLossError) for error in errors), errors
    assert [error.global_iter for error in errors] == [5, 5]
    assert all("at epoch 0, batch step 7 (global iteration 7)" in str(error.__notes__) for error in errors)
    names = CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None).file_names
    state = NumpyCheckpointSaver().load(names.training, kind="training")
    assert state["global_iter"] == 4
    assert not (tmp_path / names.emergency_training).exists()


class RaiseAt(StopAt):
    """Raises at global iteration ``at`` on every rank (a bug in a callback), between read points."""

    def on_batch_training_completed(self, training_batch, logs):
        if logs["current"]["global_iter"] == self.at:
            raise ValueError(f"fails on purpose at global iteration {self.at}")
        return True


def test_after_an_error_between_read_points_the_emergency_checkpoint_holds_the_unreduced_steps_as_this_ranks(
    tmp_path, caplog
):
    """Both ranks raise in a hook of batch 5, after the read point of batch 3 (``check_stop_every=4``): no
    collective runs on the failure path, so the emergency training checkpoint of the primary holds the window
    entries of batches 4 and 5 as the primary's own values (those up to batch 3 reduced over the ranks) instead of
    failing to be written."""

    def run_rank(rank, context):
        trainer, _ = make_trainer()
        checkpoints = CheckpointManager(
            NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None, write_in_background=False
        )
        callbacks = [TrainingMetricsLogger(MetricEvaluator(trainer=trainer)), checkpoints, RaiseAt(5)]
        manager = TrainingManager(
            trainer, _rank_batches(rank, 12), num_epochs=1, callbacks=callbacks, distributed=context,
            handle_signals=False, check_stop_every=4,
        )  # fmt: skip
        manager.start_training()

    outcomes = ThreadWorld().run(run_rank)
    assert all(isinstance(error, ValueError) for _, error in outcomes), outcomes
    assert "could not be written either" not in caplog.text
    names = CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None).file_names
    state = NumpyCheckpointSaver().load(names.emergency_training, kind="training")
    assert state["global_iter"] == 6
    entries = state["callbacks"]["TrainingMetricsLogger"]["window"]["entries"]
    assert len(entries) == 6
    trainer, _ = make_trainer()
    own = [trainer.train_on(batch).loss.value for batch in _rank_batches(0, 6)]  # the primary's, trained again
    assert [entry["loss"] for entry in entries[4:]] == [[own[4], 4.0], [own[5], 4.0]]
    assert entries[3]["loss"][1] == 6.0  # reduced over the ranks: 4 + 2 samples
