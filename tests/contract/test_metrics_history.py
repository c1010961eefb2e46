"""Contract tests of ``MetricsHistory`` on every backend: rows per epoch, pandas table and CSV, the PNG plot."""

import sys

import pytest

NUM_EPOCHS = 3


def run(harness, directory, num_epochs=NUM_EPOCHS, resume_from=None, stop_after=None):
    problem = harness.make_problem(num_batches=2)
    mlp = problem.mlp
    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=problem.trainer, batch_metric_funcs={"accuracy": mlp.metrics.accuracy}
    )
    history = mlp.callbacks.MetricsHistory()
    seen = []

    class Seen(mlp.callbacks.Callback):
        def on_epoch_completed(self, logs):
            current = logs["current"]
            seen.append((current["validation"]["dataset"]["loss"], current["training"]["window_average"]["loss"]))
            if stop_after is not None and current["epoch"] == stop_after:
                self.training_manager.stop_training()
            return True

    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(problem.validation_batches, "validation", metric_evaluator=evaluator),
        history,
        Seen("Seen"),
        mlp.callbacks.CheckpointManager(checkpoints_path=str(directory), write_in_background=False),
    ]
    manager = mlp.trainers.TrainingManager(
        problem.trainer, problem.training_batches, num_epochs=num_epochs, callbacks=callbacks, resume_from=resume_from
    )
    manager.start_training()
    return history, seen


def test_one_row_per_epoch_with_the_logged_values_and_a_csv_that_round_trips(harness, tmp_path):
    import pandas

    history, seen = run(harness, tmp_path)
    assert [row["epoch"] for row in history.rows] == [0, 1, 2]
    assert [row["global_iter"] for row in history.rows] == [1, 3, 5]
    for row, (validation_loss, training_loss) in zip(history.rows, seen):
        assert row["validation.dataset.loss"] == validation_loss
        assert row["training.window_average.loss"] == training_loss
        assert {"validation.dataset.accuracy", "training_params.epoch.lr", "training_params.epoch.duration"} <= set(row)
        assert row["training_params.epoch.duration"] > 0
    frame = history.to_dataframe()
    assert list(frame.index) == [0, 1, 2] and frame["validation.dataset.loss"].tolist() == [s[0] for s in seen]
    path = history.to_csv(str(tmp_path / "history.csv"))
    pandas.testing.assert_frame_equal(pandas.read_csv(path, index_col="epoch"), frame)


def test_plot_writes_a_png_with_one_panel_per_metric_and_a_curve_per_dataset(harness, tmp_path):
    history, _ = run(harness, tmp_path)
    curves = history.curves()
    assert sorted(curves) == ["accuracy", "loss"]
    assert sorted(curves["loss"]) == ["training.window_average", "validation.dataset"]
    assert curves["loss"]["validation.dataset"] == [[0, 1, 2], [row["validation.dataset.loss"] for row in history.rows]]
    path = history.plot(str(tmp_path / "plots" / "history.png"))
    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    drawn = {axis.get_title(): axis for axis in history.last_figure.axes}  # what the figure holds
    assert sorted(drawn) == ["accuracy", "loss"]
    lines = {line.get_label(): line for line in drawn["loss"].get_lines()}
    assert sorted(lines) == ["training.window_average", "validation.dataset"]
    assert list(lines["validation.dataset"].get_ydata()) == curves["loss"]["validation.dataset"][1]
    assert list(lines["validation.dataset"].get_xdata()) == [0, 1, 2]


def test_a_resumed_run_keeps_the_rows_of_the_epochs_before(harness, tmp_path):
    run(harness, tmp_path, stop_after=0)
    history, _ = run(harness, tmp_path, resume_from="latest")
    assert [row["epoch"] for row in history.rows] == [0, 1, 2]


def test_missing_pandas_or_matplotlib_is_a_clear_error(harness, tmp_path, monkeypatch):
    history = harness.mlp.callbacks.MetricsHistory()
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"MetricsHistory.to_dataframe needs pandas.*pip install pandas"):
        history.to_dataframe()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"MetricsHistory.plot needs matplotlib"):
        history.plot(str(tmp_path / "x.png"))
    with pytest.raises(TypeError, match="metric_paths must be a list of dotted path str"):
        harness.mlp.callbacks.MetricsHistory("validation.dataset.loss")
