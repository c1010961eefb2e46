"""CheckpointManager, crash-safe files and resume on the pure-Python fake backend (NumPy-format saver)."""

import collections
import errno
import json
import logging
import os
import pickle
import random
import signal
import struct
import threading

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from mlpug import logging as mlpug_logging
from mlpug.callbacks import Callback, CheckpointManager, TestMetricsLogger, TrainingMetricsLogger
from mlpug.callbacks.improvement import ImprovementRule
from mlpug.checkpointing import (
    CheckpointError,
    CheckpointFileNames,
    CheckpointWriteError,
    NumpyCheckpointSaver,
    atomic_write,
    make_header,
    remove_stale_temporary_files,
)
from mlpug.data import ResumableArrayBatches
from mlpug.distributed import SerialContext
from mlpug.evaluation import MetricEvaluator
from mlpug.logs import MetricValues
from mlpug.trainers.training_manager import TrainingManager
from tests.core.fake_backend import make_trainer
from tests.recording import CountBatches

NUM_BATCHES, BATCH_SIZE = 4, 3


class PairBatches(ResumableArrayBatches):
    """Resumable batches as lists of (x, y) pairs, the fake backend's batch format."""

    def __iter__(self):
        for (rows,) in super().__iter__():
            yield [tuple(row) for row in rows.tolist()]


def make_data(seed=5):
    xs = np.linspace(-1, 1, NUM_BATCHES * BATCH_SIZE)
    return PairBatches((np.stack([xs, 2 * xs - 1], axis=1),), BATCH_SIZE, shuffle=True, seed=seed)


class Draws(Callback):
    """Consumes Python and NumPy random numbers every batch and at every epoch start (like dropout, augmentation
    or an epoch-level shuffle would)."""

    def __init__(self, stop_at=None):
        super().__init__("Draws")
        self.values, self.losses, self.stop_at = [], [], stop_at

    def on_epoch_start(self, logs):
        if logs["current"]["batch_step"] == 0:  # not when a resumed run re-enters an epoch it had started
            self.values.append(("epoch", random.random(), float(np.random.rand())))

    def on_batch_training_completed(self, training_batch, logs):
        self.values.append((random.random(), float(np.random.rand())))
        self.losses.append(logs["current"]["training"]["batch"]["loss"])
        if self.stop_at == logs["current"]["global_iter"]:
            self.training_manager.stop_training()


def build(
    directory,
    stop_at=None,
    resume_from=None,
    num_epochs=3,
    data=None,
    extra_callbacks=(),
    resume_strict=True,
    **checkpoint_kwargs,
):
    trainer, model = make_trainer()
    kwargs = dict(metric_to_monitor="training.batch.loss", batch_level=True, write_in_background=True)
    kwargs.update(checkpoint_kwargs)
    draws = Draws(stop_at)
    checkpoint_manager = CheckpointManager(NumpyCheckpointSaver(), checkpoints_path=str(directory), **kwargs)
    callbacks = [TrainingMetricsLogger(MetricEvaluator(trainer=trainer)), draws, checkpoint_manager, *extra_callbacks]
    manager = TrainingManager(
        trainer,
        data or make_data(),
        num_epochs=num_epochs,
        callbacks=callbacks,
        resume_from=resume_from,
        resume_strict=resume_strict,
    )
    return manager, model, draws, checkpoint_manager


# ----- files -----
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "file.bin")
    atomic_write(path, lambda file: file.write(b"old"))

    def failing(file):
        file.write(b"partial new content")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert open(path, "rb").read() == b"old"
    assert [name for _, _, names in os.walk(tmp_path) for name in names] == ["file.bin"]  # no temporary file left
    atomic_write(path, lambda file: file.write(b"new"))
    assert open(path, "rb").read() == b"new"


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path):
    dead, alive = (
        tmp_path / ".model-training-checkpoint.safetensors.tmp-999999999",
        tmp_path / f".model-x.tmp-{os.getpid()}",
    )
    dead.write_bytes(b"x")
    alive.write_bytes(b"x")
    dead_directory, own_directory = tmp_path / ".mlpug.tmp-999999998", tmp_path / f".mlpug.tmp-{os.getpid()}"
    for directory in (dead_directory, own_directory):  # with what safetensors leaves: a file of its own
        directory.mkdir()
        (directory / ".tmpAbC123").write_bytes(b"x")
    removed = remove_stale_temporary_files(str(tmp_path), "model")
    assert sorted(removed) == sorted([dead.name, dead_directory.name])
    assert alive.exists() and own_directory.exists()
    removed_at_the_end = remove_stale_temporary_files(str(tmp_path), "model", including_own=True)
    assert sorted(removed_at_the_end) == sorted([alive.name, own_directory.name])
    assert not own_directory.exists() and not alive.exists()


def test_numpy_saver_round_trip_preserves_structure_and_refuses_objects(tmp_path):
    saver = NumpyCheckpointSaver()
    ordered = collections.OrderedDict([("b", np.ones(2)), ("a", 1)])
    ordered._metadata = collections.OrderedDict([("", {"version": 1})])
    state = {
        "mlpug": make_header("model", "numpy"),  # a training checkpoint must hold a training state
        "nested": {0: (1, 2.5, None), "nan": float("nan"), "flag": True, "text": "é", (1, "x"): [], None: 0},
        "arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), np.int64(7), np.float64(0.5), np.asarray(3.0)],
        "more": [np.arange(6, dtype=np.int16).reshape(2, 3).T, np.zeros((0, 2)), np.arange(3, dtype=">i4")],
        "ordered": ordered,
        "big": 2**70,
    }
    path = str(tmp_path / "state.safetensors")
    saver.save(state, path)
    loaded = saver.load(path, kind="model")
    assert list(loaded) == list(state) and list(loaded["nested"]) == list(state["nested"])
    assert loaded["nested"][0] == (1, 2.5, None) and loaded["nested"][(1, "x")] == [] and loaded["nested"][None] == 0
    assert np.isnan(loaded["nested"]["nan"]) and loaded["nested"]["flag"] is True and loaded["nested"]["text"] == "é"
    assert loaded["arrays"][0].dtype == np.float32 and np.array_equal(loaded["arrays"][0], state["arrays"][0])
    assert loaded["arrays"][1] == 7 and isinstance(loaded["arrays"][1], np.int64)
    assert loaded["arrays"][2] == 0.5 and isinstance(loaded["arrays"][2], np.float64)
    assert isinstance(loaded["arrays"][3], np.ndarray) and loaded["arrays"][3].shape == () and loaded["arrays"][3] == 3
    for expected, actual in zip(state["more"], loaded["more"]):
        assert actual.shape == expected.shape and np.array_equal(actual, expected)
    assert type(loaded["ordered"]) is collections.OrderedDict and list(loaded["ordered"]) == ["b", "a"]
    assert loaded["ordered"]._metadata == {"": {"version": 1}}
    assert loaded["big"] == 2**70 and loaded["mlpug"]["path"] == path and loaded["mlpug"]["format_version"] == 2
    with pytest.raises(TypeError, match=r"checkpoint\['callbacks'\]\['x'\] is a builtins.object"):
        saver.save({"callbacks": {"x": object()}}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TypeError, match=r"checkpoint\['x'\] is a NumPy array of dtype <U1; .* float32"):
        saver.save({"mlpug": make_header("model", "numpy"), "x": np.array(["a"])}, str(tmp_path / "bad.safetensors"))
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(CheckpointError, match="is a model checkpoint, expected a training checkpoint"):
        saver.load(path, kind="training")
    with pytest.raises(CheckpointError, match="written by the 'numpy' backend"):
        NumpyCheckpointSaver(backend="tensorflow").load(path)


def test_files_are_safetensors_with_header_structure_and_checksum_metadata(tmp_path):
    path = str(tmp_path / "state.safetensors")
    NumpyCheckpointSaver().save({"mlpug": make_header("model", "numpy"), "w": [np.ones(3), np.zeros(2)]}, path)
    with safetensors.safe_open(path, framework="np") as file:
        metadata, names = file.metadata(), sorted(file.keys())
    assert names == ["a0", "a1"] and sorted(metadata) == ["checksum", "mlpug", "structure"]
    assert json.loads(metadata["mlpug"])["format"] == "mlpug-checkpoint"
    assert json.loads(metadata["structure"]) == {"__dict__": [["w", [{"__array__": 0}, {"__array__": 1}]]]}
    assert metadata["checksum"].startswith("crc32:")


def _data_start(content: bytes) -> int:
    """Offset of the array data in a safetensors file: after the 8-byte length and the JSON header."""
    return 8 + struct.unpack("<Q", content[:8])[0]


class Hostile:
    """Unpickling it would create a file (what an attacker would make run any code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_corrupt_empty_and_foreign_files_give_errors_naming_the_file(tmp_path):
    saver = NumpyCheckpointSaver()
    path = str(tmp_path / "state.safetensors")
    saver.save({"mlpug": make_header("model", "numpy"), "weights": np.ones(1000), "step": 12345}, path)
    data = open(path, "rb").read()
    start = _data_start(data)
    flipped_data, flipped_structure = bytearray(data), bytearray(data)
    flipped_data[start + (len(data) - start) // 2] ^= 0x01  # one bit of an array value
    flipped_structure[data.index(b"12345")] ^= 0x01  # "12345" -> "02345" in the skeleton: still valid JSON
    cases = {
        "half.safetensors": data[: len(data) // 2],
        "header-only.safetensors": data[:start],
        "eight-bytes.safetensors": data[:8],
        "empty.safetensors": b"",
        "text.safetensors": b"hello",
        "random.safetensors": np.random.default_rng(0).bytes(5000),
        "flipped-data.safetensors": bytes(flipped_data),
        "flipped-structure.safetensors": bytes(flipped_structure),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        expected = "corrupt" if name.startswith("flipped") else "truncated or corrupt"
        with pytest.raises(CheckpointError, match=expected) as raised:
            saver.load(str(tmp_path / name))
        assert name in str(raised.value)
    assert saver.load(path)["step"] == 12345  # the original is fine

    marker = tmp_path / "pwned"
    (tmp_path / "hostile.safetensors").write_bytes(pickle.dumps({"mlpug": Hostile(str(marker))}))
    np.savez(tmp_path / "plain.npz", x=np.ones(2))
    foreign = {"hostile.safetensors": "it is a pickle", "plain.npz": "it is a zip archive"}
    for name, what in foreign.items():
        with pytest.raises(CheckpointError, match=f"is not an mlpug numpy checkpoint: {what}") as raised:
            saver.load(str(tmp_path / name))
        assert name in str(raised.value)
    assert not marker.exists()  # nothing was unpickled
    safetensors.numpy.save_file({"x": np.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="is not an mlpug checkpoint"):
        saver.load(str(tmp_path / "other.safetensors"))


def test_file_names_are_stable():
    names = CheckpointFileNames("/ckpt", "run", "safetensors")
    assert names.best_model == "/ckpt/run-best-model-checkpoint.safetensors"
    assert names.latest_model == "/ckpt/run-latest-model-checkpoint.safetensors"
    assert names.training == "/ckpt/run-training-checkpoint.safetensors"
    assert names.emergency_training == "/ckpt/run-emergency-training-checkpoint.safetensors"
    assert names.archived_model("epoch", 3) == "/ckpt/run-model-checkpoint-epoch-000003.safetensors"


# ----- arguments -----
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(metric_opt_mode="lowest"), ValueError, "metric_opt_mode must be 'min' or 'max', got 'lowest'"),
        (dict(metric_monitor_period=0), ValueError, "metric_monitor_period must be an int >= 1, got 0"),
        (dict(create_checkpoint_every=1.5), ValueError, "create_checkpoint_every"),
        (dict(keep_last=0), ValueError, "keep_last must be an int >= 1 or None"),
        (dict(improvement_threshold=-1), ValueError, "improvement_threshold must be a number >= 0"),
        (dict(metric_to_monitor=3), TypeError, "metric_to_monitor must be a dotted path"),
        (dict(batch_level="yes"), TypeError, "batch_level must be a bool"),
        (dict(base_checkpoint_filename="a/b"), ValueError, "without directories"),
        (dict(model_hyper_parameters={"act": object()}), TypeError, r"model_hyper_parameters\['act'\]"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        CheckpointManager(NumpyCheckpointSaver(), **kwargs)


def test_saver_must_be_a_checkpoint_saver():
    with pytest.raises(TypeError, match="saver must be an mlpug.checkpointing.CheckpointSaver"):
        CheckpointManager("numpy")


@pytest.mark.parametrize(
    "metric,reason",
    [
        ("val.dataset.loss", "no callback produces 'val'"),
        ("training.dataset.loss", "the callbacks that produce 'training' \\(TrainingMetricsLogger\\) do not write it"),
    ],
)
def test_monitored_metric_that_no_callback_writes_fails_at_construction_listing_paths(tmp_path, metric, reason):
    """A typo in metric_to_monitor. Broken on purpose (no check in CheckpointManager.set_training_manager), it fails
    only at the first check, after a whole epoch or batch (a KeyError): this test fails."""
    with pytest.raises(
        ValueError,
        match=f"metric_to_monitor '{metric}' is not written into logs\\['current'\\]: "
        f"{reason}\\.( Did you mean [^?]*\\?)? Paths that are written: .*training\\.batch\\.loss, "
        "training\\.window_average\\.loss",
    ):
        build(tmp_path, metric_to_monitor=metric)


def test_monitored_metric_of_a_producer_that_declares_no_paths_is_checked_when_read(tmp_path):
    class Validation(Callback):
        produces = frozenset({"validation"})  # declares its section, not its paths: nothing to check beforehand

    manager, *_ = build(tmp_path, metric_to_monitor="validation.dataset.loss", extra_callbacks=[Validation()])
    with pytest.raises(KeyError, match=r"'validation.dataset.loss' does not exist.*training\.batch\.loss"):
        manager.start_training()


# ----- what is written when -----
def test_files_archives_and_keep_last(tmp_path):
    manager, *_ = build(tmp_path, batch_level=False, archive_last_model_checkpoint_every=1, keep_last=2, num_epochs=4)
    manager.start_training()
    assert sorted(os.listdir(tmp_path)) == [
        "model-best-model-checkpoint.safetensors",
        "model-latest-model-checkpoint.safetensors",
        "model-model-checkpoint-epoch-000003.safetensors",
        "model-model-checkpoint-epoch-000004.safetensors",
        "model-training-checkpoint.safetensors",
    ]
    saver = NumpyCheckpointSaver()
    archived = saver.load(str(tmp_path / "model-model-checkpoint-epoch-000003.safetensors"), kind="model")
    assert archived["progress"]["epoch"] == 2 and archived["progress"]["global_iter"] == 3 * NUM_BATCHES - 1
    training = saver.load(str(tmp_path / "model-training-checkpoint.safetensors"), kind="training")
    assert (training["epoch"], training["batch_step"], training["global_iter"]) == (4, 0, 4 * NUM_BATCHES)


class ScriptedMetric(Callback):
    """Writes scripted values at logs.current.validation.dataset.loss at every epoch end."""

    produces = frozenset({"validation"})  # a metric producer: its hooks run before the CheckpointManager's

    def __init__(self, values):
        super().__init__("ScriptedMetric")
        self.values = list(values)

    def on_epoch_completed(self, logs):
        logs["current"]["validation"] = {"dataset": MetricValues(loss=self.values[logs["epoch"]])}


@pytest.mark.parametrize(
    "mode, threshold, values, best_epochs",
    [
        ("min", 0.0, [5.0, 4.95, 6.0, 3.0], [0, 1, 3]),
        ("min", 0.1, [5.0, 4.95, 6.0, 3.0], [0, 3]),
        ("max", 0.0, [1.0, 2.0, float("nan"), 1.5], [0, 1]),
    ],
)
def test_improvement_mode_and_threshold(tmp_path, mode, threshold, values, best_epochs):
    trainer, _ = make_trainer()
    seen = []

    class SeeBest(Callback):
        def on_epoch_completed(self, logs):
            if logs["current"]["is_best"]:
                seen.append(logs["epoch"])
                assert logs["best"]["validation"]["dataset"]["loss"] == values[logs["epoch"]]

    checkpoint_manager = CheckpointManager(
        NumpyCheckpointSaver(), str(tmp_path), metric_opt_mode=mode, improvement_threshold=threshold,
        non_finite_metric="warn",  # a NaN is never best, and with "warn" training goes on
    )  # fmt: skip
    callbacks = [ScriptedMetric(values), checkpoint_manager, SeeBest()]
    manager = TrainingManager(trainer, make_data(), num_epochs=len(values), callbacks=callbacks)
    manager.start_training()
    assert seen == best_epochs
    assert checkpoint_manager.best_epoch == best_epochs[-1]
    best = NumpyCheckpointSaver().load(checkpoint_manager.file_names.best_model, kind="model")
    assert best["progress"]["epoch"] == best_epochs[-1]


def test_the_best_is_decided_by_the_improvement_rule(tmp_path):
    """The manager asks its ``improvement`` rule with (value, best so far); a rule that calls every value better
    makes rising losses the best in mode "min" (its own rule would keep epoch 0)."""
    trainer, _ = make_trainer()
    values, asked = [5.0, 6.0, 7.0], []

    class AlwaysBetter(ImprovementRule):
        def is_improvement(self, value, best):
            asked.append((value, best))
            return True

    checkpoint_manager = CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), improvement_threshold=0.5)
    assert (checkpoint_manager.metric_opt_mode, checkpoint_manager.improvement_threshold) == ("min", 0.5)
    assert isinstance(checkpoint_manager.improvement, ImprovementRule)
    checkpoint_manager.improvement = AlwaysBetter("min")
    callbacks = [ScriptedMetric(values), checkpoint_manager]
    manager = TrainingManager(trainer, make_data(), num_epochs=3, callbacks=callbacks)
    manager.start_training()
    assert asked == [(5.0, None), (6.0, 5.0), (7.0, 6.0)]
    assert checkpoint_manager.best_epoch == 2


# ----- resume -----
@pytest.mark.parametrize("stop_at", [3, 5, 7], ids=["epoch_end", "mid_epoch", "epoch_end_2"])
def test_exact_resume_including_python_and_numpy_random_states(tmp_path, stop_at):
    random.seed(1), np.random.seed(1)
    straight, straight_model, straight_draws, _ = build(tmp_path / "straight")
    straight.start_training()

    random.seed(1), np.random.seed(1)
    first, _, first_draws, _ = build(tmp_path / "stopped", stop_at=stop_at)
    first.start_training()
    random.seed(99), np.random.seed(99)  # the resumed run must take its random states from the checkpoint
    second, model, second_draws, _ = build(tmp_path / "stopped", resume_from="latest")
    second.start_training()

    assert (model.w, model.b) == (straight_model.w, straight_model.b)
    assert first_draws.values + second_draws.values == straight_draws.values
    assert first_draws.losses + second_draws.losses == straight_draws.losses
    assert second.global_iter == straight.global_iter == 3 * NUM_BATCHES


def test_get_state_in_the_checkpoint_phases_reports_the_next_batch_to_train(tmp_path):
    positions = []

    class Probe(Callback):
        def on_batch_checkpoint(self, logs):
            state = self.training_manager.get_state()
            positions.append(("batch", state["epoch"], state["batch_step"]))

        def on_epoch_completed(self, logs):  # the epoch end is not done yet: resuming here reruns its hooks
            state = self.training_manager.get_state()
            positions.append(("epoch end", state["epoch"], state["batch_step"]))

        def on_epoch_checkpoint(self, logs):
            state = self.training_manager.get_state()
            positions.append(("epoch", state["epoch"], state["batch_step"]))

    trainer, _ = make_trainer()
    TrainingManager(trainer, make_data(), num_epochs=1, callbacks=[Probe()]).start_training()
    assert positions == [
        ("batch", 0, 1), ("batch", 0, 2), ("batch", 0, 3), ("batch", 0, 4), ("epoch end", 0, 4), ("epoch", 1, 0)
    ]  # fmt: skip


def test_emergency_checkpoint_on_failure_keeps_the_regular_one(tmp_path):
    trainer, _ = make_trainer(fail_at_call=6)
    checkpoint_manager = CheckpointManager(
        NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None, batch_level=True, create_checkpoint_every=2
    )
    manager = TrainingManager(trainer, make_data(), num_epochs=2, callbacks=[checkpoint_manager])
    with pytest.raises(FloatingPointError):
        manager.start_training()
    saver = NumpyCheckpointSaver()
    emergency = saver.load(checkpoint_manager.file_names.emergency_training, kind="training")
    regular = saver.load(checkpoint_manager.file_names.training, kind="training")
    assert (emergency["epoch"], emergency["batch_step"], emergency["global_iter"]) == (1, 1, 5)  # the failed batch
    assert regular["global_iter"] == 4


def test_sigterm_writes_the_training_checkpoint_at_the_batch_boundary(tmp_path):
    class Terminate(Callback):
        def on_batch_training_start(self, training_batch, logs):
            if logs["current"]["global_iter"] == 5:
                signal.raise_signal(signal.SIGTERM)

    trainer, _ = make_trainer()
    checkpoint_manager = CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None)
    manager = TrainingManager(trainer, make_data(), num_epochs=3, callbacks=[Terminate(), checkpoint_manager])
    with pytest.raises(SystemExit) as raised:
        manager.start_training()
    assert raised.value.code == 128 + signal.SIGTERM
    state = NumpyCheckpointSaver().load(checkpoint_manager.training_checkpoint_path, kind="training")
    assert (state["epoch"], state["batch_step"], state["global_iter"]) == (1, 2, 6)


def test_resume_from_validation(tmp_path):
    trainer, _ = make_trainer()
    with pytest.raises(ValueError, match="needs a CheckpointManager"):
        TrainingManager(trainer, make_data(), resume_from="latest")
    with pytest.raises(TypeError, match="resume_from must be a checkpoint path"):
        TrainingManager(trainer, make_data(), resume_from=3)
    with pytest.raises(ValueError, match="training checkpoint file .*nothing.safetensors does not exist"):
        build(tmp_path, resume_from=str(tmp_path / "nothing.safetensors"))  # an explicit path stays strict
    with pytest.raises(TypeError, match="resume_strict must be a bool, got 'no'"):
        TrainingManager(trainer, make_data(), resume_strict="no")
    with pytest.raises(ValueError, match="not a complete training checkpoint: it has no .epoch., .batch_step."):
        build(tmp_path, resume_from={"weights": 1})


def test_mismatching_states_name_the_file(tmp_path):
    first, *_ = build(tmp_path, stop_at=2)
    first.start_training()
    path = str(tmp_path / "model-training-checkpoint.safetensors")
    state = NumpyCheckpointSaver().load(path)
    manager, *_ = build(tmp_path / "other", data=make_data(seed=6))
    with pytest.raises(
        ValueError, match=r"model-training-checkpoint.safetensors: the training data order differs.*seed: 5"
    ):
        manager.set_state(state)
    trainer, _ = make_trainer()
    other = TrainingManager(trainer, make_data(), num_batches_per_epoch=2, callbacks=manager.callbacks[:0])
    with pytest.raises(ValueError, match="does not match the callbacks"):
        other.set_state(state)
    state["callbacks"] = {}
    with pytest.raises(ValueError, match="num_batches_per_epoch=4, this manager has 2"):
        other.set_state(state)
    manager, *_ = build(tmp_path / "mode", metric_opt_mode="max")
    with pytest.raises(ValueError, match="metric_opt_mode is 'min'"):
        manager.set_state(NumpyCheckpointSaver().load(path))


def test_sigint_writes_the_training_checkpoint_then_raises_keyboard_interrupt(tmp_path):
    class Interrupt(Callback):
        def on_batch_training_start(self, training_batch, logs):
            if logs["current"]["global_iter"] == 2:
                signal.raise_signal(signal.SIGINT)

    trainer, _ = make_trainer()
    checkpoint_manager = CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None)
    manager = TrainingManager(trainer, make_data(), num_epochs=3, callbacks=[Interrupt(), checkpoint_manager])
    with pytest.raises(KeyboardInterrupt):
        manager.start_training()
    state = NumpyCheckpointSaver().load(checkpoint_manager.training_checkpoint_path, kind="training")
    assert (state["epoch"], state["batch_step"], state["global_iter"]) == (0, 3, 3)


def test_resume_from_a_checkpoint_written_before_the_epoch_end_hooks_runs_them(tmp_path):
    """A batch-level checkpoint of the last batch of an epoch resumes with that epoch's on_epoch_completed."""
    random.seed(1), np.random.seed(1)
    straight, straight_model, straight_draws, _ = build(tmp_path / "straight", num_epochs=2)
    straight.start_training()

    copy_path = tmp_path / "copy-training-checkpoint.safetensors"
    epochs_completed = []

    class Probe(Callback):
        """Copies the training checkpoint written at the last batch of epoch 0 (before the epoch end hooks)."""

        def on_batch_checkpoint(self, logs):  # after the CheckpointManager wrote this batch's checkpoint
            if logs["current"]["global_iter"] == NUM_BATCHES - 1:
                copy_path.write_bytes((tmp_path / "first" / "model-training-checkpoint.safetensors").read_bytes())
                self.training_manager.stop_training()

        def on_epoch_completed(self, logs):
            epochs_completed.append(logs["epoch"])

    random.seed(1), np.random.seed(1)
    first, _, first_draws, _ = build(
        tmp_path / "first", num_epochs=2, write_in_background=False, extra_callbacks=[Probe("Probe")]
    )
    first.start_training()
    state = NumpyCheckpointSaver().load(str(copy_path), kind="training")
    assert (state["epoch"], state["batch_step"], state["global_iter"]) == (0, NUM_BATCHES, NUM_BATCHES)

    random.seed(5), np.random.seed(5)
    second, model, second_draws, _ = build(tmp_path / "second", num_epochs=2, extra_callbacks=[Probe("Probe")])
    epochs_completed.clear()
    second.set_state(state)
    second.start_training()
    assert epochs_completed == [0, 1]  # epoch 0's end hooks ran in the resumed run
    assert first_draws.values[: NUM_BATCHES + 1] + second_draws.values == straight_draws.values  # + epoch 0 start
    assert (model.w, model.b) == (straight_model.w, straight_model.b)


class FailingOnceSaver(NumpyCheckpointSaver):
    """Its first save raises OSError (a full disk, say); later saves work."""

    def __init__(self):
        super().__init__()
        self.failures_left = 1

    def save(self, checkpoint, path):
        if self.failures_left:
            self.failures_left -= 1
            raise OSError("No space left on device (injected)")
        super().save(checkpoint, path)


def _manager_with_saver(directory, saver, create_checkpoint_every, extra_callbacks=()):
    trainer, _ = make_trainer()
    checkpoint_manager = CheckpointManager(
        saver,
        checkpoints_path=str(directory),
        metric_to_monitor=None,
        batch_level=True,
        create_checkpoint_every=create_checkpoint_every,
        write_in_background=True,
    )
    callbacks = [TrainingMetricsLogger(MetricEvaluator(trainer=trainer)), checkpoint_manager, *extra_callbacks]
    return TrainingManager(trainer, make_data(), num_epochs=2, callbacks=callbacks), checkpoint_manager


def test_emergency_checkpoint_is_written_even_after_a_failed_background_write(tmp_path):
    class FailAtThirdBatch(Callback):
        def on_batch_training_completed(self, training_batch, logs):
            if logs["current"]["global_iter"] == 2:  # after the failed write of batch 1, before the next write
                raise FloatingPointError("step blew up")

    manager, checkpoint_manager = _manager_with_saver(tmp_path, FailingOnceSaver(), 2, [FailAtThirdBatch()])
    with pytest.raises(FloatingPointError, match="step blew up"):
        manager.start_training()
    emergency = checkpoint_manager.file_names.emergency_training
    assert NumpyCheckpointSaver().load(emergency, kind="training")["global_iter"] == 3


def test_failed_last_background_write_is_reported_after_the_final_checkpoint_is_written(tmp_path):
    manager, checkpoint_manager = _manager_with_saver(tmp_path, FailingOnceSaver(), 2 * NUM_BATCHES)
    with pytest.raises(OSError, match="No space left on device"):
        manager.start_training()  # the only periodic write (after the last batch) fails in the background
    # Where the failure is seen depends on when the writer thread fails: at the epoch's checkpoint phase (the next
    # boundary: the failure path writes the emergency training checkpoint) or at the end of training (the training
    # checkpoint is written, then the error raised). Either way a checkpoint of the final state is on disk.
    names = checkpoint_manager.file_names
    path = names.emergency_training if os.path.exists(names.emergency_training) else names.training
    final = NumpyCheckpointSaver().load(path, kind="training")
    assert (final["epoch"], final["global_iter"]) == (2, 2 * NUM_BATCHES)


def test_callbacks_anywhere_in_the_list_are_checkpointed_at_the_same_step_and_see_is_best(tmp_path):
    trainer, _ = make_trainer()
    before, after = CountBatches("before"), CountBatches("after")
    saved = []

    class ReadCheckpoint(Callback):
        def on_batch_checkpoint(self, logs):
            state = NumpyCheckpointSaver().load(checkpoint_manager.training_checkpoint_path, kind="training")
            saved.append((state["global_iter"], state["callbacks"]["before"], state["callbacks"]["after"]))

    checkpoint_manager = CheckpointManager(
        NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor="training.batch.loss", batch_level=True,
        write_in_background=False,
    )  # fmt: skip
    callbacks = [before, checkpoint_manager, after, TrainingMetricsLogger(MetricEvaluator(trainer=trainer))]
    TrainingManager(trainer, make_data(), num_epochs=2, callbacks=callbacks + [ReadCheckpoint()]).start_training()
    assert saved == [(i, {"count": i}, {"count": i}) for i in range(1, 2 * NUM_BATCHES + 1)]
    improvements = before.improvements()
    assert before.saw_best == after.saw_best == improvements and len(improvements) > 1
    assert improvements[-1] == checkpoint_manager.best_global_iter


def test_an_improvement_decided_before_a_failing_hook_still_writes_the_best_model(tmp_path):
    """The best model of a batch is written in its checkpoint phase; when a later hook of that batch raises, the
    phase never comes, so the end phase writes it (else logs["best"] would name weights that no file holds).
    Broken on purpose (the end phase ignoring the pending decision), no best file exists and this test fails."""

    class FailAtFirstBatch(Callback):
        def on_batch_training_completed(self, training_batch, logs):
            raise RuntimeError("injected failure after the best-model decision")

    trainer, model = make_trainer()
    checkpoint_manager = CheckpointManager(
        NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor="training.batch.loss", batch_level=True
    )
    callbacks = [FailAtFirstBatch(), TrainingMetricsLogger(MetricEvaluator(trainer=trainer)), checkpoint_manager]
    manager = TrainingManager(trainer, make_data(), num_epochs=1, callbacks=callbacks)
    with pytest.raises(RuntimeError, match="injected failure"):
        manager.start_training()
    assert checkpoint_manager.best_global_iter == 0  # the first value is always an improvement
    best = NumpyCheckpointSaver().load(checkpoint_manager.file_names.best_model, kind="model")
    assert best["progress"]["global_iter"] == 0 and best["logs"]["is_best"] is True
    assert best["model_components"]["model"] == {"w": model.w, "b": model.b}  # the weights after that step


def test_own_temporary_files_are_removed_when_training_ends(tmp_path):
    leftover = tmp_path / f".mlpug.tmp-{os.getpid()}" / ".tmpXyZ789"
    manager, _, _, _ = build(tmp_path, num_epochs=1)
    leftover.parent.mkdir()
    leftover.write_bytes(b"what a write of this process left half-way")
    manager.start_training()
    assert not leftover.exists() and not leftover.parent.exists()
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_listed_archives_that_do_not_exist_are_dropped_at_resume_with_a_warning(tmp_path, caplog):
    import logging

    first, _, _, checkpoint_manager = build(tmp_path, num_epochs=1, archive_last_model_checkpoint_every=1)
    first.start_training()
    state = NumpyCheckpointSaver().load(checkpoint_manager.training_checkpoint_path, kind="training")
    listed = state["callbacks"]["CheckpointManager"]["archived"]
    os.remove(os.path.join(tmp_path, listed[-1]))  # e.g. a set whose archive never got written
    second, _, _, resumed = build(tmp_path, num_epochs=2, archive_last_model_checkpoint_every=1)
    logging.getLogger("mlpug").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="mlpug"):
            second.set_state(state)
    finally:
        logging.getLogger("mlpug").propagate = False
    assert resumed.archived == listed[:-1]
    assert f"lists archived model checkpoints that do not exist in {tmp_path}: ['{listed[-1]}']" in caplog.text


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_validation_dataset_fails_at_logger_construction(empty):
    """Broken on purpose (no len() check in TestMetricsLogger), the empty set fails only at the first epoch end."""
    trainer, _ = make_trainer()
    with pytest.raises(ValueError, match=r"the 'validation' dataset is empty \((list|tuple) of len\(\) 0\)"):
        TestMetricsLogger(empty, "validation", MetricEvaluator(trainer=trainer))


def test_a_training_params_metric_is_checked_and_read_after_the_training_logger(tmp_path):
    """The TrainingMetricsLogger declares (and produces) training_params.window_average.duration, so a
    CheckpointManager placed before it and monitoring it passes the construction check and reads it. Broken on
    purpose (produces only {"training"}), the CheckpointManager reads it first: KeyError, this test fails."""
    trainer, _ = make_trainer()
    checkpoint_manager = CheckpointManager(
        NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor="training_params.window_average.duration",
        batch_level=True,
    )  # fmt: skip
    callbacks = [checkpoint_manager, TrainingMetricsLogger(MetricEvaluator(trainer=trainer))]
    TrainingManager(trainer, make_data(), num_epochs=1, callbacks=callbacks).start_training()
    assert checkpoint_manager.best_value is not None


@pytest.mark.parametrize(
    "version,match",
    [
        ("2", r"is corrupt: its header's format_version is '2' \(str\), not an int such as 2"),
        (2.0, r"is corrupt: its header's format_version is 2.0 \(float\), not an int such as 2"),
        (True, r"is corrupt: its header's format_version is True \(bool\)"),
        (1, r"has checkpoint format version 1; this mlpug \(.*\) reads only version 2"),
        (3, r"has checkpoint format version 3, newer than this mlpug"),
    ],
)
def test_bad_format_version_in_the_header_names_the_file_and_the_field(tmp_path, version, match):
    """Broken on purpose (the version check as before), a str or float version is called "newer ...; upgrade mlpug"
    and True or 1 loads: this test fails."""
    header = make_header("model", "numpy")
    header["format_version"] = version
    path = str(tmp_path / "model.safetensors")
    NumpyCheckpointSaver().save({"mlpug": header, "model_components": {}}, path)
    with pytest.raises(CheckpointError, match=f"{path} {match}"):
        NumpyCheckpointSaver().load(path)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda state: state.pop("epoch"), r" is not a complete training checkpoint: it has no 'epoch' \(it has \["),
        (lambda state: state.update(global_iter="3"), r": the training state's global_iter is '3', not an int >= 0"),
        (lambda state: state.update(callbacks=[]), r": the training state's callbacks is a list, not a dict"),
    ],
)
def test_training_checkpoint_without_a_needed_field_fails_when_loaded(tmp_path, change, match):
    """Broken on purpose (no check_training_state in CheckpointSaver.load), the file loads and resuming fails later
    (KeyError: 'epoch', or a TypeError in the loop): this test fails."""
    first, *_ = build(tmp_path, stop_at=2)
    first.start_training()
    path = str(tmp_path / "model-training-checkpoint.safetensors")
    state = NumpyCheckpointSaver().load(path, kind="training")
    change(state)
    NumpyCheckpointSaver().save(state, path)
    with pytest.raises(CheckpointError, match=f"checkpoint file {path}{match}"):
        NumpyCheckpointSaver().load(path, kind="training")
    with pytest.raises(CheckpointError, match="the resume_from dict \\(load one with mlp.load_training_checkpoint"):
        build(tmp_path / "other", resume_from={key: value for key, value in state.items() if key != "mlpug"})


def test_resume_from_latest_without_a_checkpoint_starts_fresh_with_one_info_line(tmp_path, caplog):
    """A restart loop's first start. Broken on purpose (resolve_training_checkpoint raising for a missing "latest",
    as before), construction raises "does not exist": this test fails."""
    straight, straight_model, *_ = build(tmp_path / "straight", num_epochs=1)
    straight.start_training()
    with caplog.at_level(logging.INFO, logger="mlpug"):
        manager, model, *_ = build(tmp_path / "fresh", resume_from="latest", num_epochs=1)
        manager.start_training()
    fresh = [record.getMessage() for record in caplog.records if "resume_from='latest'" in record.getMessage()]
    assert len(fresh) == 1 and "no training checkpoint" in fresh[0] and "starts from the beginning" in fresh[0]
    assert (model.w, model.b) == (straight_model.w, straight_model.b)
    resumed, *_ = build(tmp_path / "fresh", resume_from="latest", num_epochs=2)  # the next restart resumes
    resumed.start_training()
    assert resumed.global_iter == 2 * NUM_BATCHES


def test_non_strict_resume_starts_added_callbacks_fresh_and_ignores_dropped_ones(tmp_path, caplog):
    """Broken on purpose (set_state without resume_strict, as before), the added and dropped callbacks are an
    error: this test fails. The default stays strict."""
    first, *_ = build(tmp_path, stop_at=2, extra_callbacks=[CountBatches("dropped")])
    first.start_training()
    with pytest.raises(ValueError, match=r"\['added', 'dropped'\] present on only one side.*resume_strict=False"):
        build(tmp_path, resume_from="latest", extra_callbacks=[CountBatches("added")])[0].start_training()
    added = CountBatches("added")
    manager, *_ = build(tmp_path, resume_from="latest", extra_callbacks=[added], resume_strict=False)
    with caplog.at_level(logging.WARNING, logger="mlpug"):
        manager.start_training()
    warnings = [record.getMessage() for record in caplog.records if "resume_strict=False" in record.getMessage()]
    assert len(warnings) == 1
    assert "start fresh (not in the checkpoint): ['added']" in warnings[0]
    assert "ignored (no such callback): ['dropped']" in warnings[0]
    assert added.count == 3 * NUM_BATCHES - 3  # fresh: counted only the batches after the checkpoint
    assert manager.global_iter == 3 * NUM_BATCHES


def test_a_save_fsyncs_the_file_then_renames_it_then_fsyncs_the_directory(tmp_path, monkeypatch):
    """The crash-safety promise rests on this order (README: "every write is fsync'ed and atomically renamed").
    Broken on purpose (the os.fsync calls of mlpug/checkpointing/files.py removed), the event list has no fsyncs."""
    import mlpug.checkpointing.files as files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", source, target))
        real_replace(source, target)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    path = str(tmp_path / "model-training-checkpoint.safetensors")
    NumpyCheckpointSaver().save({"mlpug": make_header("model", "numpy"), "x": np.ones(3)}, path)
    temporary = files.temporary_path(path)
    assert events == [("fsync", temporary), ("replace", temporary, path), ("fsync", str(tmp_path))]


# ----- failed background writes, unwritable directories, counters, metric names (issue 25) -----
class _CaptureMlpugLogs(logging.Handler):
    """The records of the ``mlpug`` loggers (which do not propagate), in order, while installed."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        logging.getLogger("mlpug").addHandler(self)
        return self

    def __exit__(self, *exc_info):
        logging.getLogger("mlpug").removeHandler(self)

    def errors(self):
        return [record for record in self.records if record.levelno >= logging.ERROR]


class FullDiskOnceSaver(NumpyCheckpointSaver):
    """Writing the first file whose name holds ``fail_on`` fails as on a full disk (OSError ENOSPC)."""

    def __init__(self, fail_on="training-checkpoint"):
        super().__init__()
        self.fail_on, self.failed = fail_on, 0

    def save_arrays(self, arrays, metadata, path):
        if self.fail_on in os.path.basename(path) and not self.failed:
            self.failed += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        super().save_arrays(arrays, metadata, path)


def _join_the_writer_thread():
    """Wait until the background writer thread (of whatever mlpug version) has finished its job."""
    for thread in threading.enumerate():
        if thread.name == "mlpug-checkpoint-writer":
            thread.join(timeout=30)


def test_a_failed_background_write_is_logged_at_once_and_raised_at_the_next_batch_boundary(tmp_path):
    """Issue 25 item 5: the epoch-0 training checkpoint cannot be written (full disk). The failure is logged when it
    happens (ERROR, naming the file and the period), and raised at the first batch boundary after it, with a note
    naming the period that failed to write; the emergency checkpoint is written. Broken on purpose (the old writer:
    error kept until the next write), nothing is logged until the end of epoch 1, where the error is raised after a
    whole epoch trained on top of it, named as a failure "at the end of epoch 1": this test fails."""
    logs_when_training_went_on = []

    class WaitForTheFailedWrite(Callback):
        def on_batch_training_start(self, training_batch, logs):
            if logs["current"]["global_iter"] == NUM_BATCHES:  # the first batch after the epoch-0 write
                _join_the_writer_thread()
                logs_when_training_went_on.extend(capture.errors())

    trainer, _ = make_trainer()
    checkpoint_manager = CheckpointManager(FullDiskOnceSaver(), str(tmp_path), metric_to_monitor=None)
    callbacks = [TrainingMetricsLogger(MetricEvaluator(trainer=trainer)), checkpoint_manager, WaitForTheFailedWrite()]
    manager = TrainingManager(trainer, make_data(), num_epochs=3, callbacks=callbacks)
    training_file = checkpoint_manager.file_names.training
    with _CaptureMlpugLogs() as capture, pytest.raises(CheckpointWriteError) as raised:
        manager.start_training()
    assert raised.value.errno == errno.ENOSPC and raised.value.path == training_file
    assert manager.global_iter == NUM_BATCHES + 1  # raised after the one batch in progress, not a whole epoch later
    period = f"the end of epoch 0 (global iteration {NUM_BATCHES - 1})"
    assert f"mlpug: raised by the background write of {training_file}, the checkpoint of {period}" in (
        raised.value.__notes__
    )
    assert len(logs_when_training_went_on) == 1  # logged before training went on, once
    message = logs_when_training_went_on[0].getMessage()
    assert f"Writing the checkpoint of {period} failed in the background ({training_file})" in message
    assert "no space left on device" in message
    assert [record.getMessage() for record in capture.errors()].count(message) == 1  # not logged a second time
    emergency = NumpyCheckpointSaver().load(checkpoint_manager.file_names.emergency_training, kind="training")
    assert (emergency["epoch"], emergency["batch_step"], emergency["global_iter"]) == (1, 1, NUM_BATCHES + 1)


def test_a_failed_background_write_at_batch_level_names_the_batch(tmp_path):
    """Batch-level periods every 2 batches: the write after batch 1 fails and is raised after batch 2, the note
    naming batch 1. Broken on purpose (the old writer), it is raised at the next write (after batch 3) and names no
    period: this test fails."""

    class WaitForTheFailedWrite(Callback):
        def on_batch_training_start(self, training_batch, logs):
            if logs["current"]["global_iter"] == 2:
                _join_the_writer_thread()

    manager, checkpoint_manager = _manager_with_saver(tmp_path, FullDiskOnceSaver(), 2, [WaitForTheFailedWrite()])
    with pytest.raises(CheckpointWriteError) as raised:
        manager.start_training()
    assert manager.global_iter == 3
    notes = raised.value.__notes__
    assert any("the checkpoint of epoch 0, batch step 1 (global iteration 1)" in note for note in notes)


def test_a_failed_background_best_model_write_of_an_asynchronous_result_is_logged_at_once_naming_it(tmp_path):
    """Asynchronous validation: the best model checkpoint of the epoch-0 weights, written in the background where
    their result lands, cannot be written (full disk). Like every other background write, the failure is logged
    when it happens (ERROR, naming the file and the evaluated weights' period) and the raised error has a note
    naming them. Broken on purpose (the best-of write submitted without ``on_error``), no such line is logged and no
    note names the file: this test fails."""
    trainer, _ = make_trainer()
    checkpoint_manager = CheckpointManager(FullDiskOnceSaver(fail_on="best-model"), str(tmp_path))
    callbacks = [
        TrainingMetricsLogger(MetricEvaluator(trainer=trainer)),
        TestMetricsLogger(make_data(seed=1), "validation", MetricEvaluator(trainer=trainer), run_async=True),
        checkpoint_manager,
    ]
    manager = TrainingManager(trainer, make_data(), num_epochs=3, callbacks=callbacks)
    best_file = checkpoint_manager.file_names.best_model
    with _CaptureMlpugLogs() as capture, pytest.raises(CheckpointWriteError) as raised:
        manager.start_training()
    assert raised.value.errno == errno.ENOSPC and raised.value.path == best_file
    period = f"the end of epoch 0 (global iteration {NUM_BATCHES - 1})"  # of the evaluated weights
    assert f"mlpug: raised by the background write of {best_file}, the checkpoint of {period}" in (
        raised.value.__notes__
    )
    messages = [record.getMessage() for record in capture.errors()]
    failed = [m for m in messages if f"Writing the checkpoint of {period} failed in the background ({best_file})" in m]
    assert len(failed) == 1 and "no space left on device" in failed[0]
    assert messages.index(failed[0]) < next(i for i, m in enumerate(messages) if "emergency" in m)  # logged at once
    assert checkpoint_manager.files.last_saved_position is not None  # the training checkpoint written before stays good


def test_the_batch_boundary_check_of_a_failed_write_reads_one_attribute(tmp_path):
    """The check that runs at every batch boundary is a plain attribute read (no lock, no call, no wait)."""
    checkpoint_manager = CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=None)
    assert checkpoint_manager.files.writer.failed is False
    checkpoint_manager.files.writer.submit(lambda: None)
    checkpoint_manager.files.writer.wait()
    assert "failed" in vars(checkpoint_manager.files.writer)  # an instance attribute, not a property


class OtherRankContext(SerialContext):
    """Rank 1 of a world of 2 (only what constructing a TrainingManager reads)."""

    rank, world_size = 1, 2


@pytest.mark.parametrize("missing", [False, True], ids=["existing", "to_be_created"])
def test_a_checkpoints_path_that_cannot_be_written_fails_at_training_manager_construction_on_the_primary(
    tmp_path, monkeypatch, missing
):
    """Issue 25 item 8: an unwritable directory (no permission, a read-only file system; simulated with os.access, as
    the tests run as root) fails when the TrainingManager is constructed (before training), on the primary rank,
    naming checkpoints_path and the directory. Another rank never writes, so it does not refuse: a multi-node job
    whose disk is writable only where rank 0 runs trains. Broken on purpose: without the access check, construction
    passes and training fails in on_training_start; with the check at the CheckpointManager's construction (on every
    rank), rank 1 refuses too: this test fails."""
    unwritable = tmp_path / "read-only"
    unwritable.mkdir()
    real_access = os.access

    def access(path, mode, **kwargs):
        if os.path.abspath(path) == str(unwritable) and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    path = str(unwritable / "run-1") if missing else str(unwritable)
    where = f"would be created in {unwritable}, a directory" if missing else "is a directory"
    trainer, _ = make_trainer()

    def manager(checkpoints_path, distributed=None):
        checkpoint_manager = CheckpointManager(NumpyCheckpointSaver(), checkpoints_path, metric_to_monitor=None)
        return TrainingManager(trainer, make_data(), callbacks=[checkpoint_manager], distributed=distributed)

    with pytest.raises(ValueError, match=f"checkpoints_path '{path}' {where} that this process cannot write to"):
        manager(path)
    manager(str(tmp_path / "writable"))
    try:
        manager(path, distributed=OtherRankContext())  # rank 1 writes no file: it does not check
    finally:
        mlpug_logging.set_rank(0, 1)


def test_a_failed_emergency_checkpoint_is_one_line_and_the_original_error_is_raised(tmp_path):
    """Issue 25 item 8: the step fails, and the emergency checkpoint into the same (full) directory fails too: one
    ERROR line says so, without a traceback, and the step's error is raised. Broken on purpose (the emergency write
    unguarded), the hook's error is logged with its whole traceback: this test fails."""
    trainer, _ = make_trainer(fail_at_call=2)
    checkpoint_manager = CheckpointManager(
        FullDiskOnceSaver(fail_on="emergency"), str(tmp_path), metric_to_monitor=None, batch_level=True
    )
    manager = TrainingManager(trainer, make_data(), num_epochs=1, callbacks=[checkpoint_manager])
    with _CaptureMlpugLogs() as capture, pytest.raises(FloatingPointError):
        manager.start_training()
    assert not [record for record in capture.records if record.exc_info]  # no traceback buries the error
    emergency = checkpoint_manager.file_names.emergency_training
    lines = [record.getMessage() for record in capture.errors() if "could not be written" in record.getMessage()]
    assert lines == [
        "The emergency training checkpoint could not be written either: CheckpointWriteError: [Errno 28] cannot write "
        f"checkpoint file {emergency}: no space left on device; free disk space, or give a checkpoints_path on "
        "another disk (the file at that path is unchanged)"
    ]


def test_a_training_state_with_inconsistent_counters_fails_to_resume_and_keeps_the_good_checkpoint(tmp_path):
    """Issue 25 item 8: a valid file whose counters do not fit together (epoch 10**9, global_iter 8) is refused by
    resume, naming the file and the values, and the good training checkpoint stays. Broken on purpose (no
    check_counters in set_state), the resume trains 0 batches, ends "All good" and overwrites the good training
    checkpoint: this test fails."""
    first, *_ = build(tmp_path, num_epochs=1)
    first.start_training()
    good = tmp_path / "model-training-checkpoint.safetensors"
    state = NumpyCheckpointSaver().load(str(good), kind="training")
    state.update(epoch=10**9, global_iter=8)
    bad = str(tmp_path / "edited-training-checkpoint.safetensors")
    NumpyCheckpointSaver().save(state, bad)
    good_bytes = good.read_bytes()
    manager, *_ = build(tmp_path, num_epochs=3, resume_from=bad)
    with pytest.raises(
        ValueError,
        match=f"{bad}: the training state's counters do not fit together: epoch=1000000000, batch_step=0, "
        "global_iter=8: epoch 1000000000 is past the last epoch of this run \\(num_epochs=3, ",
    ):
        manager.start_training()
    assert good.read_bytes() == good_bytes


def test_a_keras_name_or_a_typo_of_the_monitored_metric_gets_a_suggestion(tmp_path):
    """Issue 25 item 8: val_loss (the Keras name) and a typo get "Did you mean 'validation.dataset.loss'?" next to the
    list of paths. Broken on purpose (no did_you_mean in check_log_path), only the list: this test fails."""
    trainer, _ = make_trainer()
    for metric in ("val_loss", "validation.dataset.los", "valdation.dataset.loss"):
        callbacks = [
            TrainingMetricsLogger(MetricEvaluator(trainer=trainer)),
            TestMetricsLogger(make_data(), "validation", MetricEvaluator(trainer=trainer)),
            CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor=metric),
        ]
        with pytest.raises(
            ValueError, match=f"metric_to_monitor '{metric}' is not written .* Did you mean 'validation.dataset.loss'"
        ):
            TrainingManager(trainer, make_data(), callbacks=callbacks)
    callbacks = [
        TrainingMetricsLogger(MetricEvaluator(trainer=trainer)),
        CheckpointManager(NumpyCheckpointSaver(), str(tmp_path), metric_to_monitor="loss"),
    ]
    with pytest.raises(ValueError, match="Did you mean 'training.window_average.loss' or 'training.batch.loss'\\?"):
        TrainingManager(trainer, make_data(), callbacks=callbacks)
