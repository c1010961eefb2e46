"""Distribution as a strategy object on PyTorch (issue 27): the names ``DefaultTrainer(strategy=...)`` takes, the
errors for bad ones, and a strategy written by a user, which the trainer asks for the model it runs, the gradient
synchronisation and each rank's data (the two-process DDP runs of ``test_distributed.py`` go through
``DDPStrategy``)."""

import pytest
import torch

import mlpug.pytorch as mlp
from mlpug.pytorch.strategies import STRATEGY_NAMES, DDPStrategy, resolve_strategy
from mlpug.trainers.gradient_sync import GradientSync
from mlpug.trainers.strategy import SingleProcess, Strategy


class TrainModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, evaluate_settings, inference_mode=None):
        inputs, targets = batch
        return torch.nn.functional.mse_loss(self.model(inputs), targets)


def make_trainer(**options):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return mlp.trainers.DefaultTrainer(torch.optim.SGD(model.parameters(), lr=0.1), model, **options), model


def test_one_process_defaults_to_the_single_process_strategy(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert isinstance(resolve_strategy(None), SingleProcess)
    trainer, _ = make_trainer()
    assert trainer.strategy.name == "single_process" and trainer.distributed_context().world_size == 1
    assert isinstance(make_trainer(strategy="single_process")[0].strategy, SingleProcess)


def test_bad_strategies_are_refused_at_construction_naming_the_valid_ones(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"strategy 'fsdpp' is unknown; the PyTorch strategies are \('single_process'"):
        make_trainer(strategy="fsdpp")
    with pytest.raises(TypeError, match="strategy must be None, one of"):
        make_trainer(strategy=3)
    with pytest.raises(
        ValueError, match=r"DDPStrategy \(strategy=.ddp.\) needs a data-parallel launch .* alone \(WORLD_SIZE=1\)"
    ):
        make_trainer(strategy="ddp")
    with pytest.raises(TypeError, match=r"strategy is the class DDPStrategy; pass an object, e.g. DDPStrategy\(\)"):
        make_trainer(strategy=DDPStrategy)
    assert STRATEGY_NAMES == ("single_process", "ddp", "fsdp") and issubclass(DDPStrategy, Strategy)


def test_one_process_of_a_launch_is_not_allowed_to_train_alone(monkeypatch):
    """Under a launch of several processes ``"single_process"`` would make every process train alone on the same
    data and write the same files: refused before any process group is joined."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for strategy in ("single_process", SingleProcess()):
        with pytest.raises(ValueError, match="trains in one process, but this is one of a data-parallel launch"):
            make_trainer(strategy=strategy)


class EveryOtherBatch(SingleProcess):
    """A user's strategy: trains every other batch, evaluates the first batch only, wraps the model to count its
    calls and gives a gradient sync that counts the chunks."""

    name = "every_other_batch"

    def __init__(self):
        super().__init__()
        self.forward_calls, self.chunks = 0, 0
        strategy = self

        class CountingSync(GradientSync):
            def chunk_context(self, chunk):
                strategy.chunks += 1
                return super().chunk_context(chunk)

        self.sync = CountingSync()

    def prepare_training_model(self, training_model, device=None):
        strategy = self

        class Counted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = training_model

            def forward(self, *args, **kwargs):
                strategy.forward_calls += 1
                return self.inner(*args, **kwargs)

        return Counted()

    def gradient_sync(self):
        return self.sync

    def training_dataset(self, dataset):
        return dataset[::2]

    def evaluation_dataset(self, dataset):
        return dataset[:1]


def test_a_strategy_of_your_own_decides_the_model_the_sync_and_the_data():
    strategy = EveryOtherBatch()
    trainer, model = make_trainer(strategy=strategy, batch_chunk_size=2)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(6)]
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    logger = mlp.callbacks.TestMetricsLogger(batches, "validation", evaluator)
    manager = mlp.trainers.TrainingManager(trainer, batches, num_epochs=1, callbacks=[logger])
    trainer.set_training_model(TrainModel(model))
    manager.start_training()
    assert manager.num_batches_per_epoch == 3  # batches 0, 2 and 4
    assert strategy.forward_calls == 6 and strategy.chunks == 6  # 3 batches of 2 chunks, through its wrapper
    expected = torch.nn.functional.mse_loss(model(batches[0][0]), batches[0][1]).item()
    assert manager.logs["current"]["validation"]["dataset"]["loss"] == pytest.approx(expected)  # its first batch
