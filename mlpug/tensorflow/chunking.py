"""Gradient accumulation for the TensorFlow step, with TensorFlow ops so that it runs inside ``tf.function``.

The rules are those of :mod:`mlpug.chunking` (the neutral module): a batch of ``B`` samples is split along its
first dimension into chunks of at most ``C`` samples (the last may be smaller); chunk ``i`` with ``n_i`` samples
gets the weight ``n_i / B``; its loss is multiplied by that weight before its backward pass and the gradients
are summed, so they equal the gradients of the batch's mean loss; the optimizers step once per batch. Because
``B`` is not known when tracing (``None`` batch dimension), the chunks are visited by a ``tf.while_loop``
(the first chunk before the loop, so that the structure of the model outputs is known), which runs as a Python
loop in eager mode and as one graph loop in a compiled step (``parallel_iterations=1``: one chunk at a time).
Peak activation memory is that of one chunk; the gradient sum adds one gradient-sized buffer (in eager mode the
sum is updated one variable at a time, freeing the old sum and the chunk's gradient of each variable as it
goes, so at most one variable's sum exists twice).

Policies: the neutral null object :class:`mlpug.chunking.BatchChunking` (the plain step: one forward and
backward pass, the loss unweighted) and :class:`ChunkedBatch`, which accumulates. The results of the whole batch
follow the one rule of :mod:`mlpug.chunking`: the sample-weighted loss ``sum_i weight_i * loss_i``,
``num_samples`` summed over the chunks, gradients summed, and auxiliary results where tensors of rank >= 1 are
concatenated along dimension 0, scalar tensors are stacked into a vector with one entry per chunk, and anything
else (None, Python values) must be the same in every chunk (in a compiled step: in the traces of the first
chunk and of the loop body) and is kept once.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import tensorflow as tf

from mlpug.chunking import BatchChunk, BatchChunking, ChunkResult, ChunkStep, describe_type, same_value
from mlpug.chunking import ChunkedBatch as _NeutralChunkedBatch
from mlpug.chunking import batch_chunker as _neutral_batch_chunker
from mlpug.trainers.trainer import ModelOutputs


def check_splittable(batch: Any) -> None:
    """Raise unless every part of ``batch`` is a tensor/array with a first (sample) dimension.

    Raises:
        TypeError: A part cannot be split; the message names its type and position (runs at trace time only
            in a compiled step).
    """
    _check_part(batch, "batch")


def _check_part(value: Any, path: str) -> None:
    if tf.is_tensor(value) or isinstance(value, np.ndarray):
        if len(value.shape) == 0:
            raise TypeError(f"cannot split the batch into chunks: {path} is a 0-d tensor without a sample dimension")
        return
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _check_part(item, f"{path}[{key!r}]")
        return
    if isinstance(value, (list, tuple)) and value:
        for index, item in enumerate(value):
            _check_part(item, f"{path}[{index}]")
        return
    raise TypeError(
        f"cannot split the batch into chunks: {path} is a {describe_type(value)} ({value!r:.80}); with "
        "batch_chunk_size a batch must be a tensor/array, or a tuple, list or dict of them (all with the same "
        "first dimension). "
        "Give batches of that form, or train without batch_chunk_size."
    )


class ChunkedBatch(_NeutralChunkedBatch):
    """Accumulation policy: gradients of chunks of at most ``batch_chunk_size`` samples, summed with weights.

    Args:
        batch_chunk_size: The most samples per chunk (int >= 1).

    Raises:
        ValueError: ``batch_chunk_size`` is not an int >= 1.
    """

    def weigh_loss(self, loss: Any, chunk: BatchChunk) -> Any:
        """``loss * weight`` in the loss's dtype (the weight is a float32 tensor; the loss may be bfloat16)."""
        return loss * tf.cast(chunk.weight, loss.dtype)

    def run(self, chunk_step: ChunkStep, batch: Any) -> ChunkResult:
        """Forward and backward pass chunk by chunk; see the module docstring for the combined results.

        Raises:
            TypeError: The batch cannot be split (see :func:`check_splittable`).
            ValueError: A non-tensor auxiliary result differs between chunks.
        """
        check_splittable(batch)
        batch = tf.nest.map_structure(tf.convert_to_tensor, batch)
        leaves = tf.nest.flatten(batch)
        batch_size = tf.shape(leaves[0])[0]
        with tf.control_dependencies(_check_same_num_samples(leaves, batch_size)):
            batch_size = tf.identity(batch_size)  # every chunk's slices wait for the checks (no model op fails first)
        chunk_size = tf.constant(self.batch_chunk_size, batch_size.dtype)
        num_chunks = (batch_size + chunk_size - 1) // chunk_size
        total = tf.cast(batch_size, tf.float32)

        def chunk_at(index: Any) -> BatchChunk:
            start = index * chunk_size
            stop = tf.minimum(start + chunk_size, batch_size)
            data = tf.nest.map_structure(lambda tensor: tensor[start:stop], batch)
            return BatchChunk(data, stop - start, tf.cast(stop - start, tf.float32) / total, stop >= batch_size)

        def run_chunk(chunk: BatchChunk) -> tuple:
            (loss, num_samples, auxiliary_results), gradients = chunk_step(chunk)
            return loss, num_samples, auxiliary_results, gradients

        first_chunk = chunk_at(0)
        weight = first_chunk.weight
        loss, num_samples, auxiliary_results, gradients = run_chunk(first_chunk)
        loss_dtype = tf.float64 if loss.dtype == tf.float64 else tf.float32  # float16/bfloat16 losses sum in float32
        connected = [index for index, gradient in enumerate(gradients) if gradient is not None]
        num_variables = len(gradients)
        # The sum starts as the first chunk's gradients; no second reference to them is kept (eager: memory).
        gradient_sum = [_dense(gradients[i]) for i in connected]
        del gradients
        auxiliary_leaves = tf.nest.flatten(auxiliary_results, expand_composites=False)
        tensor_leaves = [index for index, leaf in enumerate(auxiliary_leaves) if tf.is_tensor(leaf)]

        def new_arrays() -> list:
            return [
                tf.TensorArray(auxiliary_leaves[index].dtype, size=num_chunks, infer_shape=False)
                for index in tensor_leaves
            ]

        def write(arrays: list, index: Any, leaves: list) -> list:
            return [array.write(index, leaves[leaf]) for array, leaf in zip(arrays, tensor_leaves)]

        def body(index, accumulated, loss_sum, samples_sum, arrays):
            chunk = chunk_at(index)
            weight = chunk.weight
            loss, num_samples, auxiliary_results, gradients = run_chunk(chunk)
            # In place, one variable at a time: in eager mode the old sum and the chunk's gradient of a
            # variable are freed as soon as they are added (``tf.while_loop`` holds this very list), so at most
            # one variable's sum exists twice; when tracing, the list holds symbolic tensors and this is free.
            gradients = list(gradients)
            for position, variable_index in enumerate(connected):
                accumulated[position] = accumulated[position] + _dense(gradients[variable_index])
                gradients[variable_index] = None
            leaves = tf.nest.flatten(auxiliary_results)
            _check_same_non_tensors(auxiliary_leaves, leaves, tensor_leaves)
            return (
                index + 1,
                accumulated,
                loss_sum + tf.cast(weight, loss_dtype) * tf.cast(loss, loss_dtype),
                samples_sum + tf.cast(num_samples, samples_sum.dtype),
                write(arrays, index, leaves),
            )

        # The gradient sum is accumulated in the variables' dtype (float32 also under mixed precision).
        _, accumulated, loss_sum, samples_sum, arrays = tf.while_loop(
            lambda index, *_: index < num_chunks,
            body,
            (
                tf.constant(1, batch_size.dtype),
                gradient_sum,
                tf.cast(weight, loss_dtype) * tf.cast(loss, loss_dtype),
                tf.convert_to_tensor(num_samples),
                write(new_arrays(), 0, auxiliary_leaves),
            ),
            parallel_iterations=1,  # one chunk at a time: the peak activation memory is that of one chunk
        )
        summed: list = [None] * num_variables  # None for variables the loss does not depend on
        for index, gradient in zip(connected, accumulated):
            summed[index] = gradient
        combined = list(auxiliary_leaves)
        for array, leaf in zip(arrays, tensor_leaves):
            shape = auxiliary_leaves[leaf].shape
            combined[leaf] = array.concat() if shape.rank else array.stack()
            if shape.rank is not None:  # the chunks' shape (unknown to a TensorArray), the number of samples open
                combined[leaf].set_shape([None, *shape[1:]] if shape.rank else [None])
        auxiliary_results = tf.nest.pack_sequence_as(auxiliary_results, combined)
        return ChunkResult(ModelOutputs(loss_sum, samples_sum, auxiliary_results), summed)


def _check_same_num_samples(leaves: list, batch_size: Any) -> list:
    """Raise when the parts of a batch have different first dimensions (the neutral rule of
    :func:`mlpug.chunking.batch_num_samples`): a ``ValueError`` when the shapes are static, else assertion ops
    (``tf.errors.InvalidArgumentError`` when the step runs), returned so that the slicing of the chunks can wait for
    them (otherwise a model op on misaligned parts may fail first, with its own message)."""
    sizes = [leaf.shape[0] for leaf in leaves]
    if all(size is not None for size in sizes):
        if len(set(sizes)) > 1:
            raise ValueError(
                f"cannot split the batch into chunks: its parts have different first dimensions (samples): {sizes}"
            )
        return []
    return [
        tf.debugging.assert_equal(
            tf.shape(leaf)[0],
            batch_size,
            message=f"cannot split the batch into chunks: part {index} has another "
            "first dimension (samples) than part 0",
        )  # fmt: skip
        for index, leaf in enumerate(leaves[1:], start=1)
    ]


def _check_same_non_tensors(first: list, leaves: list, tensor_leaves: list) -> None:
    """Raise when a non-tensor auxiliary leaf of a later chunk differs from the first chunk's (the merge rule)."""
    tensors = set(tensor_leaves)
    for index, (expected, value) in enumerate(zip(first, leaves)):
        if index not in tensors and (tf.is_tensor(value) or not same_value(expected, value)):
            raise ValueError(
                f"with batch_chunk_size, the chunks of a batch returned different auxiliary_results (leaf {index}): "
                f"{expected!r:.80} in the first chunk, {value!r:.80} in a later one. Values that are not tensors are "
                "kept once and must be the same in every chunk; return a value that differs per chunk as a tensor."
            )


def _dense(gradient: Any) -> tf.Tensor:
    """Gradients of embeddings come as ``tf.IndexedSlices``; the sum is dense."""
    return tf.convert_to_tensor(gradient)


def batch_chunker(batch_chunk_size: Optional[int]) -> BatchChunking:
    """The null policy for ``None``, else :class:`ChunkedBatch` (see :func:`mlpug.chunking.batch_chunker`).

    Raises:
        ValueError: ``batch_chunk_size`` is neither None nor an int >= 1.
    """
    return _neutral_batch_chunker(batch_chunk_size, ChunkedBatch)
