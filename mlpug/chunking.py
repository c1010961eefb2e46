"""Splitting batches into chunks for gradient accumulation and chunked evaluation (pure Python, any backend).

A batch of ``B`` samples is split into chunks of at most ``C`` samples along the first (sample) dimension;
the last chunk may be smaller. Chunk ``i`` with ``n_i`` samples gets the weight ``n_i / B``, so that for a
loss that is the mean over the samples of its chunk, ``sum_i weight_i * loss_i`` is the mean over the whole
batch, and so are its gradients (this is the standard gradient accumulation recipe, e.g. PyTorch's AMP
examples "gradient accumulation" section: divide each chunk's loss by the number of chunks, generalised here
to unequal chunk sizes).

What can be split (the rules of ``DefaultTrainer._infer_num_samples``):

* an array (anything with a ``shape`` of at least one dimension that supports ``array[start:stop]``: numpy,
  torch and eager TensorFlow tensors) is sliced along its first dimension (a view, no copy for numpy/torch);
* a dict, or a tuple, named tuple or list with an item that holds an array, is split item by item (every
  array in it must have the same first dimension);
* a list or tuple none of whose items holds an array (e.g. a list of ``(x, y)`` float samples) is a sequence
  of samples and is sliced itself;
* anything else (a string, a number, a 0-d array, ...) cannot be split: ``TypeError`` naming its type and
  where it is in the batch.

Chunkers are policy objects: :class:`WholeBatch` is the null object (one chunk, the batch itself, the loss
unscaled), :class:`ChunkedBatch` splits. Loop code calls them unconditionally.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple, Optional

Concatenate = Callable[[list[Any]], Any]
"""Backend function that concatenates a list of arrays along their first dimension (e.g. ``torch.cat``)."""


class BatchChunk(NamedTuple):
    """One chunk of a batch.

    Attributes:
        data: The chunk, with the same structure as the batch.
        num_samples: Samples (rows along the first dimension) in this chunk; ``None`` for the unsplit batch
            of :class:`WholeBatch` (its size is not computed).
        weight: ``num_samples / batch_num_samples``; 1.0 for the unsplit batch.
        is_last: True for the last chunk of the batch (e.g. where data-parallel gradient sync must happen).
    """

    data: Any
    num_samples: Optional[int]
    weight: float
    is_last: bool


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


def chunk_sizes(batch_num_samples: int, batch_chunk_size: int) -> list:
    """Sizes of the chunks of a batch: ``[C, C, ..., B - k*C]`` (the last one may be smaller).

    Args:
        batch_num_samples: ``B``, samples in the batch (>= 1).
        batch_chunk_size: ``C``, the most samples per chunk (>= 1).

    Returns:
        ``ceil(B / C)`` ints that sum to ``B``.
    """
    return [min(batch_chunk_size, batch_num_samples - start) for start in range(0, batch_num_samples, batch_chunk_size)]


def chunk_weights(sizes: Sequence[int]) -> list:
    """Weight of each chunk: its share of the batch's samples, ``n_i / sum(n)`` (the weights sum to 1)."""
    total = sum(sizes)
    return [size / total for size in sizes]


def is_array(value: Any) -> bool:
    """True for an array/tensor with at least one dimension (anything with such a ``shape``; not str/bytes)."""
    shape = getattr(value, "shape", None)
    return shape is not None and not isinstance(value, (str, bytes)) and len(shape) > 0


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


def _leading_sizes(batch: Any, path: str, sizes: dict) -> None:
    """Collect ``{path: first dimension}`` of every part of ``batch`` that is split; raise for unsplittable parts."""
    if is_array(batch):
        sizes[path] = int(batch.shape[0])
    elif isinstance(batch, Mapping):
        if not batch:
            raise TypeError(f"cannot split the batch into chunks: {path} is an empty dict")
        for key, value in batch.items():
            _leading_sizes(value, f"{path}[{key!r}]", sizes)
    elif isinstance(batch, (list, tuple)) and any(holds_array(item) for item in batch):
        for index, value in enumerate(batch):
            _leading_sizes(value, f"{path}[{index}]", sizes)
    elif isinstance(batch, (list, tuple)) and batch:
        sizes[path] = len(batch)  # a sequence of samples
    else:
        raise TypeError(
            f"cannot split the batch into chunks: {path} is a {describe_type(batch)} ({batch!r:.80}); a batch must be "
            "an array/tensor, or a tuple, list or dict of them (all with the same first dimension), or a list of "
            "samples. Give batches of that form, or train without batch_chunk_size."
        )


def batch_num_samples(batch: Any) -> int:
    """Number of samples in ``batch``: the common first dimension of everything in it that is split.

    Raises:
        TypeError: Part of the batch cannot be split (its type and position are named).
        ValueError: The parts of the batch disagree about the number of samples.
    """
    sizes: dict = {}
    _leading_sizes(batch, "batch", sizes)
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


def split_batch(batch: Any, batch_chunk_size: int) -> list:
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


def concatenate_results(results: Sequence[Any], concatenate: Concatenate) -> Any:
    """Merge the auxiliary results of the chunks of a batch into results for the whole batch.

    Args:
        results: One result per chunk, all with the same structure.
        concatenate: Backend function concatenating a list of arrays along dimension 0.

    Returns:
        The same structure, where arrays with at least one dimension are concatenated along dimension 0;
        dicts, tuples, named tuples and lists are merged item by item; ``None`` stays ``None``. Anything else
        (Python numbers, strings, 0-d tensors, other objects) becomes a list with one entry per chunk.
    """
    first = results[0]
    if first is None and all(result is None for result in results):
        return None
    if all(is_array(result) for result in results):
        return concatenate(list(results))
    if isinstance(first, Mapping) and all(
        isinstance(result, Mapping) and result.keys() == first.keys() for result in results
    ):
        return {key: concatenate_results([result[key] for result in results], concatenate) for key in first}
    if isinstance(first, (list, tuple)) and all(
        type(result) is type(first) and len(result) == len(first) for result in results
    ):
        items = [concatenate_results([result[i] for result in results], concatenate) for i in range(len(first))]
        if hasattr(first, "_fields"):
            return type(first)(*items)
        return type(first)(items)
    return list(results)


class WholeBatch:
    """Null chunking policy: the batch is one chunk (weight 1), its loss is used as it is.

    Used when no ``batch_chunk_size`` is given, so that the step is exactly the plain step.
    """

    batch_chunk_size: Optional[int] = None

    def split(self, batch: Any) -> list:
        """``[BatchChunk(batch, None, 1.0, True)]``: the batch is not inspected or copied."""
        return [BatchChunk(batch, None, 1.0, True)]

    def weigh_loss(self, loss: Any, chunk: BatchChunk) -> Any:
        """The loss itself (no extra operation, so gradients are bit-identical to an unchunked step)."""
        return loss

    def combine(self, values: Sequence[Any], chunks: Sequence[BatchChunk]) -> Any:
        """The value of the only chunk."""
        return values[0]

    def combine_outputs(self, outputs: Sequence[Any], chunks: Sequence[BatchChunk], concatenate: Concatenate) -> Any:
        """The model outputs of the only chunk."""
        return outputs[0]


class ChunkedBatch(WholeBatch):
    """Chunking policy: split every batch into chunks of at most ``batch_chunk_size`` samples.

    Args:
        batch_chunk_size: The most samples per chunk (int >= 1).

    Raises:
        ValueError: ``batch_chunk_size`` is not an int >= 1.
    """

    def __init__(self, batch_chunk_size: int):
        if validate_batch_chunk_size(batch_chunk_size) is None:
            raise ValueError("batch_chunk_size must be an int >= 1 for ChunkedBatch, got None")
        self.batch_chunk_size = batch_chunk_size

    def split(self, batch: Any) -> list:
        """See :func:`split_batch`."""
        return split_batch(batch, self.batch_chunk_size)

    def weigh_loss(self, loss: Any, chunk: BatchChunk) -> Any:
        """``loss * chunk.weight``: the chunk's share of the batch's mean loss."""
        return loss * chunk.weight

    def combine(self, values: Sequence[Any], chunks: Sequence[BatchChunk]) -> Any:
        """Sample-weighted mean of per-chunk means: ``sum_i weight_i * values[i]``."""
        return weighted_sum(values, [chunk.weight for chunk in chunks])

    def combine_outputs(self, outputs: Sequence[Any], chunks: Sequence[BatchChunk], concatenate: Concatenate) -> Any:
        """Model outputs of the whole batch from those of its chunks.

        Args:
            outputs: Per chunk, a ``ModelOutputs``-like named tuple ``(loss, num_samples, auxiliary_results)``.
            chunks: The chunks they belong to.
            concatenate: Backend function concatenating arrays along dimension 0.

        Returns:
            The same named tuple type with ``loss = sum_i weight_i * loss_i`` (the sample-weighted batch loss),
            ``num_samples`` the sum over the chunks and ``auxiliary_results`` merged by
            :func:`concatenate_results`.
        """
        return type(outputs[0])(
            self.combine([output.loss for output in outputs], chunks),
            sum_values([output.num_samples for output in outputs]),
            concatenate_results([output.auxiliary_results for output in outputs], concatenate),
        )


def batch_chunker(batch_chunk_size: Optional[int]) -> WholeBatch:
    """The chunking policy for ``batch_chunk_size``: :class:`WholeBatch` for ``None``, else :class:`ChunkedBatch`.

    Raises:
        ValueError: ``batch_chunk_size`` is neither ``None`` nor an int >= 1.
    """
    if validate_batch_chunk_size(batch_chunk_size) is None:
        return WholeBatch()
    return ChunkedBatch(batch_chunk_size)


class SerialGradientSync:
    """Null object for the gradient synchronisation of data-parallel training: nothing to synchronise.

    The trainer enters ``chunk_context(chunk)`` around the forward and backward pass of every chunk. A
    data-parallel implementation returns a context that suppresses the all-reduce of gradients (e.g.
    ``DistributedDataParallel.no_sync()``) for every chunk but the last (``chunk.is_last``), so gradients
    are synchronised once per batch.
    """

    def chunk_context(self, chunk: BatchChunk) -> AbstractContextManager:
        """A do-nothing context."""
        return nullcontext()
