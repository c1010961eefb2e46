"""The JAX ``MetricEvaluator`` reads each batch's value from the device once: a sliding-window average read every
few batches transfers only the new batches' values, and its numbers are those of a plain float64 sum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlpug.jax as mlp
from mlpug.jax.host_numbers import HostNumbers


class _CountingTransfers:
    """Counts the arrays that ``jax.device_get`` is asked for."""

    def __init__(self, monkeypatch):
        self.arrays = 0
        original = jax.device_get

        def counting(tree):
            self.arrays += sum(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(tree))
            return original(tree)

        monkeypatch.setattr(jax, "device_get", counting)


def test_a_sliding_window_read_again_transfers_only_the_new_values(monkeypatch):
    evaluator = mlp.evaluation.MetricEvaluator(trainer=None)
    rng = np.random.default_rng(0)
    numbers = rng.normal(size=60).astype(np.float32)
    losses = [jnp.asarray(number) for number in numbers]
    weights = [8] * 59 + [3]
    transfers = _CountingTransfers(monkeypatch)
    for end in (20, 40, 60):  # three reads of a growing window
        weighted, total = evaluator._weighted_sums(losses[:end], weights[:end])
        expected = float(np.sum(numbers[:end].astype(np.float64) * np.asarray(weights[:end], dtype=np.float64)))
        assert weighted == pytest.approx(expected, rel=1e-12)
        assert total == sum(weights[:end])
    assert transfers.arrays == 60  # each array once, not 20 + 40 + 60


def test_non_finite_values_are_left_out_when_asked_and_numbers_mix_with_arrays():
    evaluator = mlp.evaluation.MetricEvaluator(trainer=None)
    values = [jnp.asarray(1.0), 2.0, jnp.asarray(jnp.nan, dtype=jnp.bfloat16)]
    assert evaluator._weighted_sums(values, [1, jnp.asarray(3), 2], skip_non_finite=True) == (7.0, 4.0)
    weighted, total = evaluator._weighted_sums(values, [1, 3, 2])
    assert np.isnan(weighted) and total == 6.0


def test_host_numbers_forgets_the_least_recently_read_arrays_beyond_its_capacity(monkeypatch):
    host_numbers = HostNumbers(capacity=4)
    arrays = [jnp.asarray(float(index)) for index in range(8)]
    assert host_numbers.read(arrays[:6]).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # 6 kept: twice a read's arrays
    assert host_numbers.read(arrays[6:]).tolist() == [6.0, 7.0]  # 4 kept: 4, 5, 6 and 7
    transfers = _CountingTransfers(monkeypatch)
    assert host_numbers.read(arrays[4:]).tolist() == [4.0, 5.0, 6.0, 7.0]
    assert transfers.arrays == 0
    assert host_numbers.read(arrays[:2]).tolist() == [0.0, 1.0]
    assert transfers.arrays == 2


def test_a_window_longer_than_the_capacity_read_again_transfers_only_its_new_values(monkeypatch):
    host_numbers = HostNumbers(capacity=4)
    arrays = [jnp.asarray(float(index)) for index in range(12)]
    host_numbers.read(arrays[:10])
    transfers = _CountingTransfers(monkeypatch)
    assert host_numbers.read(arrays[2:12]).tolist() == [float(index) for index in range(2, 12)]
    assert transfers.arrays == 2
