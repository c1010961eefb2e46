"""Gradient accumulation for the JAX step: the neutral rules of :mod:`mlpug.chunking`, run inside the compiled step.

Inside ``jax.jit`` every shape is static, so the neutral :meth:`mlpug.chunking.ChunkedBatch.run` splits the batch
(traced arrays, sliced along the first dimension) into ``ceil(B / C)`` chunks with a Python loop while tracing: the
compiled step holds one forward and backward pass per chunk, their gradients summed, and the optimizers step once
per batch. Chunk ``i`` with ``n_i`` samples weighs its loss by ``n_i / B``; the batch's loss is the weighted sum,
its auxiliary results are merged by the neutral rule with ``jnp.concatenate`` / ``jnp.stack``. A batch of another
size (the short last batch) is another trace, with its own number of chunks.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp

from mlpug.chunking import BatchChunk, BatchChunking
from mlpug.chunking import ChunkedBatch as _NeutralChunkedBatch
from mlpug.chunking import batch_chunker as _neutral_batch_chunker


class ChunkedBatch(_NeutralChunkedBatch):
    __doc__ = _NeutralChunkedBatch.__doc__

    def concatenate(self, arrays: list) -> Any:
        """``jnp.concatenate`` along dimension 0."""
        return jnp.concatenate(arrays, axis=0)

    def stack(self, scalars: list) -> Any:
        """``jnp.stack``: one entry per chunk."""
        return jnp.stack(scalars)

    def weigh_loss(self, loss: Any, chunk: BatchChunk) -> Any:
        """``loss * weight`` in the loss's dtype."""
        return loss * jnp.asarray(chunk.weight, dtype=loss.dtype)


def batch_chunker(batch_chunk_size: Optional[int]) -> BatchChunking:
    """The null policy for ``None``, else :class:`ChunkedBatch` (see :func:`mlpug.chunking.batch_chunker`).

    Raises:
        ValueError: ``batch_chunk_size`` is neither None nor an int >= 1.
    """
    return _neutral_batch_chunker(batch_chunk_size, ChunkedBatch)
