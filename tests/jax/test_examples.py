"""The JAX examples on the real Fashion-MNIST data."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
