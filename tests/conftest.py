"""Shared pytest set-up: every test module sees the repository root; real data is located once; JAX gets four CPU
devices (for the data-parallel mesh tests).

``JAX_NUM_CPU_DEVICES=4`` (JAX's ``jax_num_cpu_devices``, what ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
does for JAX alone) is set here, before any test module imports JAX, unless the environment already chose a device
count. It is read only when JAX creates its CPU client: nothing is imported for it, and TensorFlow and PyTorch never
read it. Single-device JAX code keeps running on device 0.
"""

import os

if "JAX_NUM_CPU_DEVICES" not in os.environ and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["JAX_NUM_CPU_DEVICES"] = "4"

import pytest  # noqa: E402  (after the environment is set: a plugin could import JAX)

from mlpug.datasets.fashion_mnist import find_data_dir


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    """Directory of the real Fashion-MNIST files; the test fails (not skips) when they are missing."""
    return str(find_data_dir(os.environ.get("MLPUG_FASHION_MNIST_DIR")))
