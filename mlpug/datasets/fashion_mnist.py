"""Reads Fashion-MNIST from local IDX files (the Debian package ``dataset-fashion-mnist``).

No code here downloads anything: when the files are missing, the error says how to get them.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV_VAR = "MLPUG_FASHION_MNIST_DIR"
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class FashionMNIST(NamedTuple):
    """The four arrays: images ``uint8 [N, 28, 28]`` and labels ``uint8 [N]`` (N = 60000 train, 10000 test)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def find_data_dir(data_dir: Optional[str] = None) -> Path:
    """The directory holding the IDX files: ``data_dir``, else ``$MLPUG_FASHION_MNIST_DIR``, else the Debian path.

    Raises:
        FileNotFoundError: A file is missing; the message says where it looked and how to install the data.
    """
    directory = Path(data_dir or os.environ.get(DATA_DIR_ENV_VAR) or DEFAULT_DATA_DIR)
    for stem in _FILES.values():
        if not (directory / f"{stem}.gz").exists() and not (directory / stem).exists():
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install the data with "
                "'sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist' (files go to "
                f"{DEFAULT_DATA_DIR}), or pass the directory holding the IDX files (--data-dir or ${DATA_DIR_ENV_VAR})."
            )
    return directory


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    Raises:
        ValueError: The file is not a valid unsigned-byte IDX file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = bytearray(file.read())  # writable, so tensors made from it may be written
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {array.size}")
    return array.reshape(shape)


def load_fashion_mnist(data_dir: Optional[str] = None) -> FashionMNIST:
    """Load the training (60000) and test (10000) images and labels.

    Args:
        data_dir: Directory with the IDX files (``.gz`` or not); see :func:`find_data_dir` for the default.

    Raises:
        FileNotFoundError: The data is not there (see :func:`find_data_dir`).
    """
    directory = find_data_dir(data_dir)
    arrays = {}
    for key, stem in _FILES.items():
        path = directory / f"{stem}.gz"
        arrays[key] = read_idx(path if path.exists() else directory / stem)
    return FashionMNIST(**arrays)
