"""The TensorFlow examples on the real Fashion-MNIST data."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Loaded by path under its own name: the PyTorch example module is also called "train".
_spec = importlib.util.spec_from_file_location(
    "tensorflow_fashion_mnist_example", ROOT / "examples" / "fashion_mnist" / "tensorflow" / "train.py"
)
fashion_mnist_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fashion_mnist_example)


def test_one_epoch_reaches_80_percent_validation_accuracy(fashion_mnist_dir, capsys, tmp_path):
    manager = fashion_mnist_example.main(
        [
            "--num-epochs",
            "1",
            "--data-dir",
            fashion_mnist_dir,
            "--log-period",
            "300",
            "--checkpoints-path",
            str(tmp_path),
            "--tensorboard-dir",
            str(tmp_path / "tb"),
            "--lr-schedule",
            "cosine",
            "--clip-grad-norm",
            "1.0",
            "--early-stopping-patience",
            "1",
        ]
    )
    validation = manager.logs["current"]["validation"]["dataset"]
    assert validation["accuracy"] >= 0.80
    assert validation["loss"] < 0.6
    output = capsys.readouterr().out
    assert "Epoch 0/0\tREADY - Duration" in output
    assert "validation     : loss" in output and "Training completed. All good!" in output
    # the metrics history: printed as a table, saved next to the checkpoints
    assert "validation.dataset.accuracy" in output and f"{validation['accuracy']:.4f}" in output
    assert (tmp_path / "fashion-mnist-tensorflow-history.csv").read_text().startswith("epoch,global_iter,")
    assert (tmp_path / "fashion-mnist-tensorflow-history.png").read_bytes()[:4] == b"\x89PNG"
    # --tensorboard-dir, --lr-schedule cosine (warm-up, then decay: the last batch's rate is far below the peak)
    assert {path.name for path in (tmp_path / "tb").iterdir()} >= {"training-batch", "validation-dataset"}
    assert manager.logs["current"]["training_params"]["batch"]["lr"] < 1e-4


def test_bfloat16_with_gradient_accumulation_reaches_80_percent_in_one_epoch(fashion_mnist_dir, capsys, tmp_path):
    argv = ["--num-epochs", "1", "--data-dir", fashion_mnist_dir, "--log-period", "1000"]
    argv += ["--checkpoints-path", str(tmp_path)]
    manager = fashion_mnist_example.main(argv + ["--mixed-precision", "bfloat16", "--batch-chunk-size", "24"])
    assert manager.trainer.precision.autocast_dtype == "bfloat16" and manager.trainer.batch_chunk_size == 24
    validation = manager.logs["current"]["validation"]["dataset"]
    assert validation["accuracy"] >= 0.80
    assert "Training completed. All good!" in capsys.readouterr().out


def test_missing_data_dir_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/fashion_mnist/tensorflow/train.py"), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"Fashion-MNIST file train-images-idx3-ubyte[.gz] not found in {tmp_path}" in result.stderr
    assert "apt-get install -y dataset-fashion-mnist" in result.stderr


def run_script(source, fashion_mnist_dir, timeout):
    env = dict(os.environ, MLPUG_FASHION_MNIST_DIR=fashion_mnist_dir, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.mark.timeout(900)
def test_hello_world_not_eager_runs_as_written(fashion_mnist_dir):
    source = (ROOT / "examples/hello_world/tensorflow/train.py").read_text()
    result = run_script(source, fashion_mnist_dir, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "Epoch 9/9\tREADY" in result.stdout
    assert "Training completed. All good! ❤️" in result.stdout
    assert "real label = 9, predicted label = 9" in result.stdout


@pytest.mark.timeout(600)
def test_hello_world_eager_runs(fashion_mnist_dir):
    """The eager Hello World, shortened to 1 of its 10 epochs (it is ~4x slower than the compiled one)."""
    source = (ROOT / "examples/hello_world/tensorflow/train_eager.py").read_text()
    assert source.count("num_epochs = 10\n") == 1 and "eager_mode=True" in source
    result = run_script(source.replace("num_epochs = 10\n", "num_epochs = 1\n"), fashion_mnist_dir, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Epoch 0/0\tREADY" in result.stdout
    assert "Training completed. All good! ❤️" in result.stdout
    assert "real label = 9, predicted label = " in result.stdout


@pytest.mark.timeout(600)
def test_resume_latest_continues_the_example_exactly(fashion_mnist_dir, tmp_path):
    """`--resume latest` (README): one epoch, then a second run to two epochs from the training checkpoint, ends
    with the weights of a straight two-epoch run; `latest` without a checkpoint starts from the beginning."""
    common = ["--data-dir", fashion_mnist_dir, "--log-period", "100000"]
    straight = fashion_mnist_example.main(
        ["--num-epochs", "2", "--checkpoints-path", str(tmp_path / "a"), "--resume", "latest", *common]
    )
    straight_weights = [w.copy() for w in straight.trainer.model_components["model"].get_weights()]
    first = fashion_mnist_example.main(["--num-epochs", "1", "--checkpoints-path", str(tmp_path / "b"), *common])
    resumed = fashion_mnist_example.main(
        ["--num-epochs", "2", "--checkpoints-path", str(tmp_path / "b"), "--resume", "latest", *common]
    )
    assert first.global_iter == resumed.global_iter // 2 and resumed.global_iter == straight.global_iter
    resumed_weights = resumed.trainer.model_components["model"].get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(straight_weights, resumed_weights))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("distributed", [[], ["2"]], ids=["mirrored", "two_workers"])
def test_the_example_trains_data_parallel(fashion_mnist_dir, tmp_path, distributed):
    """README: `train.py --distributed` (MirroredStrategy on 2 logical CPU devices) and `train.py --distributed 2`
    (MultiWorkerMirroredStrategy on 2 local workers, mlpug's launcher) train one epoch to the accuracy of one
    device, print once (the primary) and write the checkpoints once."""
    script = str(ROOT / "examples/fashion_mnist/tensorflow/train.py")
    arguments = ["--num-epochs", "1", "--data-dir", fashion_mnist_dir, "--log-period", "100000"]
    arguments += ["--checkpoints-path", str(tmp_path), "--num-threads", "1"]
    result = subprocess.run(
        [sys.executable, script, "--distributed", *distributed, *arguments], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    finals = [line for line in result.stdout.splitlines() if line.startswith("Final validation loss")]
    assert len(finals) == 1, result.stdout
    assert float(finals[0].rsplit(" ", 1)[1]) >= 0.80
    assert result.stdout.count("Training completed. All good!") == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "fashion-mnist-tensorflow-best-model-checkpoint.safetensors",
        "fashion-mnist-tensorflow-history.csv",
        "fashion-mnist-tensorflow-history.png",
        "fashion-mnist-tensorflow-latest-model-checkpoint.safetensors",
        "fashion-mnist-tensorflow-training-checkpoint.safetensors",
    ]
