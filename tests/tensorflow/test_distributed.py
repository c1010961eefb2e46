"""Data-parallel training on ``tf.distribute``: ``MirroredStrategy`` on 2 logical CPU devices and
``MultiWorkerMirroredStrategy`` on 2 local workers (loopback address, bounded time-outs), compiled.

Every run is a real process (``tests/tensorflow/strategy_worker.py``): TensorFlow's devices and ``TF_CONFIG`` are
fixed per process. The reference is the same worker function on one device with the same global batch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp
from mlpug.distributed import free_ports
from mlpug.trainers.strategy import SingleProcess
from tests.tensorflow import strategy_worker

WORKER = str(Path(__file__).with_name("strategy_worker.py"))
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def run_processes(*args: str, num_workers: int = 1, timeout_s: float = TIMEOUT_S) -> list[tuple[int, str, float]]:
    """Start the worker script ``num_workers`` times (with a ``TF_CONFIG`` of that many workers when more than
    one); per process (exit status, output, seconds to exit). A process still running after ``timeout_s`` is
    killed and the test fails."""
    addresses = [f"localhost:{port}" for port in free_ports(num_workers)]
    start = time.monotonic()
    processes = []
    for index in range(num_workers):
        environment = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
        if num_workers > 1:
            environment["TF_CONFIG"] = json.dumps(
                {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            )
        processes.append(
            subprocess.Popen(
                [sys.executable, WORKER, *args], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )
        )  # fmt: skip
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(timeout_s - (time.monotonic() - start), 1))
            results.append((process.returncode, output, time.monotonic() - start))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        outputs = [process.communicate()[0] for process in processes]
        pytest.fail(f"a process did not end within {timeout_s} s:\n" + "\n".join(outputs))
    return results


def _assert_ok(results):
    for index, (code, output, _) in enumerate(results):
        assert code == 0, f"process {index} exited with {code}:\n{output[-6000:]}"


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    """Per kind (single, mirrored, multi_worker), per process: the results of every variant."""
    out = tmp_path_factory.mktemp("tf-distributed-equivalence")
    _assert_ok(run_processes("equivalence", "single", str(out)))
    _assert_ok(run_processes("equivalence", "mirrored", str(out)))
    _assert_ok(run_processes("equivalence", "multi_worker", str(out), num_workers=2))
    return {
        kind: [json.loads((out / f"{kind}-rank{rank}.json").read_text()) for rank in range(count)]
        for kind, count in (("single", 1), ("mirrored", 1), ("multi_worker", 2))
    }


# float32: the replicas' weighted gradients summed against one gradient of 16 samples: rounding only.
# bfloat16 autocast: matmuls in bfloat16 over 8 against 16 rows, so the tolerance is bfloat16's (8 bits of mantissa).
TOLERANCES = {
    "plain": 1e-5,
    "tf_data": 1e-5,
    "accumulation": 1e-5,
    "bf16": 2e-2,
    "skip_non_finite": 1e-5,
    "uneven": 1e-5,
    "clipping": 1e-5,
    "steps_per_execution": 1e-5,
    "keras_loss": 1e-5,
    "keras_loss_sum_over_batch": 1e-5,
    "keras_loss_first_batch_nan": 1e-5,
    "keras_loss_in_scope": 1e-5,
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("kind", "variant"),
    [
        (kind, variant)
        for kind in ("mirrored", "multi_worker")
        for variant in strategy_worker.EQUIVALENCE_VARIANTS
        if kind == "mirrored" or variant not in strategy_worker.MIRRORED_ONLY  # workers pad the last global batch
    ],
)
def test_a_strategy_trains_as_one_device_with_the_same_global_batch(equivalence_runs, kind, variant):
    """2 replicas (2 logical CPU devices, or 2 worker processes of 8 samples each) against one device with the
    global batch of 16, compiled: the same weights and logged batch losses (tolerance above), on every worker
    the same values. Breaks when the replicas' gradients are summed unweighted (2x the step), weighted 1/2 instead
    of by their rows (``uneven``: a last batch of 5 split 2 + 3), when a worker trains on all the data, when the
    logged loss is one replica's, or when the skip of a non-finite batch (a NaN target on one worker) is decided
    per replica (the replicas' weights would differ, or a worker would wait in a collective). With 4 steps per call
    (``steps_per_execution``, the replicated step inside a ``tf.while_loop``) one device gives exactly the values
    of one step per call. With a Keras loss object (``keras_loss*``: ``tf.keras.losses.MeanSquaredError()``, also
    with chunks), which Keras 3 scales by 1 / replicas in a replica context, the same values: broke (weights and
    logged losses those of 1/2 the loss) while mlpug did not undo that scaling; ``keras_loss_first_batch_nan``: the
    probe of the first batch sees NaN (no verdict, the step is skipped), the second batch decides and the step is
    traced anew; ``keras_loss_in_scope``: trained and validated inside ``with strategy.scope():``, where Keras
    scales the loss object in the evaluation step too. With a Keras loss object the validation loss is the single
    device's too (it was 1/2 of it inside the scope)."""
    (single,) = equivalence_runs["single"]
    single = single[variant]
    if variant in strategy_worker.SKIPPING_VARIANTS:  # the NaN batch was logged and skipped, and the others trained
        assert sum(np.isnan(single["batch_losses"])) == 1
    if variant == "steps_per_execution":  # one device: 4 steps per call give what one step per call gives, bit for bit
        accumulation = equivalence_runs["single"][0]["accumulation"]
        assert (single["weights"], single["batch_losses"]) == (accumulation["weights"], accumulation["batch_losses"])
        assert single["validation"] == accumulation["validation"]  # evaluated 4 batches per call
    if variant == "clipping":  # the clipping was active: another model than without it
        assert not np.allclose(single["weights"][0], equivalence_runs["single"][0]["plain"]["weights"][0], atol=1e-3)
    tolerance = TOLERANCES[variant]
    runs = [run[variant] for run in equivalence_runs[kind]]
    for run in runs:
        assert run["num_batches_per_epoch"] == single["num_batches_per_epoch"] == (7 if variant == "uneven" else 6)
        for actual, expected in zip(run["weights"], single["weights"]):
            np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(run["batch_losses"], single["batch_losses"], rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(run["window_losses"], single["window_losses"], rtol=tolerance, atol=tolerance)
        if variant.startswith("keras_loss"):
            assert run["validation"]["loss"] == pytest.approx(single["validation"]["loss"], rel=1e-5)
    for run in runs[1:]:  # every worker holds and logs the same values
        assert run["weights"] == runs[0]["weights"]
        assert run["batch_losses"] == runs[0]["batch_losses"]
        assert run["validation"] == runs[0]["validation"]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["mirrored", "multi_worker"])
def test_asynchronous_validation_gives_the_synchronous_dataset_metrics_under_a_strategy(equivalence_runs, kind):
    """3 epochs validated over 10,001 samples every epoch: asynchronously (a snapshot evaluated on a worker thread,
    up to 2 pending; with 2 workers each evaluates its shard, worker 1 slower) the dataset metrics equal the
    synchronous ones exactly, on every worker, and every worker lands the same results at the same epoch ends."""
    runs = [results["async_validation"] for results in equivalence_runs[kind]]
    for run in runs:
        assert run["async"]["rows"] == run["sync"]["rows"]
        assert all(value is not None for row in run["async"]["rows"] for value in row)
        assert sum(run["async"]["landed"], []) == [0, 1, 2] and run["async"]["landed"][-1][-1] == 2
        assert run["sync"]["landed"] == [[0], [1], [2]]
    assert all(run == runs[0] for run in runs)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["mirrored", "multi_worker"])
def test_dataset_metrics_over_10001_samples_equal_the_single_device_values(equivalence_runs, kind):
    """10,001 validation samples (an odd count: one worker's shard is larger) evaluated with the trained weights:
    loss and MAE equal the single device's. Breaks when the workers' means are averaged (a mean of means: the
    shards have 5,001 and 5,000 samples) or a sample is counted twice (see the shard test below)."""
    for variant in ("plain", "accumulation"):
        expected = equivalence_runs["single"][0][variant]["validation"]
        for run in equivalence_runs[kind]:
            actual = run[variant]["validation"]
            # float32 batch means in another grouping: ~3e-8; a mean of the two shards' means: ~1e-6 (loss)
            assert actual["loss"] == pytest.approx(expected["loss"], rel=2e-7)
            assert actual["mae"] == pytest.approx(expected["mae"], rel=2e-7)


def _final(directory: Path) -> list[dict]:
    return [json.loads((directory / f"final-rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("tf-uninterrupted")
    _assert_ok(run_processes("train", "multi_worker", str(out), num_workers=2))
    return _final(out)


@pytest.mark.timeout(900)
def test_sigterm_on_one_worker_stops_every_worker_and_the_resumed_run_ends_as_an_uninterrupted_one(
    tmp_path, uninterrupted
):
    """SIGTERM reaches worker 1 only, after global iteration 5 of 24. The workers agree to stop after the same
    batch (otherwise worker 0 would wait in the next step's collective until the time-out): the worker's StopAt
    callback has a batch hook and declares no read points, so every batch is one; the flag goes into the collective
    of batch 6 and is read two batch boundaries later, before batch 8; worker 1 ends with 143,
    worker 0 stops early, the primary writes the training checkpoint that continues at batch 8. Resumed on 2
    workers, the final weights equal an uninterrupted 2-worker run (float32 rounding: the same computation, the
    collectives may sum in another order)."""
    results = run_processes(
        "train", "multi_worker", str(tmp_path), "--stop-at", "5", "--stop-how", "TERM", num_workers=2
    )
    (code0, output0, _), (code1, output1, _) = results
    assert code1 == 128 + signal.SIGTERM, output1[-3000:]
    assert code0 == 0, output0[-3000:]
    assert "Training stopped early" in output0 and "interrupted by signal SIGTERM" in output1
    checkpoint = mlp.load_training_checkpoint(str(tmp_path / "model-training-checkpoint.safetensors"))
    assert (checkpoint["epoch"], checkpoint["batch_step"], checkpoint["global_iter"]) == (0, 8, 8)
    _assert_ok(run_processes("train", "multi_worker", str(tmp_path), "--resume", num_workers=2))
    for final, expected in zip(_final(tmp_path), uninterrupted):
        assert final["global_iter"] == expected["global_iter"] == 24
        for actual, reference in zip(final["weights"], expected["weights"]):
            np.testing.assert_allclose(actual, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.timeout(300)
def test_when_one_worker_raises_every_worker_exits_within_the_bound(tmp_path):
    """Worker 1 raises at global iteration 3; worker 0, waiting in a collective, must not hang: both exit with an
    error within 120 s (the collectives' time-out of the worker script is 60 s), worker 1 reporting the error."""
    results = run_processes(
        "train", "multi_worker", str(tmp_path), "--stop-at", "3", "--stop-how", "RAISE", num_workers=2, timeout_s=120
    )
    assert all(code != 0 for code, _, _ in results), [output[-3000:] for _, output, _ in results]
    assert "fails on purpose at global iteration 3" in results[1][1]
    assert max(seconds for _, _, seconds in results) < 120


class EveryOtherBatch(SingleProcess):
    """A strategy written against the neutral protocol only: TensorFlow needs a tf.distribute strategy under it."""

    def training_dataset(self, dataset):
        return dataset[::2]


def test_a_strategy_of_another_kind_name_or_type_is_refused_at_construction():
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    optimizer = tf.keras.optimizers.SGD()
    with pytest.raises(TypeError, match="strategy must be None, 'single_process', a tf.distribute.MirroredStrategy"):
        mlp.trainers.DefaultTrainer(optimizer, model, strategy=3)
    with pytest.raises(ValueError, match=r"strategy 'mirrored' is not a TensorFlow strategy name .* create the "):
        mlp.trainers.DefaultTrainer(optimizer, model, strategy="mirrored")  # the model must be made in its scope
    with pytest.raises(TypeError, match="strategy is the class MirroredStrategy; pass an object"):
        mlp.trainers.DefaultTrainer(optimizer, model, strategy=tf.distribute.MirroredStrategy)
    with pytest.raises(TypeError, match="an mlpug Strategy that is not a TFDistributeStrategy: on TensorFlow"):
        mlp.trainers.DefaultTrainer(optimizer, model, strategy=EveryOtherBatch())
    with pytest.raises(NotImplementedError, match="OneDeviceStrategy; mlpug supports MirroredStrategy"):
        mlp.trainers.DefaultTrainer(optimizer, model, strategy=tf.distribute.OneDeviceStrategy("/cpu:0"))


def test_strategy_names_and_the_deprecated_argument_name(monkeypatch):
    """A ``TFDistributeStrategy`` over a ``MirroredStrategy`` is the trainer's strategy (its scope, its data);
    ``distribution_strategy=`` is the deprecated name of ``strategy`` (one DeprecationWarning per process; both at
    once is an error)."""
    from mlpug.tensorflow.strategies import TFDistributeStrategy
    from mlpug.tensorflow.trainers import trainer as trainer_module

    mirrored = TFDistributeStrategy(tf.distribute.MirroredStrategy(["/cpu:0"]))
    with mirrored.scope():
        model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
        optimizer = tf.keras.optimizers.SGD()
    trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=mirrored)
    assert trainer.strategy is mirrored and trainer.strategy.name == "mirrored"
    assert trainer.distributed_context().world_size == 1  # one worker, its replicas inside the step
    monkeypatch.setattr(trainer_module, "_warned_deprecated_arguments", set())
    with pytest.warns(DeprecationWarning, match=r"distribution_strategy=\.\.\.\) is deprecated; use strategy="):
        old = mlp.trainers.DefaultTrainer(optimizer, model, distribution_strategy=mirrored.tf_strategy)
    assert old.strategy.tf_strategy is mirrored.tf_strategy
    with pytest.raises(TypeError, match="give strategy only; distribution_strategy is its deprecated name"):
        mlp.trainers.DefaultTrainer(optimizer, model, strategy="mirrored", distribution_strategy=mirrored.tf_strategy)


def test_float16_loss_scaling_and_gradient_clipping_under_a_strategy_are_refused_at_construction():
    """Keras decides inf/nan (LossScaleOptimizer) and clips (clipnorm ...) per replica, before its all-reduce."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
        clipping = tf.keras.optimizers.SGD(clipnorm=1.0)
        plain = tf.keras.optimizers.SGD()
    with pytest.raises(NotImplementedError, match="optimizer 'optimizer' clips gradients \\(clipnorm=1.0\\)"):
        mlp.trainers.DefaultTrainer(clipping, model, strategy=strategy)
    with pytest.raises(NotImplementedError, match="autocast_dtype='float16' under a tf.distribute strategy"):
        mlp.trainers.DefaultTrainer(plain, model, strategy=strategy, use_mixed_precision=True, autocast_dtype="float16")


def test_variables_created_outside_the_strategy_scope_are_an_early_error():
    """A built model (or an optimizer) made outside ``strategy.scope()`` has plain variables that the replicas
    would not share: a ValueError at construction names the component and the variable."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    with strategy.scope():
        optimizer = tf.keras.optimizers.SGD()
    with pytest.raises(ValueError, match=r"model component 'model' has the variable .*kernel.* created outside"):
        mlp.trainers.DefaultTrainer(optimizer, model, strategy=strategy)
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"optimizer 'optimizer' has the variable .* created outside"):
        mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(), model, strategy=strategy)


def _return_value(value):
    return value


def test_launch_runs_in_this_process_for_one_worker_and_refuses_a_bad_count(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert mlp.distributed.launch(_return_value, 7, num_processes=1) == 7
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_processes must be an int >= 1"):
            mlp.distributed.launch(_return_value, 7, num_processes=bad)


def _worker_1_fails_first(marker_dir, how):
    """Worker 1 fails at once (killed by SIGKILL, or raising); worker 0 fails after it, as a worker whose
    collective lost its peer would."""
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    marker = Path(marker_dir) / "worker-1-failed"
    if index == 1:
        marker.touch()
        if how == "KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("worker 1 fails on purpose")
    while not marker.exists():
        time.sleep(0.05)
    time.sleep(0.5)
    raise RuntimeError("worker 0's collective lost its peer")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["KILL", "RAISE"])
def test_launch_names_the_worker_that_failed_first(tmp_path, monkeypatch, how):
    """Worker 1 fails first, worker 0 after it: the error names worker 1 (the lowest failed index named worker 0),
    and how worker 0 ended after it."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RuntimeError) as raised:
        mlp.distributed.launch(_worker_1_fails_first, str(tmp_path), how, num_processes=2, timeout_s=150)
    first = "was killed by signal 9" if how == "KILL" else "exited with code 1"
    assert str(raised.value).startswith(f"worker 1 of 2 {first}"), str(raised.value)
    assert "after it: worker 0 exited with code 1" in str(raised.value)


def test_evaluation_shards_hold_every_sample_exactly_once():
    """The shards the trainer evaluates on two workers: array batches split by sample (5,001 + 5,000 of 10,001,
    unpadded), tf.data pipelines by batch; together every sample once."""
    from mlpug.distributed import DistributedContext
    from mlpug.tensorflow.distributed import shard_evaluation_dataset

    def context(rank):
        shard_context = DistributedContext()
        shard_context.rank, shard_context.world_size = rank, 2
        return shard_context

    samples = np.arange(strategy_worker.VALIDATION_SAMPLES)
    arrays = mlp.data.ResumableArrayBatches((samples,), 1000, shuffle=False)
    batches = [shard_evaluation_dataset(arrays, context(rank)) for rank in (0, 1)]
    shards = [np.concatenate([batch[0].numpy() for batch in shard]) for shard in batches]
    assert (len(shards[0]), len(shards[1])) == (5001, 5000)
    assert sorted(np.concatenate(shards).tolist()) == samples.tolist()
    pipeline = tf.data.Dataset.from_tensor_slices(samples).batch(1000)
    shards = [
        np.concatenate(list(shard_evaluation_dataset(pipeline, context(rank)).as_numpy_iterator())) for rank in (0, 1)
    ]
    assert sorted(np.concatenate(shards).tolist()) == samples.tolist()


@pytest.mark.timeout(600)
def test_a_loss_that_mixes_a_keras_loss_object_and_a_hand_written_mean_is_an_error_on_every_worker(tmp_path):
    """A Keras loss object (scaled by 1 / replicas in a replica context) plus a ``tf.reduce_mean`` term (not scaled)
    cannot be turned into the replica's mean: a ValueError before the first optimizer step, on every worker (none
    waits in a collective), that gives the values and says what to write. Trained silently with the wrong loss
    before."""
    _assert_ok(run_processes("mixed_loss", "mirrored", str(tmp_path)))
    _assert_ok(run_processes("mixed_loss", "multi_worker", str(tmp_path), num_workers=2))
    for name, count in (("mirrored", 1), ("multi_worker", 2)):
        for rank in range(count):
            result = json.loads((tmp_path / f"mixed-{name}-rank{rank}.json").read_text())
            assert result["iterations"] == 0
            error = result["error"]
            strategy = "MirroredStrategy" if name == "mirrored" else "MultiWorkerMirroredStrategy"
            assert error.startswith(f"Under the {strategy} (2 replicas in sync) the training model's loss"), error
            assert f"{count} in another ratio" in error and "reduction=None" in error and "tf.reduce_mean" in error


GUIDE = ROOT / "docs" / "guide" / "distributed.md"


@pytest.mark.timeout(300)
def test_the_guide_example_logs_the_training_loss_of_one_device(tmp_path):
    """The TensorFlow example of ``docs/guide/distributed.md`` (a ``SparseCategoricalCrossentropy`` loss object
    under a MirroredStrategy of 2 CPU devices, Adam), run as written and then once more with TensorFlow's default
    strategy (one device): ``LogProgress`` prints the same training and validation losses. Broke while Keras' 1 /
    replicas scaling of the loss object was not undone (the strategy's training losses were half the others)."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    (example,) = [block for block in blocks if "mirrored_cpu_strategy(2)" in block]
    assert example.rstrip().splitlines()[-1].startswith("train(strategy)")
    script = tmp_path / "guide_example.py"
    script.write_text(example + "\nprint('=== one device ===', flush=True)\ntrain(tf.distribute.get_strategy())\n")
    environment = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    environment.pop("TF_CONFIG", None)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    mirrored, one_device = result.stdout.split("=== one device ===")
    losses = [re.findall(r"^(training|validation) +: loss +([-\d.]*\d)", part, re.M) for part in (mirrored, one_device)]
    assert len(losses[0]) == 12 and any(kind == "training" for kind, _ in losses[0]), result.stdout[-3000:]
    assert losses[0] == losses[1]
