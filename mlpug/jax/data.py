"""JAX adapters of the resumable data order (:mod:`mlpug.data`).

:class:`ResumableArrayBatches` slices in-memory arrays into batches in an order that depends only on ``(seed, epoch)``
and can start at any batch, so that resuming mid-epoch is exact without replaying batches. Its batches are NumPy
arrays by default: the compiled step takes NumPy and JAX arrays alike (``jax.jit`` moves them to the device); pass
``convert=jax.numpy.asarray`` to move them earlier, e.g. in a ``BackgroundPrefetcher``. Any other iterable of
batches (NumPy or JAX arrays, e.g. a ``grain`` or ``tf.data`` pipeline of NumPy batches) works too; the manager skips
its batches on resume.
"""

from __future__ import annotations

from mlpug.data import ResumableArrayBatches, ResumableBatchSampler
from mlpug.prefetch import BackgroundPrefetcher

__all__ = ["BackgroundPrefetcher", "ResumableArrayBatches", "ResumableBatchSampler"]
