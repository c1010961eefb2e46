"""Resumable data order: batches whose order depends only on a seed and the epoch, startable at any batch.

Exact resume needs the data of the remaining batches of an epoch without replaying the batches before them.
:class:`ResumableBatchSampler` draws the permutation of an epoch from ``(seed, epoch)`` alone (NumPy's
``default_rng([seed, epoch])``, a PCG64 stream seeded through ``SeedSequence``), so a new process computes
the same order and starts at a batch position by slicing it. The ``TrainingManager`` drives the protocol
through :func:`epoch_iterator` every epoch:

* an object is *resumable* when it has ``set_epoch(epoch)``, ``set_start(batch_step)`` and ``get_state()``;
  the training dataset itself, or its ``batch_sampler`` attribute (a ``torch.utils.data.DataLoader`` built
  with ``batch_sampler=``), may be it;
* other iterables start at a position by skipping batches (iterating and dropping them), with a warning
  that says so: exact only when the iterable yields the same order on every pass.

Backends adapt these classes (``mlpug.pytorch.data``, ``mlpug.tensorflow.data``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional

import numpy as np

_log = logging.getLogger("mlpug.data")


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class ResumableBatchSampler:
    """Batches of sample indices, shuffled per epoch from ``(seed, epoch)`` only, startable at any batch.

    Iterating yields lists of ``batch_size`` int indices into a map-style dataset of ``num_samples`` samples
    (the last batch is smaller unless ``drop_last``). The order of epoch ``e`` is
    ``numpy.random.default_rng([seed, e]).permutation(num_samples)`` (or ``range(num_samples)`` without
    shuffling); it does not depend on any global random state or on how many epochs ran before, so a
    resumed process reproduces it exactly.

    Args:
        num_samples: Number of samples in the dataset (>= 1).
        batch_size: Samples per batch (>= 1).
        shuffle: Shuffle the samples every epoch.
        seed: Seed of the per-epoch permutations (int >= 0).
        drop_last: Drop the last batch of an epoch when it is smaller than ``batch_size``.

    Raises:
        ValueError: A count or the seed is not a valid int, or ``drop_last`` leaves no batch.
    """

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        _check_int(num_samples, "num_samples", 1)
        _check_int(batch_size, "batch_size", 1)
        _check_int(seed, "seed", 0)
        if drop_last and batch_size > num_samples:
            raise ValueError(f"drop_last=True with batch_size {batch_size} > num_samples {num_samples} leaves no batch")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._start = 0
        self.rank, self.world_size = 0, 1

    def set_shard(self, rank: int, world_size: int) -> None:
        """Yield only rank ``rank``'s part of every batch, of ``world_size`` ranks (data-parallel training).

        Batch ``k`` of the epoch is then split from global batch ``k``, the samples
        ``order[k * B * W:(k + 1) * B * W]`` (``B = batch_size`` per rank, ``W = world_size``): rank ``r`` gets its
        samples ``r, r + W, ...``. A last global batch whose size is not a multiple of ``W`` is padded with samples
        from the start of the epoch's order (as ``DistributedSampler`` pads), so all ranks have the same number of
        batches of equal size. Over all ranks, an epoch is the epoch of one process with batch size ``B * W``.

        Raises:
            ValueError: ``rank`` is not in ``[0, world_size)``, or the data has fewer samples than ranks.
        """
        _check_int(world_size, "world_size", 1)
        _check_int(rank, "rank", 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size {world_size}, got {rank}")
        if self.num_samples < world_size:
            raise ValueError(f"{self.num_samples} samples cannot be shared by {world_size} ranks")
        self.rank, self.world_size = int(rank), int(world_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (0-based) for the following passes."""
        _check_int(epoch, "epoch", 0)
        self.epoch = int(epoch)

    def set_start(self, batch_step: int) -> None:
        """Make the *next* pass start at batch ``batch_step`` of the epoch (later passes start at 0 again)."""
        _check_int(batch_step, "batch_step", 0)
        self._start = int(batch_step)

    def epoch_order(self, epoch: Optional[int] = None) -> np.ndarray:
        """Sample indices of the whole epoch, int64 [num_samples], in training order."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __len__(self) -> int:
        """Batches in a whole epoch (independent of the start position)."""
        global_batch_size = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_samples // global_batch_size
        return -(-self.num_samples // global_batch_size)

    def __iter__(self) -> Iterator[list]:
        start, self._start = self._start, 0
        order = self.epoch_order()
        size, rank, world_size = self.batch_size * self.world_size, self.rank, self.world_size
        for batch_step in range(start, len(self)):
            indices = order[batch_step * size : (batch_step + 1) * size]
            if world_size > 1:
                short = -len(indices) % world_size
                if short:
                    indices = np.concatenate([indices, order[:short]])
                indices = indices[rank::world_size]
            yield indices.tolist()

    def get_state(self) -> dict:
        """What defines the order (not the position, which the manager's counters hold); sharded, also the
        ``world_size`` (resuming on another number of ranks would mean other batches)."""
        state = {
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
        }
        if self.world_size > 1:
            state["world_size"] = self.world_size
        return state

    def check_state(self, state: dict, source: str = "the checkpoint") -> None:
        """Raise when ``state`` (from :meth:`get_state`) defines another order than this sampler.

        The order is that of the global batches (``batch_size`` per rank x ``world_size``): a state of another
        number of ranks with the same global batch (e.g. 2 ranks x 8 and 1 process x 16) continues with the same
        samples in every step (only a last, short batch that does not divide by the ranks is padded differently).

        Raises:
            ValueError: Naming every setting that differs, with both values.
        """

        def global_batch(settings: dict) -> dict:
            settings = dict(settings)
            world_size = settings.pop("world_size", 1)
            batch_size = settings.pop("batch_size", None)
            settings["batch_size x world_size"] = None if batch_size is None else batch_size * world_size
            return settings

        own, saved = global_batch(self.get_state()), global_batch(state)
        differences = [
            f"{key}: {saved.get(key)!r} there, {value!r} here" for key, value in own.items() if saved.get(key) != value
        ]
        if differences:
            raise ValueError(
                f"{source}: the training data order differs from the one it was saved with, so resuming would "
                f"not continue the same run ({'; '.join(differences)})"
            )


class ResumableArrayBatches:
    """Iterable of batches sliced from in-memory arrays, in a :class:`ResumableBatchSampler` order.

    Each batch is a tuple with, per array, the rows of the batch (``array[indices]``): e.g. images
    [B, 28, 28] and labels [B]. Useful for TensorFlow and any backend that trains on NumPy batches.

    Args:
        arrays: Arrays with the same first dimension (samples), e.g. ``(images, labels)``.
        batch_size: Samples per batch.
        shuffle: Shuffle every epoch (see :class:`ResumableBatchSampler`).
        seed: Seed of the shuffle.
        drop_last: Drop a smaller last batch.
        convert: Applied to every batch array (e.g. ``tf.convert_to_tensor``); default none.

    Raises:
        ValueError: No arrays, or arrays of different lengths.
    """

    def __init__(
        self,
        arrays: Sequence[Any],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        convert: Any = None,
    ):
        if isinstance(arrays, np.ndarray) or not isinstance(arrays, (list, tuple)) or not arrays:
            raise ValueError(f"arrays must be a non-empty list/tuple of arrays, got {type(arrays).__qualname__}")
        lengths = [len(array) for array in arrays]
        if len(set(lengths)) != 1:
            raise ValueError(f"arrays must all have the same number of samples, got lengths {lengths}")
        self.arrays = tuple(arrays)
        self.convert = convert
        self.batch_sampler = ResumableBatchSampler(lengths[0], batch_size, shuffle, seed, drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def set_start(self, batch_step: int) -> None:
        self.batch_sampler.set_start(batch_step)

    def set_shard(self, rank: int, world_size: int) -> None:
        """Training on ``world_size`` ranks: see :meth:`ResumableBatchSampler.set_shard`."""
        self.batch_sampler.set_shard(rank, world_size)

    def shard(self, rank: int, world_size: int) -> ResumableArrayBatches:
        """For evaluation on ``world_size`` ranks: a copy over the samples ``rank, rank + world_size, ...`` only,
        unpadded, so that over all ranks every sample counts once."""
        sampler = self.batch_sampler
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.arrays = tuple(array[rank::world_size] for array in self.arrays)
        copy.batch_sampler = ResumableBatchSampler(
            len(copy.arrays[0]), sampler.batch_size, sampler.shuffle, sampler.seed, sampler.drop_last
        )
        return copy

    def get_state(self) -> dict:
        return self.batch_sampler.get_state()

    def check_state(self, state: dict, source: str = "the checkpoint") -> None:
        self.batch_sampler.check_state(state, source)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple]:
        convert = self.convert
        for indices in self.batch_sampler:
            batch = tuple(array[indices] for array in self.arrays)
            yield tuple(convert(item) for item in batch) if convert is not None else batch


def is_resumable(obj: Any) -> bool:
    """True when ``obj`` implements the resumable protocol (``set_epoch``, ``set_start``, ``get_state``)."""
    return all(callable(getattr(obj, name, None)) for name in ("set_epoch", "set_start", "get_state"))


def find_resumable(dataset: Any) -> Optional[Any]:
    """The object that controls ``dataset``'s order: ``dataset`` itself or its ``batch_sampler``, else None."""
    if is_resumable(dataset):
        return dataset
    batch_sampler = getattr(dataset, "batch_sampler", None)
    return batch_sampler if is_resumable(batch_sampler) else None


def epoch_iterator(dataset: Iterable, epoch: int, start_batch: int = 0) -> Iterator:
    """A fresh iterator over the batches of ``epoch``, starting at batch ``start_batch``.

    Resumable datasets (see :func:`find_resumable`) get ``set_epoch`` and ``set_start`` and start by index.
    For other iterables an object with ``set_epoch`` (the dataset or its ``sampler``, e.g. a
    ``DistributedSampler``) still gets the epoch, and ``start_batch > 0`` skips batches with a warning.

    Args:
        dataset: The training dataset (iterable of batches).
        epoch: 0-based epoch.
        start_batch: 0-based batch step to start at.

    Returns:
        An iterator whose first item is batch ``start_batch`` of the epoch.
    """
    resumable = find_resumable(dataset)
    if resumable is not None:
        resumable.set_epoch(epoch)
        resumable.set_start(start_batch)
        return iter(dataset)
    for candidate in (dataset, getattr(dataset, "sampler", None)):
        set_epoch = getattr(candidate, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            break
    iterator = iter(dataset)
    if start_batch > 0:
        _log.warning(
            f"The training dataset ({type(dataset).__qualname__}) cannot start at a position, so {start_batch} "
            f"batches of epoch {epoch} are skipped by loading and dropping them; the resume is exact when its "
            "order is the same on every pass or drawn from the random states a checkpoint restores (as "
            "DataLoader(shuffle=True) draws it), and loading draws no other random numbers. Use "
            "mlpug.data.ResumableBatchSampler (PyTorch: mlp.data.ResumableBatchSampler as DataLoader batch_sampler) "
            "to start by index."
        )
        _skip(iterator, start_batch)
    return iterator


def known_length(dataset: Any) -> tuple[Optional[int], str]:
    """``(len(dataset), "")``, or ``(None, why)`` when it has no known length: no ``len()``, or one that raises
    ``TypeError`` (``tf.data`` after ``filter()``, ``repeat()`` or ``from_generator()``)."""
    try:
        return len(dataset), ""
    except TypeError as error:
        return None, str(error)


class DataSource:
    """How the manager gets the batches of every epoch from the training dataset (chosen by the trainer:
    ``BackendTrainer.training_data_source``, so that backends can add their datasets' needs).

    The default is :func:`epoch_iterator`: resumable datasets start by index; other iterables are iterated anew
    every epoch and a mid-epoch resume skips batches. The manager creates the iterator with the random states it
    was created with in the original run (saved in training checkpoints), so an order drawn from the global
    generators when the iterator is created (e.g. ``DataLoader(shuffle=True)``) is the same after a resume.

    Args:
        dataset: The training dataset (an iterable of batches).
    """

    def __init__(self, dataset: Iterable):
        self.dataset = dataset

    def epoch_iterator(self, epoch: int, start_batch: int, num_batches_per_epoch: int) -> Iterator:
        """An iterator whose first item is batch ``start_batch`` of ``epoch`` (0-based)."""
        return epoch_iterator(self.dataset, epoch, start_batch)


class ReplayedDataSource(DataSource):
    """For iterables whose order in an epoch depends on how many iterators were created before, e.g. a
    ``tf.data`` pipeline with ``shuffle(reshuffle_each_iteration=True)``: a resumed process first creates (and
    drops, unread) the iterators of the epochs before the one it resumes, so that epoch ``e`` gets the order it had
    in the original run (when the pipeline's random seeds are the same, see the backend)."""

    def __init__(self, dataset: Iterable):
        super().__init__(dataset)
        self._created = 0

    def epoch_iterator(self, epoch: int, start_batch: int, num_batches_per_epoch: int) -> Iterator:
        while self._created < epoch:
            iter(self.dataset)
            self._created += 1
        self._created = epoch + 1
        return super().epoch_iterator(epoch, start_batch, num_batches_per_epoch)


class ContinuedDataSource(DataSource):
    """For infinite iterables (e.g. ``tf.data`` with ``repeat()``): one iterator for the whole run, of which every
    epoch takes the next ``num_batches_per_epoch`` batches, instead of starting again at the first batch every
    epoch. A resumed process skips the batches trained before (loading and dropping them, with a warning): exact
    when the iterable yields the same sequence in every process."""

    def __init__(self, dataset: Iterable):
        super().__init__(dataset)
        self._iterator: Optional[Iterator] = None

    def epoch_iterator(self, epoch: int, start_batch: int, num_batches_per_epoch: int) -> Iterator:
        if self._iterator is None:
            self._iterator = iter(self.dataset)
            skip = epoch * num_batches_per_epoch + start_batch
            if skip:
                _log.warning(
                    f"The training dataset ({type(self.dataset).__qualname__}) is infinite and cannot start at a "
                    f"position, so the {skip} batches trained before are skipped by loading and dropping them; the "
                    "resume is exact only if it yields the same sequence in every process."
                )
                _skip(self._iterator, skip)
        return self._iterator


def _skip(iterator: Iterator, count: int) -> None:
    """Load and drop ``count`` batches now (not lazily: an order drawn when the first batch is requested, as
    ``DataLoader(shuffle=True)`` draws it, must be drawn with the random states the iterator was created with)."""
    for _ in itertools.islice(iterator, count):
        pass


def get_data_state(dataset: Any) -> dict:
    """Order-defining state of the training dataset for checkpoints (``{}`` when it is not resumable)."""
    resumable = find_resumable(dataset)
    return {"order": resumable.get_state()} if resumable is not None else {}


def check_data_state(dataset: Any, state: dict, source: str = "the checkpoint") -> None:
    """Raise ``ValueError`` when the dataset's order differs from the one saved in ``state``."""
    resumable = find_resumable(dataset)
    saved = state.get("order") if state else None
    if resumable is None or saved is None:
        return
    if callable(getattr(resumable, "check_state", None)):
        resumable.check_state(saved, source)
    elif resumable.get_state() != saved:
        raise ValueError(
            f"{source}: the training data order {saved!r} differs from this dataset's {resumable.get_state()!r}"
        )


def close_iterator(iterator: Any) -> None:
    """Close an epoch's iterator that training leaves early (stop, signal, error), when it can be closed (a
    generator, a prefetching iterator, ...): threads and files behind it end now, not when it is collected."""
    close = getattr(iterator, "close", None)
    if callable(close):
        close()
