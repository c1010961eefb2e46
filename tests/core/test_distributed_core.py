"""The neutral core in data-parallel training, with a fake distributed context (pure Python, no processes).

The fake context of a rank records every collective the core issues. All ranks of a run must issue the same
collectives in the same order, whatever a rank's consumers read: consumers such as ``LogProgress`` and the
``CheckpointManager`` act on the primary rank only, so a reduction issued lazily, where a value is read, would
be issued on the primary alone and hang the others.
"""

import pytest

from mlpug import logging as mlpug_logging
from mlpug.callbacks import Callback, LogProgress, TestMetricsLogger, TrainingMetricsLogger
from mlpug.distributed import DistributedContext
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import make_batches, make_trainer


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
    points: per batch one, of the loss, the training metrics, the batch-level test metrics (2 each) and the stop
    flag (6 pairs as sums and counts); per epoch end one reduction of the dataset metrics and a stop agreement."""
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
