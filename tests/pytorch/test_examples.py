"""The PyTorch examples on the real Fashion-MNIST data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "fashion_mnist" / "pytorch"))
import train as fashion_mnist_example  # noqa: E402

sys.path.pop(0)


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
    assert (tmp_path / "fashion-mnist-pytorch-history.csv").read_text().startswith("epoch,global_iter,")
    assert (tmp_path / "fashion-mnist-pytorch-history.png").read_bytes()[:4] == b"\x89PNG"
    # --tensorboard-dir, --lr-schedule cosine (warm-up, then decay: the last batch's rate is far below the peak)
    assert {path.name for path in (tmp_path / "tb").iterdir()} >= {"training-batch", "validation-dataset"}
    assert manager.logs["current"]["training_params"]["batch"]["lr"] < 1e-4


def test_missing_data_dir_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/fashion_mnist/pytorch/train.py"), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"Fashion-MNIST file train-images-idx3-ubyte[.gz] not found in {tmp_path}" in result.stderr
    assert "apt-get install -y dataset-fashion-mnist" in result.stderr


@pytest.mark.timeout(900)
def test_hello_world_runs_as_written(fashion_mnist_dir):
    env = dict(os.environ, MLPUG_FASHION_MNIST_DIR=fashion_mnist_dir)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/hello_world/pytorch/train.py")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "Epoch 9/9\tREADY" in result.stdout
    assert "Training completed. All good! ❤️" in result.stdout
    assert "real label = 9, predicted label = 9" in result.stdout


def _weights(manager):
    return [p.detach().clone() for p in manager.trainer.model_components["model"].parameters()]


@pytest.mark.timeout(600)
def test_resume_latest_continues_the_example_exactly(fashion_mnist_dir, tmp_path):
    """`--resume latest` (README): one epoch, then a second run to two epochs from the training checkpoint, ends
    with the weights of a straight two-epoch run; and `latest` without a checkpoint starts from the beginning."""
    common = ["--data-dir", fashion_mnist_dir, "--log-period", "100000", "--num-threads", "1"]
    straight = fashion_mnist_example.main(
        ["--num-epochs", "2", "--checkpoints-path", str(tmp_path / "a"), "--resume", "latest", *common]
    )
    first = fashion_mnist_example.main(["--num-epochs", "1", "--checkpoints-path", str(tmp_path / "b"), *common])
    resumed = fashion_mnist_example.main(
        ["--num-epochs", "2", "--checkpoints-path", str(tmp_path / "b"), "--resume", "latest", *common]
    )
    assert first.global_iter == resumed.global_iter // 2 and resumed.global_iter == straight.global_iter
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(resumed)))


@pytest.mark.timeout(600)
def test_batch_chunk_size_trains_like_whole_batches(fashion_mnist_dir, capsys):
    """`--batch-chunk-size` (README): one epoch in chunks of 16 reaches the accuracy of whole batches."""
    manager = fashion_mnist_example.main(
        ["--num-epochs", "1", "--data-dir", fashion_mnist_dir, "--log-period", "100000", "--batch-chunk-size", "16"]
    )
    assert manager.trainer.batch_chunk_size == 16
    assert manager.logs["current"]["validation"]["dataset"]["accuracy"] >= 0.80


def _free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "launcher, strategy", [("torchrun", "ddp"), ("mlpug", "ddp"), ("torchrun", "fsdp"), ("mlpug", "fsdp")]
)
def test_the_example_trains_data_parallel_on_two_processes(fashion_mnist_dir, tmp_path, launcher, strategy):
    """README: `torchrun --nproc_per_node 2 train.py --distributed` and `train.py --distributed 2` (mlpug's launcher),
    with DDP and with `--strategy fsdp`, train one epoch on 2 gloo processes to the accuracy of one process, print
    once (the primary), write the checkpoints once (FSDP: the training checkpoint's shards in one directory)."""
    script = str(ROOT / "examples/fashion_mnist/pytorch/train.py")
    arguments = ["--num-epochs", "1", "--data-dir", fashion_mnist_dir, "--log-period", "100000"]
    arguments += ["--checkpoints-path", str(tmp_path), "--strategy", strategy]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(_free_port()), script, "--distributed", *arguments]  # fmt: skip
    else:
        command = [sys.executable, script, "--distributed", "2", *arguments]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    finals = [line for line in result.stdout.splitlines() if line.startswith("Final validation loss")]
    assert len(finals) == 1, result.stdout
    accuracy = float(finals[0].rsplit(" ", 1)[1])
    assert accuracy >= 0.80
    assert result.stdout.count("Training completed. All good!") == 1
    assert result.stdout.count("Computed over dataset:") == 1
    names = sorted(path.name for path in tmp_path.iterdir())
    if strategy == "fsdp":
        (shards,) = [name for name in names if name.startswith("fashion-mnist-pytorch-training-checkpoint-shards-")]
        assert sorted(os.listdir(tmp_path / shards)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        names.remove(shards)
    assert names == [
        "fashion-mnist-pytorch-best-model-checkpoint.safetensors",
        "fashion-mnist-pytorch-history.csv",
        "fashion-mnist-pytorch-history.png",
        "fashion-mnist-pytorch-latest-model-checkpoint.safetensors",
        "fashion-mnist-pytorch-training-checkpoint.safetensors",
    ]
