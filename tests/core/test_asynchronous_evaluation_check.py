"""``TestMetricsLogger(run_async=True)`` asks the trainer whether it can evaluate on a worker thread
(``check_asynchronous_evaluation()``) when the training manager is made, so a trainer that cannot refuses before
training starts, not at the first epoch end."""

import pytest

from mlpug.callbacks import TestMetricsLogger
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import FakeTrainer, make_batches, make_trainer


class NoWorkerThreadTrainer(FakeTrainer):
    """A fake trainer that cannot evaluate on a worker thread; counts its training steps."""

    steps = 0

    def check_asynchronous_evaluation(self) -> None:
        raise RuntimeError("this trainer cannot evaluate on a worker thread")

    def train_on(self, *args, **kwargs):
        type(self).steps += 1
        return super().train_on(*args, **kwargs)


def _manager(trainer, run_async):
    logger = TestMetricsLogger(make_batches(2), "validation", MetricEvaluator(trainer=trainer), run_async=run_async)
    return TrainingManager(trainer, make_batches(3), num_epochs=1, callbacks=[logger])


def test_an_asynchronous_logger_is_refused_when_the_manager_is_made_if_the_trainer_cannot():
    trainer, _ = make_trainer()
    trainer.__class__ = NoWorkerThreadTrainer
    with pytest.raises(RuntimeError, match="cannot evaluate on a worker thread"):
        _manager(trainer, run_async=True)
    assert NoWorkerThreadTrainer.steps == 0  # nothing trained
    manager = _manager(trainer, run_async=False)  # synchronous evaluation does not ask
    manager.start_training()
    assert NoWorkerThreadTrainer.steps == 3


def test_the_default_trainer_can_evaluate_asynchronously():
    trainer, _ = make_trainer()
    assert trainer.check_asynchronous_evaluation() is None
    _manager(trainer, run_async=True)
