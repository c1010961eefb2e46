"""Sample-weighted metrics over a batch, a sliding window and a dataset (fake backend)."""

import numpy as np
import pytest

from mlpug.callbacks import TestMetricsLogger, TrainingMetricsLogger
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.trainer import ModelOutputs
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import make_trainer
from tests.recording import RecordingCallback


def batches_of_sizes(*sizes):
    batches, x = [], 0.0
    for size in sizes:
        batches.append([(x + i, 1.0) for i in range(size)])
        x += size
    return batches


def mean_abs_error(inputs):
    errors = inputs.auxiliary_results["errors"]
    return sum(abs(e) for e in errors) / len(errors)


def test_dataset_metrics_are_sample_weighted():
    trainer, model = make_trainer()
    model.w, model.b = 1.0, 0.0  # prediction x, target 1 -> error x - 1
    dataset = batches_of_sizes(4, 1)  # x = 0..3 and 4
    evaluator = MetricEvaluator(trainer=trainer, batch_metric_funcs={"mae": mean_abs_error})
    values = evaluator.evaluate_dataset(dataset)
    errors = [x - 1.0 for x in range(5)]
    assert values["loss"] == pytest.approx(sum(e * e for e in errors) / 5)  # not the mean of batch means
    assert values["mae"] == pytest.approx(sum(abs(e) for e in errors) / 5)


def test_metric_function_may_return_value_and_weight():
    trainer, model = make_trainer()
    model.w, model.b = 1.0, 0.0

    def count_large_errors(inputs):
        large = [e for e in inputs.auxiliary_results["errors"] if abs(e) > 1.5]
        return (sum(abs(e) for e in large) / max(len(large), 1), len(large))

    evaluator = MetricEvaluator(trainer=trainer, batch_metric_funcs={"large_error": count_large_errors})
    values = evaluator.evaluate_dataset(batches_of_sizes(4, 1))  # errors -1,0,1,2 | 3
    assert values["large_error"] == pytest.approx((2 + 3) / 2)


def test_window_average_and_batch_values_in_training_logs():
    trainer, model = make_trainer()
    evaluator = MetricEvaluator(trainer=trainer)
    recorder = RecordingCallback(snapshot_logs=True)
    dataset = batches_of_sizes(2, 4, 1)
    manager = TrainingManager(
        trainer, dataset, num_epochs=1, callbacks=[TrainingMetricsLogger(evaluator, window_length=2), recorder]
    )
    manager.start_training()
    batch_logs = [logs["current"]["training"] for kind, logs in recorder.snapshots if kind == "batch"]
    losses = [b["batch"]["loss"] for b in batch_logs]
    assert losses[0] == pytest.approx(sum((0 * x - 1) ** 2 for x in (0, 1)) / 2)  # w = b = 0 before the first step
    assert batch_logs[0]["window_average"]["loss"] == pytest.approx(losses[0])
    assert batch_logs[1]["window_average"]["loss"] == pytest.approx((2 * losses[0] + 4 * losses[1]) / 6)
    assert batch_logs[2]["window_average"]["loss"] == pytest.approx((4 * losses[1] + 1 * losses[2]) / 5)


def test_test_metrics_logger_batch_level_cycles_through_dataset():
    trainer, _ = make_trainer()
    evaluator = MetricEvaluator(trainer=trainer)
    recorder = RecordingCallback(snapshot_logs=True)
    served = []

    class Validation:
        def __iter__(self):
            for index, batch in enumerate(batches_of_sizes(3, 2)):
                served.append(index)
                yield batch

    validation = Validation()
    manager = TrainingManager(
        trainer,
        batches_of_sizes(1, 1, 1),
        num_epochs=1,
        callbacks=[
            TestMetricsLogger(validation, "validation", evaluator, batch_level=True, window_length=10),
            recorder,
        ],
    )
    manager.start_training()
    sections = [logs["current"]["validation"] for kind, logs in recorder.snapshots if kind == "batch"]
    assert len(sections) == 3 and all(set(s) == {"batch", "window_average"} for s in sections)
    assert served == [0, 1, 0]  # one validation batch per training batch, re-iterating the dataset
    first_w, first_b = 0.1 * 2 * 1.0 * 0.0, 0.1 * 2 * 1.0  # after one SGD step on x=0, y=1 from w = b = 0
    expected = sum((first_w * x + first_b - 1.0) ** 2 for x in (0, 1, 2)) / 3
    assert sections[0]["batch"]["loss"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_metric_funcs=[len]), "batch_metric_funcs must be a dict"),
        (dict(batch_metric_funcs={"acc": 3}), "must map str names to callables; got 'acc': 3"),
    ],
)
def test_bad_metric_functions(kwargs, match):
    with pytest.raises(TypeError, match=match):
        MetricEvaluator(**kwargs)


def test_logger_arguments_are_checked():
    trainer, _ = make_trainer()
    with pytest.raises(TypeError, match="metric_evaluator must be an mlp.evaluation.MetricEvaluator"):
        TrainingMetricsLogger(metric_evaluator=trainer)
    with pytest.raises(ValueError, match="window_length must be None or an int >= 1, got 0"):
        TrainingMetricsLogger(MetricEvaluator(trainer=trainer), window_length=0)
    with pytest.raises(ValueError, match="metric_evaluator has no trainer"):
        TestMetricsLogger([[(0.0, 1.0)]], "validation", MetricEvaluator())


def test_window_values_read_late_are_those_of_their_batch_or_an_error():
    trainer, _ = make_trainer()
    kept = []

    class KeepLogs(RecordingCallback):
        def on_batch_training_completed(self, training_batch, logs):
            kept.append(logs["current"]["training"])

    dataset = batches_of_sizes(1, 1, 1, 1, 1, 1, 1)
    manager = TrainingManager(
        trainer,
        dataset,
        num_epochs=1,
        callbacks=[TrainingMetricsLogger(MetricEvaluator(trainer=trainer), window_length=2), KeepLogs()],
    )
    manager.start_training()
    losses = [section["batch"]["loss"] for section in kept]
    # Batch 5's window (batches 4, 5) is still kept after batch 6; it holds its own values, not the latest.
    assert kept[5]["window_average"]["loss"] == pytest.approx((losses[4] + losses[5]) / 2)
    with pytest.raises(RuntimeError, match="window values of batch 1 were read more than 2 batches later"):
        kept[1]["window_average"]["loss"]


def test_batch_level_test_metrics_logger_state_continues_position_and_window():
    served = []

    class Validation:
        def __iter__(self):
            for index, batch in enumerate(batches_of_sizes(2, 2, 2)):
                served.append(index)
                yield batch

    def make_logger(trainer):
        return TestMetricsLogger(
            Validation(), "validation", MetricEvaluator(trainer=trainer), batch_level=True, window_length=3
        )

    trainer, _ = make_trainer()
    first = make_logger(trainer)
    TrainingManager(trainer, batches_of_sizes(1, 1, 1, 1), num_epochs=1, callbacks=[first]).start_training()
    assert served == [0, 1, 2, 0]
    state = first.get_state()
    assert state["position"] == 1 and state["window"]["end"] == 4 and len(state["window"]["entries"]) == 3

    served.clear()
    trainer2, _ = make_trainer()
    second, recorder = make_logger(trainer2), RecordingCallback(snapshot_logs=True)
    second.set_state(state)
    TrainingManager(trainer2, batches_of_sizes(1, 1), num_epochs=1, callbacks=[second, recorder]).start_training()
    assert served[-2:] == [1, 2]  # continues after validation batch 0 of the interrupted pass
    windows = [logs["current"]["validation"]["window_average"]["loss"] for kind, logs in recorder.snapshots]
    restored_losses = [entry["loss"][0] for entry in state["window"]["entries"]]
    new_loss = recorder.snapshots[0][1]["current"]["validation"]["batch"]["loss"]
    assert windows[0] == pytest.approx((sum(restored_losses[1:]) * 2 + new_loss * 2) / 6)


class MaskedMeanTrainer:
    """Evaluates a masked mean (like a loss over valid tokens): ``num_samples`` is the number of valid entries."""

    def evaluate_loss(self, batch, evaluate_settings=None, inference_mode=True):
        values, mask = batch
        count = int(mask.sum())
        return ModelOutputs(np.float64((values * mask).sum() / max(count, 1)), count, None)  # a chunk may have none


@pytest.mark.parametrize("batch_chunk_size", [None, 2])
def test_dataset_metrics_are_weighted_by_the_models_own_num_samples(batch_chunk_size):
    """Weighting by rows instead (a deliberate break of MetricEvaluator.gather) gives 2.0 here, not 2.5."""
    batches = [
        (np.array([1.0, 1.0, 1.0, 1.0]), np.array([1, 0, 0, 0])),  # 1 valid entry, mean 1
        (np.array([3.0, 3.0, 3.0, 3.0]), np.array([1, 1, 1, 0])),  # 3 valid entries, mean 3
    ]
    evaluator = MetricEvaluator(trainer=MaskedMeanTrainer(), batch_chunk_size=batch_chunk_size)
    values = evaluator.evaluate_dataset(batches)
    assert values["loss"] == pytest.approx((1 * 1 + 3 * 3) / 4)  # 2.5: per valid entry, not per batch or row
