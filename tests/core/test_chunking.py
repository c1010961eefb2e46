"""Splitting batches into weighted chunks (neutral, numpy arrays) and merging chunk results."""

from collections import namedtuple

import numpy as np
import pytest

from mlpug.chunking import (
    BatchChunk,
    BatchChunking,
    ChunkedBatch,
    ChunkResult,
    batch_chunker,
    batch_num_samples,
    chunk_sizes,
    infer_num_samples,
    merge_auxiliary_results,
    split_batch,
    validate_batch_chunk_size,
)
from mlpug.trainers.gradient_sync import GradientSync

Pair = namedtuple("Pair", ["features", "labels"])


def concatenate(arrays):
    return np.concatenate(arrays, axis=0)


@pytest.mark.parametrize(
    "batch_size, chunk_size, expected",
    [(10, 4, [4, 4, 2]), (8, 4, [4, 4]), (3, 5, [3]), (5, 1, [1, 1, 1, 1, 1]), (7, 7, [7])],
)
def test_chunk_sizes_cover_the_batch(batch_size, chunk_size, expected):
    assert chunk_sizes(batch_size, chunk_size) == expected
    weights = [chunk.weight for chunk in split_batch(np.zeros(batch_size), chunk_size)]
    assert weights == pytest.approx([size / batch_size for size in expected])
    assert sum(weights) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4", [4]])
def test_bad_chunk_size_is_rejected_with_its_value(bad):
    with pytest.raises(ValueError, match="batch_chunk_size must be None .* or an int >= 1") as raised:
        validate_batch_chunk_size(bad)
    assert repr(bad) in str(raised.value)
    with pytest.raises(ValueError):
        batch_chunker(bad)


def test_split_array_batch_into_views_with_weights():
    batch = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    chunks = split_batch(batch, 4)
    assert [c.num_samples for c in chunks] == [4, 4, 2]
    assert [c.weight for c in chunks] == pytest.approx([0.4, 0.4, 0.2])
    assert [c.is_last for c in chunks] == [False, False, True]
    np.testing.assert_array_equal(concatenate([c.data for c in chunks]), batch)
    assert all(np.shares_memory(c.data, batch) for c in chunks)  # slices, no copies


def test_split_tuple_named_tuple_list_and_dict_batches():
    features = np.random.default_rng(0).normal(size=(9, 2, 2))
    labels = np.arange(9)
    for batch in ((features, labels), [features, labels], Pair(features, labels)):
        chunks = split_batch(batch, 4)
        assert [type(c.data) for c in chunks] == [type(batch)] * 3
        np.testing.assert_array_equal(concatenate([c.data[0] for c in chunks]), features)
        np.testing.assert_array_equal(concatenate([c.data[1] for c in chunks]), labels)
    nested = {"inputs": {"ids": labels, "mask": labels > 3}, "labels": labels}
    chunks = split_batch(nested, 5)
    assert [c.num_samples for c in chunks] == [5, 4]
    np.testing.assert_array_equal(chunks[1].data["inputs"]["mask"], labels[5:] > 3)
    assert isinstance(split_batch(Pair(features, labels), 4)[0].data, Pair)


def test_list_of_samples_is_sliced_itself():
    batch = [(0.1 * i, 1.0) for i in range(7)]
    chunks = split_batch(batch, 3)
    assert [c.data for c in chunks] == [batch[0:3], batch[3:6], batch[6:7]]
    assert batch_num_samples(batch) == 7


@pytest.mark.parametrize(
    "batch, type_name, where",
    [
        ((np.zeros((4, 2)), "meta"), "str", "batch[1]"),
        ({"x": np.zeros(4), "n": 3}, "int", "batch['n']"),
        (np.float32(3.0), "numpy.float32", "batch"),
        (object(), "object", "batch"),
        ({}, "empty dict", "batch"),
    ],
)
def test_unsplittable_batch_names_its_type_and_place(batch, type_name, where):
    with pytest.raises(TypeError, match="cannot split the batch into chunks") as raised:
        split_batch(batch, 2)
    assert type_name in str(raised.value) and where in str(raised.value)


def test_parts_with_different_sample_counts_are_an_error():
    with pytest.raises(ValueError, match=r"batch\[0\]: 4, batch\[1\]: 3"):
        split_batch((np.zeros((4, 2)), np.zeros(3)), 2)


def test_merge_rule_of_auxiliary_results():
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=(n, 3)) for n in (4, 4, 2)]
    results = [
        {"logits": lg, "pair": (lg[:, 0], 7), "none": None, "scalar": np.float64(i) * np.ones(()), "tag": "x"}
        for i, lg in enumerate(logits)
    ]
    merged = merge_auxiliary_results(results, concatenate, np.stack)
    np.testing.assert_array_equal(merged["logits"], np.concatenate(logits))
    np.testing.assert_array_equal(merged["pair"][0], np.concatenate(logits)[:, 0])
    assert merged["pair"][1] == 7  # not an array, the same in every chunk: kept once
    assert merged["none"] is None and merged["tag"] == "x"
    np.testing.assert_array_equal(merged["scalar"], [0.0, 1.0, 2.0])  # 0-d arrays: one entry per chunk
    assert merge_auxiliary_results([None, None], concatenate, np.stack) is None


def test_merge_rule_refuses_non_arrays_that_differ_between_chunks():
    with pytest.raises(ValueError, match=r"auxiliary_results\['count'\].*3 in chunk 0, 2 in chunk 1.*as a tensor"):
        merge_auxiliary_results([{"count": 3}, {"count": 2}], concatenate, np.stack)


def test_null_policy_runs_the_step_once_on_the_batch_itself():
    batch = (np.zeros((6, 2)), np.zeros(6))
    policy = batch_chunker(None)
    assert type(policy) is BatchChunking and policy.batch_chunk_size is None
    seen = []

    def chunk_step(chunk):
        seen.append(chunk)
        return ChunkResult(("loss", 6, "aux"))

    result = policy.run(chunk_step, batch)
    (chunk,) = seen
    assert chunk.data is batch and chunk.weight == 1.0 and chunk.is_last and chunk.num_samples is None
    loss = np.float64(2.5)
    assert policy.weigh_loss(loss, chunk) is loss
    assert result.outputs == ("loss", 6, "aux") and result.gradients is None


def test_chunked_policy_weighs_combines_outputs_and_sums_gradients():
    Outputs = namedtuple("Outputs", ["loss", "num_samples", "auxiliary_results"])
    policy = batch_chunker(4)
    assert isinstance(policy, ChunkedBatch) and policy.batch_chunk_size == 4
    values = np.arange(10.0)
    seen = []

    def chunk_step(chunk):
        seen.append(chunk)
        loss = np.mean(chunk.data**2)
        return ChunkResult(Outputs(loss, chunk.num_samples, chunk.data * 2), [policy.weigh_loss(loss, chunk), None])

    result = policy.run(chunk_step, values)
    assert [c.weight for c in seen] == [0.4, 0.4, 0.2] and [c.is_last for c in seen] == [False, False, True]
    combined = result.outputs
    assert isinstance(combined, Outputs)
    assert combined.loss == pytest.approx(np.mean(values**2))  # the full-batch mean, not the mean of chunk means
    assert combined.num_samples == 10
    np.testing.assert_array_equal(combined.auxiliary_results, values * 2)
    assert result.gradients[0] == pytest.approx(np.mean(values**2)) and result.gradients[1] is None


def test_infer_num_samples_follows_the_split_rule():
    assert infer_num_samples((np.zeros((5, 2)), np.zeros(5))) == 5
    assert infer_num_samples({"x": np.zeros((3, 1))}) == 3
    assert infer_num_samples([(0.1, 0.2), (0.3, 0.4)]) == 2
    with pytest.raises(TypeError, match="return it from the training model as num_samples"):
        infer_num_samples(3.0)


def test_serial_gradient_sync_is_a_null_object():
    sync = GradientSync()
    with sync.chunk_context(BatchChunk(None, 1, 1.0, False)) as entered:
        assert entered is None
    gradients = [np.ones(2)]
    assert sync.reduce(gradients) is gradients
