"""Gradient accumulation for the PyTorch step: the neutral chunking (:mod:`mlpug.chunking`) with torch operations.

Chunks are visited by the neutral Python loop; auxiliary results are merged with ``torch.cat`` (tensors with at
least one dimension, along dim 0) and ``torch.stack`` (0-d tensors, one entry per chunk).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from mlpug.chunking import BatchChunking
from mlpug.chunking import ChunkedBatch as _NeutralChunkedBatch
from mlpug.chunking import batch_chunker as _neutral_batch_chunker

__all__ = ["ChunkedBatch", "batch_chunker"]


class ChunkedBatch(_NeutralChunkedBatch):
    __doc__ = _NeutralChunkedBatch.__doc__

    def concatenate(self, arrays: list) -> Any:
        """``torch.cat(arrays)`` along dimension 0."""
        return torch.cat(arrays)

    def stack(self, scalars: list) -> Any:
        """``torch.stack(scalars)``: a vector with one entry per chunk."""
        return torch.stack(scalars)


def batch_chunker(batch_chunk_size: Optional[int]) -> BatchChunking:
    """The null policy for ``None``, else :class:`ChunkedBatch` (see :func:`mlpug.chunking.batch_chunker`)."""
    return _neutral_batch_chunker(batch_chunk_size, ChunkedBatch)
