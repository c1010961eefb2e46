"""Shared pytest set-up: every test module sees the repository root; real data is located once."""

import os

import pytest

from mlpug.datasets.fashion_mnist import find_data_dir


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    """Directory of the real Fashion-MNIST files; the test fails (not skips) when they are missing."""
    return str(find_data_dir(os.environ.get("MLPUG_FASHION_MNIST_DIR")))
