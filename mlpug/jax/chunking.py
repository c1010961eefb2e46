"""Gradient accumulation for the JAX step: the neutral rules of :mod:`mlpug.chunking`, run inside the compiled step
as one ``jax.lax.scan`` over the chunks.

Inside ``jax.jit`` every shape is static: a batch of ``B`` samples (``B`` known when tracing) in chunks of ``C``
is ``n = B // C`` equal chunks and, when ``r = B - n * C > 0``, a remainder chunk of ``r`` samples. The equal chunks
are one ``lax.scan`` over the batch reshaped to ``(n, C, ...)`` (the forward and backward pass traced and compiled
once, whatever ``n``); the remainder chunk is a second pass after the loop. The optimizers step once per batch.
Every chunk of a dict batch has the batch's keys in the order the user wrote them (the chunks are cut from the batch
with its dicts as :class:`~mlpug.jax.trainers.insertion_order_dict.InsertionOrderDict` s), so the rules that read a
batch's first part (bfloat16 ``autocast_inputs``, counting samples) see the same part in a chunk as in the batch.

The operations are those of the neutral rule, chunk after chunk and in its order
(:meth:`mlpug.chunking.ChunkedBatch.combine`): chunk ``i`` with ``n_i`` samples weighs its loss by ``n_i / B``; the
gradients are summed in chunk order in the scan's carry (which starts at ``-0.0``, the exact identity of float
addition, so the sum is that of the chunks' gradients from the first on); the batch's loss is
``sum_i (n_i / B) * loss_i``, also summed in chunk order; ``num_samples`` is ``B``. Auxiliary results follow
:func:`mlpug.chunking.merge_auxiliary_results`: arrays of one or more dimensions are concatenated along dimension 0
(the scan's stacked ``(n, C, ...)`` reshaped to ``(n * C, ...)``, then the remainder's), 0-d arrays become a vector
with one entry per chunk, and values that are not arrays must be the same in every chunk.

XLA compiles a loop body apart from the code around it and may fuse a multiply and an add into one rounding in one
place and not in another: the values agree with chunks unrolled at trace time to the last bit or so, not always bit
for bit. The scanned step is deterministic, so several steps per compiled call (the step itself scanned, see
:mod:`mlpug.jax.trainers.stacked`) equal one step per call bit for bit on CPU (tested).

The model's other variables (``nnx.Rngs`` counts, batch statistics) change from chunk to chunk: the chunk step
takes them and returns the new ones (a *carry*, :data:`CarryingChunkStep`), which the scan threads through the
chunks in order, so a dropout model draws in the same order as chunk after chunk. A batch that holds a sequence of
samples (a list of Python values rather than arrays) cannot be scanned and is run chunk after chunk while tracing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from mlpug.chunking import (
    BatchChunk,
    BatchChunking,
    ChunkResult,
    batch_num_samples,
    is_array,
    sample_parts,
    split_batch,
)
from mlpug.chunking import ChunkedBatch as _NeutralChunkedBatch
from mlpug.chunking import batch_chunker as _neutral_batch_chunker
from mlpug.jax.trainers.compilation import as_traceable, from_traceable
from mlpug.jax.trainers.insertion_order_dict import ordered_dicts
from mlpug.trainers.trainer import ModelOutputs

CarryingChunkStep = Callable[[BatchChunk, Any], tuple[ChunkResult, Any]]
"""``chunk_step(chunk, carry) -> (ChunkResult, new_carry)``: the forward and backward pass of one chunk, given the
values that the previous chunk left (a pytree of arrays whose shapes and dtypes the step keeps)."""


class ChunkedBatch(_NeutralChunkedBatch):
    """Gradient accumulation inside the compiled JAX step: a ``lax.scan`` over the equal chunks of a batch, then
    the remainder chunk (see the module docstring; the numbers are those of the neutral chunk-after-chunk rule).

    Args:
        batch_chunk_size: The most samples per chunk (int >= 1).

    Raises:
        ValueError: ``batch_chunk_size`` is not an int >= 1.
    """

    def concatenate(self, arrays: list) -> Any:
        """``jnp.concatenate`` along dimension 0."""
        return jnp.concatenate(arrays, axis=0)

    def stack(self, scalars: list) -> Any:
        """``jnp.stack``: one entry per chunk."""
        return jnp.stack(scalars)

    def weigh_loss(self, loss: Any, chunk: BatchChunk) -> Any:
        """``loss * weight`` in the loss's dtype."""
        return loss * jnp.asarray(chunk.weight, dtype=loss.dtype)

    def run_carrying(
        self, chunk_step: CarryingChunkStep, batch: Any, carry: Any, gradients_like: Sequence[Any]
    ) -> tuple[ChunkResult, Any]:
        """The forward and backward pass of every chunk of ``batch`` (inside a trace), ``carry`` threaded through
        them in order; the combined result of the batch (module docstring) and the carry after the last chunk.

        Args:
            chunk_step: See :data:`CarryingChunkStep`; its gradients are a list of arrays.
            batch: The traced batch: an array or a tuple/list/dict of arrays with the same first dimension
                (samples), or one holding a sequence of samples (then unrolled).
            carry: What the first chunk gets (a pytree of arrays; None for none).
            gradients_like: Arrays (or ``jax.ShapeDtypeStruct`` s) with the shapes and dtypes of the gradients
                that ``chunk_step`` returns, in their order (the trained values): the scan's gradient sum starts
                as ``-0.0`` in them.

        Returns:
            ``(ChunkResult(ModelOutputs(loss, num_samples, auxiliary_results), gradients), carry)``.

        Raises:
            TypeError: The batch (or a part of it) cannot be split (its type and position are named).
            ValueError: Its parts have different numbers of samples, or a value among the auxiliary results that
                is not an array differs between chunks.
        """
        if not all(is_array(part) for _, part in sample_parts(batch)):  # a sequence of samples: no scan over it
            return self._run_unrolled(chunk_step, batch, carry)
        total, size = batch_num_samples(batch), self.batch_chunk_size
        ordered = ordered_dicts(batch)  # pytree functions rebuild plain dicts sorted: the chunks keep the user's order
        count, remainder = divmod(total, size)
        gradient_sum = [jnp.full(jnp.shape(like), -0.0, like.dtype) for like in gradients_like]  # -0.0 + g == g
        loss_sum: Any = None
        parts: list[tuple[Any, bool]] = []  # the traced auxiliary results, and whether stacked over chunks
        if count:
            weight = size / total

            def body(state: tuple, inputs: tuple) -> tuple:
                carried, gradient_sum = state
                index, data = inputs
                is_last = (index == count - 1) if remainder == 0 else False
                result, carried = chunk_step(BatchChunk(from_traceable(data), size, weight, is_last), carried)
                return (carried, _add(gradient_sum, result)), self._traced(result.outputs)

            chunks = jax.tree_util.tree_map(lambda part: _equal_chunks(part, count, size), ordered)
            scanned: tuple[Any, Any, Any]
            (carry, gradient_sum), scanned = lax.scan(body, (carry, gradient_sum), (jnp.arange(count), chunks))
            losses, _, auxiliary = scanned
            loss_sum, _ = lax.scan(
                lambda total_loss, loss: (total_loss + loss * weight, None), jnp.asarray(-0.0, losses.dtype), losses
            )
            parts.append((auxiliary, True))
        if remainder:
            data = from_traceable(jax.tree_util.tree_map(lambda part: part[count * size :], ordered))
            result, carry = chunk_step(BatchChunk(data, remainder, remainder / total, True), carry)
            gradient_sum = _add(gradient_sum, result)
            loss, _, auxiliary = self._traced(result.outputs)
            weighted = loss * (remainder / total)
            loss_sum = weighted if loss_sum is None else loss_sum + weighted
            parts.append((auxiliary, False))
        outputs = ModelOutputs(loss_sum, total, self._merge_auxiliary_results(parts))
        return ChunkResult(outputs, gradient_sum), carry

    def _traced(self, outputs: ModelOutputs) -> tuple:
        """A chunk's ``(loss, num_samples, auxiliary_results)`` as a scan can return them (the loss 0-d, values
        that are not arrays as static values)."""
        return as_traceable(
            (jnp.reshape(outputs.loss, ()), outputs.num_samples, outputs.auxiliary_results), "the model's outputs"
        )

    def _merge_auxiliary_results(self, parts: list[tuple[Any, bool]]) -> Any:
        """The batch's auxiliary results from those of the scanned chunks (stacked: one entry per chunk along a new
        first dimension) and of the remainder chunk (module docstring).

        Raises:
            ValueError: A value that is not an array differs between the scanned chunks and the remainder chunk.
        """
        structures = [jax.tree_util.tree_structure(auxiliary) for auxiliary, _ in parts]
        if len(set(structures)) > 1:
            equal, last = (from_traceable(auxiliary) for auxiliary, _ in parts)
            raise ValueError(
                "with batch_chunk_size, the chunks of a batch returned different auxiliary_results: "
                f"{equal!r:.120} in the chunks of batch_chunk_size samples, {last!r:.120} in the last, smaller "
                "chunk. Values that are not arrays are kept once and must be the same in every chunk; return a "
                "value that differs per chunk as an array (0-d arrays are stacked, one entry per chunk; others are "
                "concatenated along dimension 0)"
            )
        leaves = [jax.tree_util.tree_leaves(auxiliary) for auxiliary, _ in parts]
        stacked = [is_stacked for _, is_stacked in parts]
        merged = [_merge_leaf(list(zip(values, stacked))) for values in zip(*leaves)]
        return from_traceable(jax.tree_util.tree_unflatten(structures[0], merged))

    def _run_unrolled(self, chunk_step: CarryingChunkStep, batch: Any, carry: Any) -> tuple[ChunkResult, Any]:
        """Chunk after chunk while tracing (the neutral split and combination), for a batch that holds a sequence
        of samples."""
        chunks = split_batch(batch, self.batch_chunk_size)
        results = []
        for chunk in chunks:
            result, carry = chunk_step(chunk, carry)
            results.append(result)
        return self.combine(results, chunks), carry


def _equal_chunks(part: Any, count: int, size: int) -> Any:
    """The first ``count * size`` samples of ``part`` as ``(count, size, ...)``."""
    return jnp.reshape(part[: count * size], (count, size, *part.shape[1:]))


def _add(gradient_sum: list, result: ChunkResult) -> list:
    """``gradient_sum`` plus the gradients of one chunk's ``result``, element by element."""
    assert result.gradients is not None  # the JAX chunk step returns its gradients (a list of arrays)
    return [old + new for old, new in zip(gradient_sum, result.gradients)]


def _merge_leaf(pieces: list[tuple[Any, bool]]) -> Any:
    """One auxiliary array of the batch from its pieces ``(value, stacked)``: a stacked piece holds one entry per
    chunk along its first dimension, the other one chunk's value. Arrays of one or more dimensions per chunk are
    concatenated along the samples, 0-d arrays stacked into a vector (the neutral merge rule)."""
    per_chunk = [value if stacked else value[None] for value, stacked in pieces]
    if per_chunk[0].ndim >= 2:  # arrays of one or more dimensions per chunk: their samples one after the other
        per_chunk = [jnp.reshape(value, (-1, *value.shape[2:])) for value in per_chunk]
    return per_chunk[0] if len(per_chunk) == 1 else jnp.concatenate(per_chunk, axis=0)


def run_chunks(
    chunking: BatchChunking, chunk_step: CarryingChunkStep, batch: Any, carry: Any, gradients_like: Sequence[Any]
) -> tuple[ChunkResult, Any]:
    """Run ``chunk_step`` on ``batch`` under the policy ``chunking``: the null policy (no ``batch_chunk_size``)
    calls it once on the whole batch (weight 1, so the step is exactly the plain step); :class:`ChunkedBatch` scans
    the chunks (:meth:`ChunkedBatch.run_carrying`).

    Args:
        chunking: What :func:`batch_chunker` returned.
        chunk_step: See :data:`CarryingChunkStep`.
        batch: The traced batch.
        carry: The values the first (or only) chunk gets.
        gradients_like: The values whose shapes and dtypes the gradients have (see
            :meth:`ChunkedBatch.run_carrying`).

    Returns:
        The batch's :class:`~mlpug.chunking.ChunkResult` and the carry after its last chunk.
    """
    if isinstance(chunking, ChunkedBatch):
        return chunking.run_carrying(chunk_step, batch, carry, gradients_like)
    return chunk_step(BatchChunk(batch, None, 1.0, True), carry)


def batch_chunker(batch_chunk_size: Optional[int]) -> BatchChunking:
    """The null policy for ``None``, else :class:`ChunkedBatch` (see :func:`mlpug.chunking.batch_chunker`).

    Raises:
        ValueError: ``batch_chunk_size`` is neither None nor an int >= 1.
    """
    return _neutral_batch_chunker(batch_chunk_size, ChunkedBatch)
