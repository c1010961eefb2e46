"""Batch chunking for gradient accumulation and chunked evaluation: the split rules and the neutral protocol.

A batch of ``B`` samples is split into chunks of at most ``C`` samples along the first (sample) dimension;
the last chunk may be smaller. Chunk ``i`` with ``n_i`` samples gets the weight ``n_i / B``, so that for a
loss that is the mean over the samples of its chunk, ``sum_i weight_i * loss_i`` is the mean over the whole
batch, and so are its gradients (this is the standard gradient accumulation recipe, e.g. PyTorch's AMP
examples "gradient accumulation" section: divide each chunk's loss by the number of chunks, generalised here
to unequal chunk sizes).

What can be split, and how samples are counted (one rule, :func:`sample_parts`):

* an array (anything with a ``shape`` of at least one dimension that supports ``array[start:stop]``: numpy,
  torch and eager TensorFlow tensors) is sliced along its first dimension (a view, no copy for numpy/torch);
* a dict, or a tuple, named tuple or list with an item that holds an array, is split item by item (every
  array in it must have the same first dimension);
* a list or tuple none of whose items holds an array (e.g. a list of ``(x, y)`` float samples) is a sequence
  of samples and is sliced itself;
* anything else (a string, a number, a 0-d array, ...) cannot be split: ``TypeError`` naming its type and
  where it is in the batch.

The number of samples of a batch (when the model does not return ``num_samples``) is the size of its first
part in this order (:func:`infer_num_samples`).

The protocol every backend implements (:class:`BatchChunking`, the null object, and :class:`ChunkedBatch`):
``run(chunk_step, batch)`` calls ``chunk_step(chunk)`` for every :class:`BatchChunk` (forward and backward pass
of that chunk, returning a :class:`ChunkResult`) and combines the results into those of the whole batch;
``weigh_loss(loss, chunk)`` is the chunk's share of the batch loss. The combination rule (the same on every
backend):

* ``loss``: ``sum_i weight_i * loss_i`` (the sample-weighted batch loss);
* ``num_samples``: the sum over the chunks;
* ``gradients``: summed element-wise (``None`` stays ``None``; a backend whose gradients live on its parameters,
  like PyTorch, returns ``None`` and accumulates there);
* ``auxiliary_results`` (:func:`merge_auxiliary_results`): arrays with at least one dimension are concatenated
  along dimension 0; 0-d arrays (scalar tensors) are stacked into a vector with one entry per chunk; dicts,
  tuples, named tuples and lists are merged item by item; anything else (``None``, Python numbers, strings,
  other objects) must be the same in every chunk and is kept once (``ValueError`` otherwise: return a value
  that differs per chunk as a tensor).

Backends override only the array operations (:meth:`ChunkedBatch.concatenate`, :meth:`ChunkedBatch.stack`), or,
like TensorFlow, ``run`` itself to loop inside a compiled graph (``mlpug.tensorflow.chunking``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np


class BatchChunk(NamedTuple):
    """One chunk of a batch.

    Attributes:
        data: The chunk, with the same structure as the batch.
        num_samples: Samples (rows along the first dimension) in this chunk; ``None`` for the unsplit batch
            of the null policy (its size is not computed). A backend scalar inside a compiled loop.
        weight: ``num_samples / batch_num_samples``; 1.0 for the unsplit batch.
        is_last: True for the last chunk of the batch (where data-parallel gradient sync must happen).
    """

    data: Any
    num_samples: Any
    weight: Any
    is_last: Any


class ChunkResult(NamedTuple):
    """What the forward and backward pass of one chunk (or the combination of all chunks) produced.

    Attributes:
        outputs: The model outputs (a ``ModelOutputs``-like named tuple ``(loss, num_samples,
            auxiliary_results)``), the loss detached from the graph where the backend keeps graphs.
        gradients: A list with one gradient (or ``None``) per trained variable, or ``None`` when the backend
            accumulates gradients on its parameters (PyTorch).
    """

    outputs: Any
    gradients: Optional[list] = None


ChunkStep = Callable[[BatchChunk], ChunkResult]
"""Forward and backward pass of one chunk; the chunk's loss is weighed with ``chunking.weigh_loss`` first."""


def validate_batch_chunk_size(batch_chunk_size: Any, argument_name: str = "batch_chunk_size") -> Optional[int]:
    """Return ``batch_chunk_size`` when it is ``None`` or an int >= 1.

    Raises:
        ValueError: It is anything else; the message echoes the bad value.
    """
    if batch_chunk_size is None:
        return None
    if isinstance(batch_chunk_size, bool) or not isinstance(batch_chunk_size, int) or batch_chunk_size < 1:
        raise ValueError(
            f"{argument_name} must be None (no chunking) or an int >= 1 (samples per chunk), got {batch_chunk_size!r}"
        )
    return batch_chunk_size


def chunk_sizes(batch_num_samples: int, batch_chunk_size: int) -> list[int]:
    """Sizes of the chunks of a batch: ``[C, C, ..., B - k*C]`` (the last one may be smaller).

    Args:
        batch_num_samples: ``B``, samples in the batch (>= 1).
        batch_chunk_size: ``C``, the most samples per chunk (>= 1).

    Returns:
        ``ceil(B / C)`` ints that sum to ``B``.
    """
    return [min(batch_chunk_size, batch_num_samples - start) for start in range(0, batch_num_samples, batch_chunk_size)]


def is_array(value: Any) -> bool:
    """True for an array/tensor with at least one dimension (anything with such a ``shape``; not str/bytes)."""
    shape = getattr(value, "shape", None)
    return shape is not None and not isinstance(value, (str, bytes)) and len(shape) > 0


def is_scalar_array(value: Any) -> bool:
    """True for a 0-d array/tensor (a ``shape`` of length 0), not for Python numbers."""
    shape = getattr(value, "shape", None)
    return shape is not None and not isinstance(value, (str, bytes)) and len(shape) == 0


def holds_array(value: Any) -> bool:
    """True when ``value`` is an array, or a dict/tuple/list whose first item holds one (recursively)."""
    if is_array(value):
        return True
    if isinstance(value, Mapping):
        return bool(value) and holds_array(next(iter(value.values())))
    if isinstance(value, (list, tuple)):
        return bool(value) and holds_array(value[0])
    return False


def describe_type(value: Any) -> str:
    """``module.QualifiedName`` of ``value``'s type (just the name for builtins), for error messages."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__


def sample_parts(batch: Any, path: str = "batch") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, part)`` for every part of ``batch`` that is split along its samples, in order.

    A part is an array (its first dimension counts the samples) or a list/tuple of samples (its length does).

    Raises:
        TypeError: When reaching a part that cannot be split (its type and position are named).
    """
    if is_array(batch):
        yield path, batch
    elif isinstance(batch, Mapping):
        if not batch:
            raise TypeError(f"cannot split the batch into chunks: {path} is an empty dict")
        for key, value in batch.items():
            yield from sample_parts(value, f"{path}[{key!r}]")
    elif isinstance(batch, (list, tuple)) and any(holds_array(item) for item in batch):
        for index, value in enumerate(batch):
            yield from sample_parts(value, f"{path}[{index}]")
    elif isinstance(batch, (list, tuple)) and batch:
        yield path, batch  # a sequence of samples
    else:
        raise TypeError(
            f"cannot split the batch into chunks: {path} is a {describe_type(batch)} ({batch!r:.80}); a batch must be "
            "an array/tensor, or a tuple, list or dict of them (all with the same first dimension), or a list of "
            "samples. Give batches of that form, or train without batch_chunk_size."
        )


def infer_num_samples(batch: Any, leading_dimension: Callable[[Any], Any] = lambda array: array.shape[0]) -> Any:
    """Samples in ``batch``: the size of its first part (see :func:`sample_parts`).

    Args:
        batch: A batch.
        leading_dimension: Size of an array's first dimension; backends with symbolic shapes (TensorFlow inside
            a compiled step) pass their own.

    Raises:
        TypeError: The batch has no part that counts samples; the training model must return ``num_samples``.
    """
    node = batch  # the first part of sample_parts(batch), without a generator (this runs at every step)
    while True:
        if is_array(node):
            return leading_dimension(node)
        if isinstance(node, Mapping) and node:
            node = next(iter(node.values()))
        elif isinstance(node, (list, tuple)) and node and (holds_array(node[0]) or any(map(holds_array, node))):
            node = node[0]
        elif isinstance(node, (list, tuple)) and node:
            return len(node)  # a sequence of samples
        else:
            raise TypeError(
                f"cannot infer the number of samples of a batch of type {describe_type(batch)}; "
                "return it from the training model as num_samples"
            )


def batch_num_samples(batch: Any) -> int:
    """Number of samples in ``batch``: the common first dimension of everything in it that is split.

    Raises:
        TypeError: Part of the batch cannot be split (its type and position are named).
        ValueError: The parts of the batch disagree about the number of samples.
    """
    sizes = {path: int(part.shape[0]) if is_array(part) else len(part) for path, part in sample_parts(batch)}
    distinct = set(sizes.values())
    if len(distinct) != 1:
        raise ValueError(
            "cannot split the batch into chunks: its parts have different first dimensions (samples): "
            + ", ".join(f"{path}: {size}" for path, size in sizes.items())
        )
    return distinct.pop()


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of ``batch`` (same structure; arrays are sliced along their first dimension)."""
    if is_array(batch):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {key: slice_batch(value, start, stop) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and any(holds_array(item) for item in batch):
        items = [slice_batch(value, start, stop) for value in batch]
        if hasattr(batch, "_fields"):  # named tuple
            return type(batch)(*items)
        return type(batch)(items)
    return batch[start:stop]  # a sequence of samples


def split_batch(batch: Any, batch_chunk_size: int) -> list[BatchChunk]:
    """Split ``batch`` into :class:`BatchChunk` s of at most ``batch_chunk_size`` samples, weighted by size.

    Args:
        batch: An array, a tuple/list/dict of arrays, or a list of samples (see the module docstring).
        batch_chunk_size: The most samples per chunk (>= 1).

    Returns:
        ``ceil(B / C)`` chunks; their ``weight`` s sum to 1; only the last has ``is_last=True``.

    Raises:
        TypeError: The batch (or a part of it) cannot be split; the message names its type.
        ValueError: Its parts have different numbers of samples, or ``batch_chunk_size`` is not an int >= 1.
    """
    validate_batch_chunk_size(batch_chunk_size)
    total = batch_num_samples(batch)
    sizes = chunk_sizes(total, batch_chunk_size)
    chunks, start = [], 0
    for index, size in enumerate(sizes):
        data = slice_batch(batch, start, start + size)
        chunks.append(BatchChunk(data, size, size / total, index == len(sizes) - 1))
        start += size
    return chunks


def weighted_sum(values: Sequence[Any], weights: Sequence[Any]) -> Any:
    """``sum_i values[i] * weights[i]`` with the values' own arithmetic (backend tensors stay on their device)."""
    total = values[0] * weights[0]
    for value, weight in zip(values[1:], weights[1:]):
        total = total + value * weight
    return total


def sum_values(values: Sequence[Any]) -> Any:
    """Sum with the values' own arithmetic: Python ints stay ints, tensors stay tensors (no device sync)."""
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def same_value(first: Any, other: Any) -> bool:
    """True when two non-array auxiliary values are the same (identity or ``==`` giving True)."""
    if first is other:
        return True
    try:
        return bool(first == other)
    except Exception:  # e.g. objects whose == is not a truth value
        return False


def merge_auxiliary_results(
    results: Sequence[Any],
    concatenate: Callable[[list], Any],
    stack: Callable[[list], Any],
    path: str = "auxiliary_results",
) -> Any:
    """Merge the auxiliary results of the chunks of a batch into results for the whole batch.

    Args:
        results: One result per chunk, all with the same structure.
        concatenate: Backend function concatenating a list of arrays along dimension 0.
        stack: Backend function stacking a list of 0-d arrays into a vector.
        path: Where in the results this is (for error messages).

    Returns:
        The same structure, merged by the rule in the module docstring.

    Raises:
        ValueError: A value that is not an array differs between chunks (or the structures differ); the message
            names its position.
    """
    first = results[0]
    if all(is_array(result) for result in results):
        return concatenate(list(results))
    if all(is_scalar_array(result) for result in results):
        return stack(list(results))
    if isinstance(first, Mapping) and all(
        isinstance(result, Mapping) and result.keys() == first.keys() for result in results
    ):
        return {
            key: merge_auxiliary_results([result[key] for result in results], concatenate, stack, f"{path}[{key!r}]")
            for key in first
        }
    if isinstance(first, (list, tuple)) and all(
        type(result) is type(first) and len(result) == len(first) for result in results
    ):
        items = [
            merge_auxiliary_results([result[i] for result in results], concatenate, stack, f"{path}[{i}]")
            for i in range(len(first))
        ]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    for index, result in enumerate(results[1:], start=1):
        if is_array(result) or is_scalar_array(result) or not same_value(first, result):
            raise ValueError(
                f"with batch_chunk_size, the chunks of a batch returned different {path}: {first!r:.80} in chunk 0, "
                f"{result!r:.80} in chunk {index}. Values that are not tensors are kept once and must be the same "
                "in every chunk; return a value that differs per chunk as a tensor (0-d tensors are stacked, one "
                "entry per chunk; others are concatenated along dimension 0)."
            )
    return first


class BatchChunking:
    """The chunking protocol, and its null object: the batch is one chunk (weight 1), its loss used as it is.

    Used when no ``batch_chunk_size`` is given, so that the step is exactly the plain step.
    """

    batch_chunk_size: Optional[int] = None

    def run(self, chunk_step: ChunkStep, batch: Any) -> ChunkResult:
        """``chunk_step(BatchChunk(batch, None, 1.0, True))``: the batch is not inspected or copied."""
        return chunk_step(BatchChunk(batch, None, 1.0, True))

    def weigh_loss(self, loss: Any, chunk: BatchChunk) -> Any:
        """The loss itself (no extra operation, so gradients are bit-identical to an unchunked step)."""
        return loss


class ChunkedBatch(BatchChunking):
    """Chunking policy: split every batch into chunks of at most ``batch_chunk_size`` samples and combine them.

    The array operations default to NumPy; backends override :meth:`concatenate` and :meth:`stack` with their
    own (e.g. ``torch.cat`` / ``torch.stack``).

    Args:
        batch_chunk_size: The most samples per chunk (int >= 1).

    Raises:
        ValueError: ``batch_chunk_size`` is not an int >= 1.
    """

    def __init__(self, batch_chunk_size: int):
        if validate_batch_chunk_size(batch_chunk_size) is None:
            raise ValueError("batch_chunk_size must be an int >= 1 for ChunkedBatch, got None")
        self.batch_chunk_size: int = batch_chunk_size

    def concatenate(self, arrays: list) -> Any:
        """Concatenate arrays along dimension 0."""
        return np.concatenate(arrays, axis=0)

    def stack(self, scalars: list) -> Any:
        """Stack 0-d arrays into a vector with one entry per chunk."""
        return np.stack(scalars)

    def run(self, chunk_step: ChunkStep, batch: Any) -> ChunkResult:
        """Split ``batch`` (:func:`split_batch`), run ``chunk_step`` per chunk, combine (module docstring).

        Raises:
            TypeError / ValueError: The batch cannot be split, or the chunks' auxiliary results cannot be merged.
        """
        chunks = split_batch(batch, self.batch_chunk_size)
        results = [chunk_step(chunk) for chunk in chunks]
        return self.combine(results, chunks)

    def weigh_loss(self, loss: Any, chunk: BatchChunk) -> Any:
        """``loss * chunk.weight``: the chunk's share of the batch's mean loss."""
        return loss * chunk.weight

    def combine(self, results: Sequence[ChunkResult], chunks: Sequence[BatchChunk]) -> ChunkResult:
        """The result of the whole batch from those of its chunks (see the module docstring)."""
        outputs = [result.outputs for result in results]
        combined = type(outputs[0])(
            weighted_sum([output.loss for output in outputs], [chunk.weight for chunk in chunks]),
            sum_values([output.num_samples for output in outputs]),
            merge_auxiliary_results([output.auxiliary_results for output in outputs], self.concatenate, self.stack),
        )
        if results[0].gradients is None:
            return ChunkResult(combined, None)
        per_chunk = [result.gradients or [] for result in results]
        gradients = [
            None if gradient is None else sum_values([chunk_gradients[i] for chunk_gradients in per_chunk])
            for i, gradient in enumerate(per_chunk[0])
        ]
        return ChunkResult(combined, gradients)


def batch_chunker(batch_chunk_size: Optional[int], chunked_batch: type[ChunkedBatch] = ChunkedBatch) -> BatchChunking:
    """The chunking policy for ``batch_chunk_size``: the null :class:`BatchChunking` for ``None``, else
    ``chunked_batch(batch_chunk_size)`` (a backend passes its own :class:`ChunkedBatch` subclass).

    Raises:
        ValueError: ``batch_chunk_size`` is neither ``None`` nor an int >= 1.
    """
    size = validate_batch_chunk_size(batch_chunk_size)
    return BatchChunking() if size is None else chunked_batch(size)
