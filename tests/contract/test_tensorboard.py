"""Contract tests of ``Tensorboard`` / ``AutoTensorboard`` on every backend, read back with TensorBoard's own
``EventAccumulator``."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

NUM_EPOCHS, NUM_BATCHES = 2, 3


def scalars(directory, tag):
    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def tags(directory):
    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return sorted(accumulator.Tags()["scalars"])


def record_values(mlp, paths):
    from mlpug.logs import get_value_at

    class Record(mlp.callbacks.Callback):
        """What a consumer reads at every batch / epoch end, as (global_iter, value) per path."""

        def __init__(self):
            super().__init__("Record")
            self.values = {path: [] for path in paths}

        def _read(self, current, batch_level):
            for path in paths:
                if (path.split(".")[1] in ("batch", "window_average")) == batch_level:
                    self.values[path].append((current["global_iter"], get_value_at(current, path)))

        def on_batch_training_completed(self, training_batch, logs):
            self._read(logs["current"], True)
            return True

        def on_epoch_completed(self, logs):
            self._read(logs["current"], False)
            return True

    return Record()


def run(harness, callbacks_for, num_epochs=NUM_EPOCHS):
    problem = harness.make_problem(num_batches=NUM_BATCHES)
    mlp = problem.mlp
    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=problem.trainer, batch_metric_funcs={"accuracy": mlp.metrics.accuracy}
    )
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(problem.validation_batches, "validation", metric_evaluator=evaluator),
        *callbacks_for(mlp),
    ]
    manager = mlp.trainers.TrainingManager(
        problem.trainer, problem.training_batches, num_epochs=num_epochs, callbacks=callbacks
    )
    manager.start_training()
    return manager, callbacks


PATHS = [
    "training.batch.loss",
    "training.window_average.loss",
    "validation.dataset.loss",
    "validation.dataset.accuracy",
    "training_params.batch.lr",
]


def test_metric_paths_become_runs_and_tags_with_the_logged_values(harness, tmp_path):
    """Every batch (log_period 1) and every epoch end: the runs ``<section>-<level>``, the tags, the steps
    (global_iter) and the values a consumer read from ``logs`` at the same moment (float32 in the event file)."""
    recorder = {}

    def callbacks_for(mlp):
        recorder["callback"] = record_values(mlp, PATHS)
        return [mlp.callbacks.Tensorboard(PATHS, log_dir=str(tmp_path), log_period=1), recorder["callback"]]

    run(harness, callbacks_for)
    recorded = recorder["callback"].values
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "training-batch",
        "training-window_average",
        "training_params-batch",
        "validation-dataset",
    ]
    assert tags(tmp_path / "validation-dataset") == ["accuracy", "loss"]
    for path in PATHS:
        section, level, name = path.split(".")
        written = scalars(tmp_path / f"{section}-{level}", name)
        expected = recorded[path]
        assert [step for step, _ in written] == [step for step, _ in expected]
        assert [value for _, value in written] == pytest.approx([value for _, value in expected], rel=1e-6)
    assert [step for step, _ in scalars(tmp_path / "training-batch", "loss")] == list(range(NUM_EPOCHS * NUM_BATCHES))
    assert [step for step, _ in scalars(tmp_path / "validation-dataset", "loss")] == [2, 5]  # the epochs' last batch


def test_log_period_writes_every_nth_batch_only(harness, tmp_path):
    run(harness, lambda mlp: [mlp.callbacks.Tensorboard("training.batch.loss", log_dir=str(tmp_path), log_period=2)])
    assert [step for step, _ in scalars(tmp_path / "training-batch", "loss")] == [1, 3, 5]


def test_auto_tensorboard_writes_every_metric_of_its_section(harness, tmp_path):
    run(
        harness,
        lambda mlp: [
            mlp.callbacks.AutoTensorboard("training", log_dir=str(tmp_path), log_period=1),
            mlp.callbacks.AutoTensorboard("validation", log_dir=str(tmp_path), log_period=1),
        ],
    )
    assert tags(tmp_path / "training-batch") == ["accuracy", "loss"]
    assert tags(tmp_path / "training-window_average") == ["accuracy", "loss"]
    assert tags(tmp_path / "validation-dataset") == ["accuracy", "loss"]
    assert {"duration", "lr"} <= set(tags(tmp_path / "training_params-batch"))
    assert "duration" in tags(tmp_path / "training_params-epoch")


def test_bad_arguments_are_errors_at_construction(harness, tmp_path):
    mlp = harness.mlp
    with pytest.raises(ValueError, match="must be <section>.<level>.<name>.*got 'loss'"):
        mlp.callbacks.Tensorboard("loss")
    with pytest.raises(ValueError, match="metric_paths is empty"):
        mlp.callbacks.Tensorboard([])
    with pytest.raises(ValueError, match="log_period must be an int >= 1"):
        mlp.callbacks.Tensorboard("training.batch.loss", log_period=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        mlp.callbacks.Tensorboard("training.batch.loss", log_dir=str(tmp_path / "file"))
    problem = harness.make_problem(num_batches=1)
    with pytest.raises(ValueError, match="Tensorboard: metric path 'validation.dataset.loss' is not written"):
        mlp.trainers.TrainingManager(
            problem.trainer, problem.training_batches, num_epochs=1,
            callbacks=[mlp.callbacks.Tensorboard("validation.dataset.loss", log_dir=str(tmp_path))],
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"dataset_name 'validation' is not written .* produce \[\]"):
        mlp.trainers.TrainingManager(
            problem.trainer, problem.training_batches, num_epochs=1,
            callbacks=[mlp.callbacks.AutoTensorboard("validation", log_dir=str(tmp_path))],
        )  # fmt: skip
