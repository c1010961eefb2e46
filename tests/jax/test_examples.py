"""The JAX examples on the real Fashion-MNIST data.

An epoch of the Fashion-MNIST example takes about a second on the 2-core CI machine (the compilation of the step
about as much): the tests train whole epochs. ``tests/conftest.py`` gives this process 4 JAX CPU devices, so
``--distributed`` (a mesh of the local devices) runs in-process.
"""

import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Loaded by path under its own name: the PyTorch and TensorFlow example modules are also called "train".
_spec = importlib.util.spec_from_file_location(
    "jax_fashion_mnist_example", ROOT / "examples" / "fashion_mnist" / "jax" / "train.py"
)
fashion_mnist_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fashion_mnist_example)


def run_example(fashion_mnist_dir, checkpoints_path, *arguments):
    """The example's ``main`` with quiet progress; returns its ``TrainingManager``."""
    common = ["--data-dir", fashion_mnist_dir, "--log-period", "100000", "--checkpoints-path", str(checkpoints_path)]
    return fashion_mnist_example.main([*common, *arguments])


def weights(manager):
    """The trained classifier's arrays (NumPy copies), in a fixed order."""
    return jax.tree_util.tree_leaves(manager.trainer.get_state()["model_components"]["model"])


def validation_of(manager):
    return manager.logs["current"]["validation"]["dataset"]


@pytest.fixture(scope="module")
def two_plain_epochs(fashion_mnist_dir, tmp_path_factory):
    """Two epochs with the defaults (K=1, synchronous validation, one device): the reference of the flag tests."""
    return run_example(fashion_mnist_dir, tmp_path_factory.mktemp("plain"), "--num-epochs", "2")


def test_one_epoch_reaches_80_percent_validation_accuracy(fashion_mnist_dir, capsys, tmp_path):
    manager = run_example(
        fashion_mnist_dir,
        tmp_path,
        "--num-epochs",
        "1",
        "--log-period",
        "300",
        "--tensorboard-dir",
        str(tmp_path / "tb"),
        "--lr-schedule",
        "cosine",
        "--clip-grad-norm",
        "1.0",
        "--early-stopping-patience",
        "1",
    )
    validation = validation_of(manager)
    assert validation["accuracy"] >= 0.80
    assert validation["loss"] < 0.6
    output = capsys.readouterr().out
    assert "Epoch 0/0\tREADY - Duration" in output
    assert "validation     : loss" in output and "Training completed. All good!" in output
    # the metrics history: printed as a table, saved next to the checkpoints
    assert "validation.dataset.accuracy" in output and f"{validation['accuracy']:.4f}" in output
    assert (tmp_path / "fashion-mnist-jax-history.csv").read_text().startswith("epoch,global_iter,")
    assert (tmp_path / "fashion-mnist-jax-history.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == [
        "fashion-mnist-jax-best-model-checkpoint.safetensors",
        "fashion-mnist-jax-latest-model-checkpoint.safetensors",
        "fashion-mnist-jax-training-checkpoint.safetensors",
    ]
    # --tensorboard-dir, --lr-schedule cosine (optax's schedule, computed in the step: warm-up, then decay to 0, so
    # the last batch's rate is far below the peak), --clip-grad-norm
    assert {path.name for path in (tmp_path / "tb").iterdir()} >= {"training-batch", "validation-dataset"}
    assert manager.logs["current"]["training_params"]["batch"]["lr"] < 1e-4
    assert manager.trainer.clip_gradients_norm == 1.0


def test_bfloat16_with_gradient_accumulation_reaches_80_percent_in_one_epoch(fashion_mnist_dir, capsys, tmp_path):
    manager = run_example(
        fashion_mnist_dir, tmp_path, "--num-epochs", "1", "--mixed-precision", "bfloat16", "--batch-chunk-size", "24"
    )
    assert manager.trainer.precision.autocast_dtype == "bfloat16" and manager.trainer.batch_chunk_size == 24
    assert validation_of(manager)["accuracy"] >= 0.80
    assert "Training completed. All good!" in capsys.readouterr().out


def test_missing_data_dir_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/fashion_mnist/jax/train.py"), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"Fashion-MNIST file train-images-idx3-ubyte[.gz] not found in {tmp_path}" in result.stderr
    assert "apt-get install -y dataset-fashion-mnist" in result.stderr


def test_resume_latest_continues_the_example_exactly(fashion_mnist_dir, capsys, tmp_path, two_plain_epochs):
    """`--resume latest`: one epoch, then a second run to two epochs from the training checkpoint (it trains the
    second epoch only), ends with the weights of a straight two-epoch run, bit for bit (data order, Adam's state and
    step count restored)."""
    first = run_example(fashion_mnist_dir, tmp_path, "--num-epochs", "1")
    capsys.readouterr()
    resumed = run_example(fashion_mnist_dir, tmp_path, "--num-epochs", "2", "--resume", "latest")
    output = capsys.readouterr().out
    assert "Epoch 0/1\tREADY" not in output and "Epoch 1/1\tREADY" in output
    assert first.global_iter == resumed.global_iter // 2 and resumed.global_iter == two_plain_epochs.global_iter
    assert all(np.array_equal(a, b) for a, b in zip(weights(two_plain_epochs), weights(resumed)))
    assert validation_of(resumed)["loss"] == validation_of(two_plain_epochs)["loss"]


@pytest.mark.parametrize(
    "flags",
    [["--steps-per-execution", "32"], ["--async-eval"], ["--steps-per-execution", "32", "--async-eval"]],
    ids=["steps_per_execution_32", "async_eval", "both"],
)
def test_two_epochs_with_the_flag_train_the_weights_of_the_plain_run(
    fashion_mnist_dir, tmp_path, two_plain_epochs, flags
):
    """`--steps-per-execution 32` (32 batches per compiled call: the same steps, bit-identical on CPU) and
    `--async-eval` (validation on a worker thread, on a copy of the weights) reach 80 % in two epochs with the
    weights and the validation results of the plain run."""
    manager = run_example(fashion_mnist_dir, tmp_path, "--num-epochs", "2", *flags)
    assert manager.trainer.steps_per_execution == (32 if "--steps-per-execution" in flags else 1)
    (logger,) = [c for c in manager.callbacks if type(c).__name__ == "TestMetricsLogger"]
    assert logger.run_async == ("--async-eval" in flags)
    assert manager.global_iter == two_plain_epochs.global_iter
    validation = validation_of(manager)
    assert validation["accuracy"] >= 0.80
    assert all(np.array_equal(a, b) for a, b in zip(weights(two_plain_epochs), weights(manager)))
    assert validation == pytest.approx(validation_of(two_plain_epochs), rel=1e-6)


def test_distributed_trains_data_parallel_over_the_local_devices(fashion_mnist_dir, tmp_path, two_plain_epochs):
    """`--distributed`: every batch sharded over a mesh of the 4 CPU devices of this process; two epochs reach 80 %
    and a validation loss near one device's (the same global batches; the order of floating-point sums differs, and
    Adam carries such differences on over 1,875 steps: 0.3771 against 0.3736 when written)."""
    assert jax.device_count() == 4, "tests/conftest.py gives the test process 4 JAX CPU devices"
    manager = run_example(fashion_mnist_dir, tmp_path, "--num-epochs", "2", "--distributed")
    assert manager.trainer.strategy.mesh.devices.size == 4
    assert manager.global_iter == two_plain_epochs.global_iter  # the global batch of 64, not 64 per device
    assert validation_of(manager)["accuracy"] >= 0.80
    assert validation_of(manager)["loss"] == pytest.approx(validation_of(two_plain_epochs)["loss"], abs=0.02)


@pytest.mark.timeout(600)
def test_distributed_2_trains_on_two_processes(fashion_mnist_dir, tmp_path):
    """`--distributed 2`: two local JAX processes joined by mlp.distributed.launch (gloo CPU collectives), each
    feeding its half of every global batch of 2 x 64; one epoch is 468 steps and reaches 80 %, the primary prints
    once and the checkpoint files are written once."""
    env = {key: value for key, value in os.environ.items() if key not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    arguments = ["--distributed", "2", "--num-epochs", "1", "--data-dir", fashion_mnist_dir, "--log-period", "100000"]
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/fashion_mnist/jax/train.py"),
            *arguments,
            "--checkpoints-path",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    finals = [line for line in result.stdout.splitlines() if line.startswith("Final validation loss")]
    assert len(finals) == 1, result.stdout[-3000:]
    assert float(finals[0].rsplit(" ", 1)[1]) >= 0.80
    assert result.stdout.count("Training completed. All good!") == 1
    assert (tmp_path / "fashion-mnist-jax-history.csv").read_text().splitlines()[1].startswith("0,468,")
    assert sorted(path.name for path in tmp_path.glob("*.safetensors")) == [
        "fashion-mnist-jax-best-model-checkpoint.safetensors",
        "fashion-mnist-jax-latest-model-checkpoint.safetensors",
        "fashion-mnist-jax-training-checkpoint.safetensors",
    ]


@pytest.mark.timeout(600)
def test_the_quickstart_reaches_85_percent_validation_accuracy_in_3_epochs(fashion_mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLPUG_FASHION_MNIST_DIR", fashion_mnist_dir)
    monkeypatch.chdir(tmp_path)
    names = runpy.run_path(str(ROOT / "examples/quickstart/jax/train.py"), run_name="__main__")
    rows = names["history"].rows
    assert len(rows) == 3 and rows[-1]["validation.dataset.accuracy"] >= 0.85
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} >= {
        "model-best-model-checkpoint.safetensors",
        "model-training-checkpoint.safetensors",
    }


@pytest.mark.timeout(600)
def test_hello_world_runs_as_written_for_one_epoch(fashion_mnist_dir, tmp_path):
    """The Hello World, shortened to 1 of its 10 epochs, run in a fresh directory (it writes checkpoints/)."""
    source = (ROOT / "examples/hello_world/jax/train.py").read_text()
    assert source.count("num_epochs = 10\n") == 1
    env = dict(os.environ, MLPUG_FASHION_MNIST_DIR=fashion_mnist_dir)
    result = subprocess.run(
        [sys.executable, "-c", source.replace("num_epochs = 10\n", "num_epochs = 1\n")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Epoch 0/0\tREADY" in result.stdout
    assert "Training completed. All good! ❤️" in result.stdout
    assert "real label = 9, predicted label = 9" in result.stdout
    validation = re.findall(r"validation\s*: loss\s+([0-9]+\.[0-9]+)", result.stdout)
    assert validation and float(validation[-1]) < 0.6, result.stdout[-3000:]
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == [
        "hello-world-jax-best-model-checkpoint.safetensors",
        "hello-world-jax-latest-model-checkpoint.safetensors",
        "hello-world-jax-training-checkpoint.safetensors",
    ]
