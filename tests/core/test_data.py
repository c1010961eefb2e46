"""The resumable data order (mlpug.data): depends only on (seed, epoch), starts at any batch, checks its state."""

import logging

import numpy as np
import pytest

from mlpug.data import (
    ResumableArrayBatches,
    ResumableBatchSampler,
    check_data_state,
    epoch_iterator,
    find_resumable,
    get_data_state,
)


def test_order_depends_only_on_seed_and_epoch_and_covers_every_sample():
    sampler = ResumableBatchSampler(23, 5, shuffle=True, seed=3)
    sampler.set_epoch(2)
    first = list(sampler)
    for epoch in (0, 1, 5):  # other epochs in between do not change epoch 2's order
        sampler.set_epoch(epoch)
        list(sampler)
    other = ResumableBatchSampler(23, 5, shuffle=True, seed=3)
    other.set_epoch(2)
    assert list(other) == first
    assert sorted(i for batch in first for i in batch) == list(range(23))
    assert [len(batch) for batch in first] == [5, 5, 5, 5, 3] and len(sampler) == 5
    other.set_epoch(3)
    assert list(other) != first
    assert list(ResumableBatchSampler(23, 5, seed=4)) != list(ResumableBatchSampler(23, 5, seed=3))
    assert list(ResumableBatchSampler(7, 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(ResumableBatchSampler(7, 3, shuffle=False, drop_last=True)) == [[0, 1, 2], [3, 4, 5]]


def test_set_start_applies_to_the_next_pass_only():
    sampler = ResumableBatchSampler(20, 4, seed=1)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_start(3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full
    sampler.set_start(5)
    assert list(sampler) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0, batch_size=1), "num_samples"),
        (dict(num_samples=4, batch_size=0), "batch_size"),
        (dict(num_samples=4, batch_size=2, seed=-1), "seed"),
        (dict(num_samples=4, batch_size=True), "batch_size"),
        (dict(num_samples=3, batch_size=4, drop_last=True), "leaves no batch"),
    ],
)
def test_bad_sampler_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResumableBatchSampler(**kwargs)


def test_array_batches_follow_the_sampler_and_convert():
    features = np.arange(10 * 2).reshape(10, 2)
    labels = np.arange(10)
    batches = ResumableArrayBatches((features, labels), 4, seed=2, convert=lambda a: a * 10)
    batches.set_epoch(1)
    order = batches.batch_sampler.epoch_order(1)
    produced = list(batches)
    assert [len(labels_batch) for _, labels_batch in produced] == [4, 4, 2]
    assert np.array_equal(np.concatenate([lab for _, lab in produced]), order * 10)
    assert np.array_equal(produced[0][0], features[order[:4]] * 10)
    with pytest.raises(ValueError, match="same number of samples"):
        ResumableArrayBatches((features, labels[:3]), 4)
    with pytest.raises(ValueError, match="non-empty list/tuple"):
        ResumableArrayBatches(features, 4)


def test_epoch_iterator_starts_resumable_data_by_index():
    batches = ResumableArrayBatches((np.arange(12),), 3, seed=0)
    batches.set_epoch(4)
    expected = [b[0].tolist() for b in batches]
    started = [b[0].tolist() for b in epoch_iterator(batches, 4, 2)]
    assert started == expected[2:]


class _Loader:
    """Stand-in for a DataLoader: the order lives in its batch_sampler."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def __iter__(self):
        return iter(list(self.batch_sampler))


def test_find_resumable_looks_at_the_batch_sampler():
    sampler = ResumableBatchSampler(8, 2)
    loader = _Loader(sampler)
    assert find_resumable(loader) is sampler
    assert find_resumable([1, 2]) is None
    assert get_data_state(loader) == {"order": sampler.get_state()}
    assert get_data_state([1, 2]) == {}


def test_plain_iterables_skip_batches_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="mlpug.data"):
        assert list(epoch_iterator([10, 11, 12, 13], 0, 2)) == [12, 13]
    assert "skipped by loading and dropping them" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlpug.data"):
        assert list(epoch_iterator([10, 11], 0, 0)) == [10, 11]
    assert caplog.text == ""


def test_set_epoch_is_called_on_a_plain_sampler():
    class Sampler:
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

    class Loader(list):
        sampler = Sampler()

    loader = Loader([1, 2])
    list(epoch_iterator(loader, 3, 0))
    assert loader.sampler.epoch == 3


def test_check_data_state_names_the_differences():
    sampler = ResumableBatchSampler(8, 2, seed=1)
    saved = {"order": ResumableBatchSampler(8, 4, seed=2).get_state()}
    with pytest.raises(ValueError, match=r"ckpt.pt: .*seed: 2 there, 1 here; batch_size x world_size: 4 there, 2 here"):
        check_data_state(sampler, saved, "ckpt.pt")
    check_data_state(sampler, {"order": sampler.get_state()}, "ckpt.pt")
    check_data_state([1, 2], saved, "ckpt.pt")  # not resumable: nothing to check


def test_a_data_state_of_another_number_of_ranks_with_the_same_global_batch_continues_the_same_order():
    """2 ranks x 4 samples = 1 process x 8 (the same samples in every step, so a sharded checkpoint of 2 ranks
    continues in one process); 2 x 4 against 1 x 4 (another global batch) is refused, naming both global batches."""
    two_ranks = ResumableBatchSampler(16, 4, seed=1)
    two_ranks.set_shard(0, 2)
    saved = {"order": two_ranks.get_state()}
    check_data_state(ResumableBatchSampler(16, 8, seed=1), saved, "ckpt.pt")
    with pytest.raises(ValueError, match=r"batch_size x world_size: 8 there, 4 here"):
        check_data_state(ResumableBatchSampler(16, 4, seed=1), saved, "ckpt.pt")
    shards = [ResumableBatchSampler(16, 4, seed=1) for _ in range(2)]
    for rank, shard in enumerate(shards):
        shard.set_shard(rank, 2)
    whole = ResumableBatchSampler(16, 8, seed=1)
    for sampler in (*shards, whole):
        sampler.set_epoch(1)
    per_rank = [list(shard) for shard in shards]
    assert [sorted(a + b) for a, b in zip(*per_rank)] == [sorted(batch) for batch in whole]
