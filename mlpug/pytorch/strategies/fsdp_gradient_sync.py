"""``FSDPGradientSync``: the gradient synchronisation of FSDP2 (see :mod:`mlpug.trainers.gradient_sync`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from torch.distributed.fsdp import FSDPModule

from mlpug.chunking import BatchChunk
from mlpug.trainers.gradient_sync import GradientSync


class FSDPGradientSync(GradientSync):
    """Gradient synchronisation of FSDP2: the reduce-scatter of gradients runs in the backward pass of the last
    chunk of a batch only (``set_requires_gradient_sync(False)`` for the chunks before it, which accumulate
    unsharded gradients locally).

    Args:
        model: The root FSDP module (the training model after ``fully_shard``).
    """

    def __init__(self, model: FSDPModule):
        self.model = model

    def chunk_context(self, chunk: BatchChunk) -> AbstractContextManager:
        return nullcontext() if chunk.is_last else self._no_sync()

    @contextmanager
    def _no_sync(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


@contextmanager
def _nothing() -> Iterator[None]:
    yield
