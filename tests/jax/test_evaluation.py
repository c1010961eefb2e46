"""The JAX ``MetricEvaluator`` reads each batch's value from the device once: a sliding-window average read every
few batches transfers only the new batches' values, and its numbers are those of a plain float64 sum."""

import gc
import threading

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


def test_host_numbers_keeps_a_value_while_its_array_lives_and_forgets_it_after(monkeypatch):
    host_numbers = HostNumbers()
    arrays = [jnp.asarray(float(index)) for index in range(12)]
    assert host_numbers.read(arrays[:10]).tolist() == [float(index) for index in range(10)]
    transfers = _CountingTransfers(monkeypatch)
    for _ in range(3):  # three metrics' windows of 10 read in turn: only the new arrays, once
        assert host_numbers.read(arrays[2:12]).tolist() == [float(index) for index in range(2, 12)]
    assert transfers.arrays == 2
    assert len(host_numbers) == 12
    del arrays[:6]
    gc.collect()
    assert len(host_numbers) == 6  # the values of arrays that no longer exist are forgotten


def test_a_read_while_another_thread_reads_gets_every_value():
    host_numbers = HostNumbers()
    windows = [[jnp.asarray(float(index + 1000 * thread)) for index in range(300)] for thread in range(2)]
    results: list = [None, None]

    def read(thread):
        for end in range(50, 301, 50):
            results[thread] = host_numbers.read(windows[thread][:end]).tolist()

    threads = [threading.Thread(target=read, args=(thread,)) for thread in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [[float(index + 1000 * thread) for index in range(300)] for thread in range(2)]
