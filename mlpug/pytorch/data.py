"""PyTorch adapters of the resumable data order (:mod:`mlpug.data`).

Use :class:`ResumableBatchSampler` as the ``batch_sampler`` of a ``torch.utils.data.DataLoader`` (or build one
with :func:`resumable_data_loader`): the ``TrainingManager`` finds it as ``loader.batch_sampler``, sets the
epoch every epoch and, when resuming mid-epoch, the batch to start at, so no batch is loaded twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from mlpug.data import ResumableArrayBatches as _NeutralResumableArrayBatches
from mlpug.data import ResumableBatchSampler as _NeutralResumableBatchSampler
from mlpug.prefetch import BackgroundPrefetcher

__all__ = ["BackgroundPrefetcher", "ResumableArrayBatches", "ResumableBatchSampler", "resumable_data_loader"]


class ResumableBatchSampler(_NeutralResumableBatchSampler, torch.utils.data.Sampler):
    __doc__ = _NeutralResumableBatchSampler.__doc__

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        _NeutralResumableBatchSampler.__init__(self, num_samples, batch_size, shuffle, seed, drop_last)


class ResumableArrayBatches(_NeutralResumableArrayBatches):
    __doc__ = (_NeutralResumableArrayBatches.__doc__ or "") + (
        "\n    PyTorch: batches are converted with ``torch.as_tensor`` by default.\n"
    )

    def __init__(
        self,
        arrays: Sequence[Any],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        convert: Optional[Callable[[Any], Any]] = torch.as_tensor,
    ):
        super().__init__(arrays, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, convert=convert)


def resumable_data_loader(
    dataset: Any, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False, **loader_kwargs: Any
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over a map-style ``dataset`` whose batch order is resumable (see :mod:`mlpug.data`).

    Args:
        dataset: Map-style dataset (``__len__`` and ``__getitem__``).
        batch_size: Samples per batch.
        shuffle: Shuffle every epoch, from ``(seed, epoch)`` only.
        seed: Seed of the shuffle.
        drop_last: Drop a smaller last batch.
        **loader_kwargs: Other ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ``collate_fn``, ...);
            not ``batch_size``, ``shuffle``, ``sampler`` or ``drop_last``.

    Raises:
        TypeError: ``dataset`` has no ``len()``, or a ``DataLoader`` argument that conflicts with the sampler.
    """
    conflicting = sorted({"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"} & set(loader_kwargs))
    if conflicting:
        raise TypeError(f"resumable_data_loader: {conflicting} are set by the resumable batch sampler; remove them")
    try:
        num_samples = len(dataset)
    except TypeError:
        raise TypeError(
            f"dataset must be map-style with len(), got {type(dataset).__qualname__}; iterable datasets cannot "
            "start at an index (the manager skips batches for them)"
        ) from None
    sampler = ResumableBatchSampler(num_samples, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
