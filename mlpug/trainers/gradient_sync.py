"""The gradient synchronisation protocol of data-parallel training, and its serial null object.

A backend trainer calls both methods in every step, unconditionally:

* ``chunk_context(chunk)`` is entered around the forward and backward pass of every chunk of a batch. A
  data-parallel implementation whose engine all-reduces during backward (PyTorch ``DistributedDataParallel``)
  returns a context that suppresses it (``no_sync()``) for every chunk but the last (``chunk.is_last``), so
  gradients are synchronised once per batch, not once per chunk.
* ``reduce(gradients)`` is called once per batch, after the gradients of all chunks were accumulated. An
  implementation whose engine expects explicitly reduced gradients (TensorFlow ``tf.distribute`` replica
  contexts) reduces them here; backends that keep gradients on their parameters pass ``None``.

:class:`GradientSync` is the single-process null object: nothing to synchronise.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

from mlpug.chunking import BatchChunk


class GradientSync:
    """Null object of gradient synchronisation (one process): a do-nothing context, gradients unchanged."""

    def chunk_context(self, chunk: BatchChunk) -> AbstractContextManager:
        """A do-nothing context (data-parallel: defer the all-reduce unless ``chunk.is_last``)."""
        return nullcontext()

    def reduce(self, gradients: Optional[list[Any]]) -> Optional[list[Any]]:
        """The gradients themselves (data-parallel: their all-reduced values)."""
        return gradients
