"""Contract tests of ``EarlyStopping`` on every backend: real training, a scripted monitored value.

The monitored value is written by a producer callback from a fixed sequence, so that the epoch at which training
must stop is known exactly on every backend; the training itself (steps, checkpoints, resume) is real.
"""

import os

import pytest

from tests.recording import RecordingCallback

# epoch: 0    1    2     3     4    5    6    7
VALUES = [1.0, 0.8, 0.9, 0.85, 0.7, 0.6, 0.5, 0.4]
# patience 2: best 0.8 at epoch 1, no improvement at epochs 2 and 3 -> stops after epoch 3


def scripted_metric(mlp, values=VALUES):
    class ScriptedMetric(mlp.callbacks.Callback):
        """Writes ``logs.current.scripted.dataset.loss = values[epoch]`` at every epoch end."""

        @property
        def produces(self):
            return frozenset({"scripted"})

        def on_epoch_completed(self, logs):
            current = logs["current"]
            current["scripted"] = {"dataset": {"loss": values[current["epoch"]]}}
            return True

    return ScriptedMetric("ScriptedMetric")


class StopAfterEpoch:
    """A callback factory: asks the manager to stop after epoch ``at`` (None: never)."""

    @staticmethod
    def make(mlp, at):
        class Stop(mlp.callbacks.Callback):
            def on_epoch_completed(self, logs):
                if logs["current"]["epoch"] == at:
                    self.training_manager.stop_training()
                return True

        return Stop("StopAfterEpoch")


def run(harness, directory, stop_after=None, resume_from=None, num_epochs=8, **early_stopping):
    problem = harness.make_problem(num_batches=2)
    mlp = problem.mlp
    recorder = RecordingCallback()
    stopping = mlp.callbacks.EarlyStopping("scripted.dataset.loss", **({"patience": 2} | early_stopping))
    callbacks = [
        scripted_metric(mlp),
        stopping,
        StopAfterEpoch.make(mlp, stop_after),
        mlp.callbacks.CheckpointManager(
            checkpoints_path=str(directory), metric_to_monitor="scripted.dataset.loss", write_in_background=False
        ),
        recorder,
    ]
    manager = mlp.trainers.TrainingManager(
        problem.trainer, problem.training_batches, num_epochs=num_epochs, callbacks=callbacks, resume_from=resume_from
    )
    manager.start_training()
    return manager, stopping, recorder


def _training_checkpoint(harness, directory):
    return harness.mlp.load_training_checkpoint(os.path.join(directory, "model-training-checkpoint.safetensors"))


def test_training_stops_after_patience_epochs_without_improvement_and_ends_normally(harness, tmp_path):
    """Patience 2: stops after epoch 3 of 8; the end hooks and the final training checkpoint still run, and the
    checkpoint holds the stop (a counter off by one stops after epoch 2 or 4)."""
    manager, stopping, recorder = run(harness, tmp_path)
    assert recorder.count("on_epoch_completed") == 4
    assert (stopping.stopped_epoch, stopping.best, stopping.epochs_without_improvement) == (3, 0.8, 2)
    assert manager.epoch == 4
    assert recorder.count("on_training_checkpoint") == 1 and recorder.count("on_training_ended") == 1
    assert recorder.ended_with["stopped_early"] is True and recorder.ended_with["stopped_on_error"] is False
    checkpoint = _training_checkpoint(harness, tmp_path)
    assert checkpoint["epoch"] == 4
    assert checkpoint["callbacks"]["EarlyStopping"] == {
        "best": 0.8,
        "epochs_without_improvement": 2,
        "stopped_epoch": 3,
        "last_epoch": 3,
    }


def test_a_resumed_run_keeps_the_patience_counter(harness, tmp_path):
    """Stopped by another callback after epoch 2 (one epoch without improvement), the resumed run stops after
    epoch 3, as the uninterrupted run; a lost counter would train on to epoch 4 (0.7 improves) and beyond."""
    _, stopping, _ = run(harness, tmp_path, stop_after=2)
    assert (stopping.stopped_epoch, stopping.epochs_without_improvement) == (None, 1)
    manager, stopping, recorder = run(harness, tmp_path, resume_from="latest")
    assert recorder.count("on_epoch_completed") == 1  # epoch 3 only
    assert (stopping.stopped_epoch, manager.epoch) == (3, 4)
    # resumed once more after the early stop: nothing to train, said in one line
    manager, _, recorder = run(harness, tmp_path, resume_from="latest")
    assert recorder.count("on_epoch_completed") == 0 and manager.epoch == 4


def test_min_delta_and_mode(harness, tmp_path):
    """An improvement of 0.2 (1.0 -> 0.8) with min_delta 0.25 does not count: patience 1 stops after epoch 1;
    mode 'max' on the same values stops after the first decrease (patience 0)."""
    _, stopping, _ = run(harness, tmp_path / "delta", patience=1, min_delta=0.25)
    assert (stopping.stopped_epoch, stopping.best) == (1, 1.0)
    _, stopping, _ = run(harness, tmp_path / "max", patience=0, mode="max")
    assert (stopping.stopped_epoch, stopping.best) == (1, 1.0)


def test_bad_arguments_are_errors_at_construction(harness):
    mlp = harness.mlp
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'lowest'"):
        mlp.callbacks.EarlyStopping(mode="lowest")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="patience must be an int >= 0"):
            mlp.callbacks.EarlyStopping(patience=bad)
    with pytest.raises(ValueError, match="min_delta must be a number >= 0"):
        mlp.callbacks.EarlyStopping(min_delta=-0.1)
    with pytest.raises(TypeError, match="metric_to_monitor must be a dotted path str"):
        mlp.callbacks.EarlyStopping(metric_to_monitor=None)
    problem = harness.make_problem(num_batches=2)
    with pytest.raises(ValueError, match="EarlyStopping: metric_to_monitor 'validation.dataset.loss' is not written"):
        mlp.trainers.TrainingManager(
            problem.trainer, problem.training_batches, num_epochs=1, callbacks=[mlp.callbacks.EarlyStopping()]
        )
