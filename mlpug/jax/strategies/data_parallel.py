"""``DataParallelStrategy``: data-parallel training over a 1-D ``jax.sharding.Mesh`` of devices.

Every batch array is split along its sample axis over the mesh's devices (``NamedSharding(mesh, P("data"))``) and
the training state (parameters, optimizer states, the model's other variables) is replicated on every device
(``NamedSharding(mesh, P())``). The compiled step is the single-device step: ``jax.jit`` partitions it by the
shardings of its inputs, each device computes its part of the forward and backward pass, and XLA inserts the
all-reduce where the loss (the mean over the *global* batch) and so its gradient need every device's part. No
gradient synchronisation code runs: one step over the mesh computes what one device computes on the whole batch
(up to the order of floating-point sums), including gradient accumulation (the chunks are slices of the global
batch), clipping (of the global gradient) and the non-finite policies (of the global loss).

Evaluation runs sharded the same way; its loss, auxiliary results and metrics are those of the global batch.
With several processes, each evaluates an unpadded copy of its share of the samples
(:meth:`DataParallelStrategy.evaluation_dataset`), and asynchronous evaluation is refused
(:meth:`DataParallelStrategy.check_asynchronous_evaluation`).
Checkpoints read the replicated state (one copy), so they are the files of one device.

Several processes (``jax.distributed.initialize``, see :mod:`mlpug.jax.distributed`): the mesh spans the devices of
every process, each process feeds its part of every global batch (its ``rank``-th share of the samples, see
:meth:`DataParallelStrategy.training_dataset`), the arrays it gives are joined into one global array
(``jax.make_array_from_process_local_data``), and the parameters are broadcast from process 0 when the training
model is set, so that every process starts from the same weights. The compiled step sees the global batch; what it
returns per sample (auxiliary results) and its sample count are given back as this process's part
(:meth:`DataParallelStrategy.local_outputs`, :meth:`DataParallelStrategy.local_num_samples`), the loss as this
process's copy of the global batch's; auxiliary results reduced over the batch (0-d or replicated: a sum, a count)
are refused, since they would be the global batch's while the metric's batch and sample count are this process's.
Values without a sample axis in a batch are refused too, and the datasets' batch sizes (and the evaluation shards'
lengths, over the processes) are checked before training starts, so that no process fails or hangs mid-epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.nnx import graphlib
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlpug.chunking import infer_num_samples
from mlpug.distributed import DistributedContext, SerialContext
from mlpug.jax.strategies.jax_strategy import JaxStrategy, Tree

AXIS_NAME = "data"
"""The name of the mesh axis that the batches are split along."""


_log = logging.getLogger("mlpug.jax.strategies")


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


def _where(path: tuple) -> str:
    """``batch[0]``, ``batch['x']``: an array's position in the batch, for messages."""
    return f"batch{jax.tree_util.keystr(path)}" if path else "the batch"


def _sample_count(batch: Any, batch_axis: int) -> Optional[int]:
    """The samples of ``batch``: the size along ``batch_axis`` of its first part, as the trainer counts them
    (:func:`mlpug.chunking.infer_num_samples`); when that part has no such axis, of its first array that has one;
    None when no array has."""

    def size(array: Any) -> Optional[int]:
        return int(np.shape(array)[batch_axis]) if np.ndim(array) > batch_axis else None

    try:
        counted = infer_num_samples(batch, size)
    except TypeError:
        counted = None
    if isinstance(counted, int):
        return counted
    for value in jax.tree_util.tree_leaves(batch):
        if _is_array(value) and np.ndim(value) > batch_axis:
            return size(value)
    return None


def _check_devices(devices: Optional[Sequence[Any]]) -> list[Any]:
    """The mesh's devices: ``devices`` as a list, or all devices (of every process) when None.

    Raises:
        TypeError: ``devices`` is not a sequence of ``jax.Device`` s.
        ValueError: ``devices`` is empty or names a device twice, a device of this process is not among them while
            several processes train, or the processes would hold different numbers of the mesh's devices.
    """
    if devices is None:
        return list(jax.devices())
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(f"devices must be None or a sequence of jax.Device (e.g. jax.devices()), got {devices!r:.100}")
    devices = list(devices)
    wrong = [device for device in devices if not isinstance(device, jax.Device)]
    if wrong:
        raise TypeError(
            f"devices must be jax.Device objects (e.g. jax.devices()[:4]), got {type(wrong[0]).__qualname__} "
            f"{wrong[0]!r:.100}"
        )
    if not devices:
        raise ValueError("devices is empty: give at least one jax.Device, or None for all devices")
    if len({device.id for device in devices}) != len(devices):
        raise ValueError(f"devices names a device twice: {devices}")
    per_process: dict[int, int] = {}
    for device in devices:
        per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
    if jax.process_count() > 1:
        if sorted(per_process) != list(range(jax.process_count())) or len(set(per_process.values())) != 1:
            raise ValueError(
                f"with {jax.process_count()} processes, the mesh needs the same number of devices of every process, "
                f"but devices holds per process {dict(sorted(per_process.items()))}"
            )
    return devices


class DataParallelStrategy(JaxStrategy):
    """Data-parallel training on a 1-D ``jax.sharding.Mesh`` (axis ``"data"``): batches split over its devices, the
    training state replicated (see the module docstring); ``DefaultTrainer(strategy="data_parallel")`` makes one
    over all devices.

    Args:
        devices: The mesh's ``jax.Device`` s, e.g. ``jax.devices()[:4]`` (order = the order of the batch's parts);
            default all devices of every process (``jax.devices()``). On a CPU,
            ``XLA_FLAGS=--xla_force_host_platform_device_count=4``, set before JAX is first imported, gives four
            devices.

    Attributes:
        mesh: The ``jax.sharding.Mesh`` of the devices, one axis named ``"data"``.
        replicated: ``NamedSharding(mesh, P())``, where the training state lives.
        num_devices: The mesh's devices (of all processes).

    Batches: every array of a batch with the batch's sample count along its sample axis is split along it into
    ``num_devices`` equal parts, so the batch size should be a multiple of ``num_devices``. In one process, a batch
    that is not (e.g. the short last batch of an epoch) runs replicated, every device computing all of it (exact,
    without a speed-up; a warning names its size once); with several processes, each process's batches must be a
    multiple of its devices in the mesh (``ValueError`` otherwise; the sizes of the datasets' batches, the last one
    included, are checked before training and evaluation start: :meth:`training_dataset`,
    :meth:`evaluation_dataset`). In one process, other arrays (0-d values, per-batch constants of another size) are
    replicated; with several processes they are refused; see :meth:`place_batch`.

    Raises:
        TypeError / ValueError: Bad ``devices`` (see :func:`_check_devices`: the message names what is wrong).
    """

    name = "data_parallel"

    def __init__(self, devices: Optional[Sequence[Any]] = None):
        self.devices = _check_devices(devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS_NAME,))
        self.replicated = NamedSharding(self.mesh, P())
        self.num_devices = len(self.devices)
        self._devices = set(self.devices)
        self._warned_sizes: set[int] = set()  # the batch sizes run replicated that a warning named
        self.num_processes = jax.process_count()
        self.num_local_devices = sum(1 for device in self.devices if device.process_index == jax.process_index())
        self._first_local_device = next(
            (device for device in self.devices if device.process_index == jax.process_index()), None
        )
        if self.num_processes > 1:
            from mlpug.jax.distributed import JaxProcessContext

            self._context: DistributedContext = JaxProcessContext()
        else:
            missing = [device for device in self.devices if device not in jax.local_devices()]
            if missing:
                raise ValueError(f"devices {missing} are not devices of this process: {jax.local_devices()}")
            self._context = SerialContext()

    def distributed_context(self) -> DistributedContext:
        """One process: the serial context (the mesh's collectives are inside the compiled step); several: the
        processes' context (:class:`mlpug.jax.distributed.JaxProcessContext`)."""
        return self._context

    # ----- placement -----
    def batch_sharding(self, num_dimensions: int, batch_axis: int = 0) -> NamedSharding:
        """The sharding of a batch array of ``num_dimensions`` dimensions: split along ``batch_axis``, replicated
        when it has no such axis."""
        if num_dimensions <= batch_axis:
            return self.replicated
        return NamedSharding(self.mesh, P(*([None] * batch_axis), AXIS_NAME))

    def place_state(self, tree: Tree) -> Tree:
        """New arrays of ``tree``'s arrays, replicated on every device of the mesh (what is not an array stays)."""
        return jax.tree_util.tree_map(self._replicate, tree)

    def _replicate(self, value: Any) -> Any:
        if not _is_array(value):
            return value
        if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            data = self._replicate(jax.random.key_data(value))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
        if self.num_processes == 1:
            return jax.device_put(value, self.replicated, may_alias=False)
        if isinstance(value, jax.Array) and not value.is_fully_addressable:  # a global array already (every process)
            return jax.jit(jnp.copy, out_shardings=self.replicated)(value)
        return jax.make_array_from_process_local_data(self.replicated, np.asarray(value))

    def place_batch(self, batch: Tree, batch_axis: int = 0) -> Tree:
        """``batch`` with every array of the batch's sample count split along ``batch_axis`` over the mesh (other
        arrays replicated, see below); values that are not arrays as they are. With several processes, each array
        is this process's part of the global batch.

        The sample count is that of the batch's first part (:func:`mlpug.chunking.infer_num_samples`, along
        ``batch_axis``), the count the trainer weighs the batch with. No state is kept: every batch is placed alike
        (so a run resumed at any batch places it as the run before did).

        * One process: an array with another size along ``batch_axis`` (a per-batch constant, e.g. class weights
          ``[C]``) and 0-d arrays are replicated. A batch whose sample count the mesh's device count does not
          divide (the short last batch of an epoch) runs replicated: every device computes all of it, exact but
          without a speed-up; a warning names its size, once per size.
        * Several processes: every array is joined along ``batch_axis`` with the other processes' parts, so each
          must have the batch's sample count, and that count must be a multiple of this process's devices in the
          mesh; arrays without a sample axis (0-d values, Python numbers traced as 0-d arrays) are refused: nothing
          could check that every process gives the same value (per-run constants belong in the settings).

        Raises:
            ValueError: Several processes and an array whose size along ``batch_axis`` is not the batch's sample
                count or that has no sample axis (the array's position and shape are named), or a sample count that
                this process's devices in the mesh do not divide (the sizes are named).
        """
        samples = _sample_count(batch, batch_axis)
        several = self.num_processes > 1
        count = self.num_local_devices if several else self.num_devices
        for path, value in jax.tree_util.tree_leaves_with_path(batch):
            if not _is_array(value) or self._is_placed(value):
                continue
            if several and np.ndim(value) <= batch_axis:
                raise ValueError(
                    f"{_where(path)} is a value without a sample axis (shape {tuple(np.shape(value))}; a Python number "
                    f"in a batch is one too): with {self.num_processes} JAX processes it would be taken as the same "
                    "value on every process without a check, and a value that differs between them gives wrong "
                    "gradients silently; give per-run constants in the training / evaluation settings "
                    "(train_on(..., training_settings) / evaluate_settings) instead, or per-sample values with a "
                    "sample axis"
                )
            if np.ndim(value) <= batch_axis:
                continue
            size = np.shape(value)[batch_axis]
            if several and size != samples:
                raise ValueError(
                    f"{_where(path)} has shape {tuple(np.shape(value))}, {size} along the sample axis {batch_axis}, "
                    f"but the batch has {samples} samples (its first part): with {self.num_processes} JAX processes "
                    "every array with a sample axis is joined along it with the other processes' parts, so a "
                    "per-batch constant (e.g. class weights) would be repeated once per process; give it in the "
                    "training / evaluation settings (or as a 0-d value) instead"
                )
        replicate_all = samples is not None and samples % count != 0
        if replicate_all and several:
            raise ValueError(
                f"this process's batch has {samples} samples (sample axis {batch_axis}), which cannot be split evenly "
                f"over this process's {count} devices of the data-parallel mesh ({self.num_devices} devices of "
                f"{self.num_processes} processes): give every process batches of a multiple of {count} samples, the "
                "last batch of an epoch included (e.g. drop_last=True, or a dataset size that divides)"
            )
        if replicate_all and samples is not None and samples not in self._warned_sizes:
            self._warned_sizes.add(samples)
            _log.warning(
                f"a batch of {samples} samples cannot be split evenly over the {count} devices of the data-parallel "
                "mesh: it runs replicated (every device computes all of it; exact, without a speed-up). Batches of a "
                f"multiple of {count} samples (drop_last=True for a short last batch) avoid it."
            )

        def place(value: Any) -> Any:
            if not _is_array(value) or self._is_placed(value):
                return value
            split = not replicate_all and np.ndim(value) > batch_axis and np.shape(value)[batch_axis] == samples
            sharding = self.batch_sharding(np.ndim(value), batch_axis) if split else self.replicated
            if several:
                return jax.make_array_from_process_local_data(sharding, value)
            return jax.device_put(value, sharding)

        return jax.tree_util.tree_map(place, batch)

    def local_num_samples(self, num_samples: Any, batch: Any) -> Any:
        """Several processes: the samples of this process's part ``batch`` (counted from its shapes, as the trainer
        counts them; no device wait) in place of the global batch's count that the compiled step gives, so that
        ``StepResult.num_samples`` / ``ModelOutputs.num_samples`` (the logged ``batch_size``, the weights of the
        metrics, whose batch and auxiliary results are this process's part) are this process's, as on PyTorch; the
        neutral core sums them over the processes. One process: ``num_samples``.

        Args:
            num_samples: The count the compiled step returned (the global batch's).
            batch: This process's batch as it was given to the trainer (or placed by :meth:`place_batch`: then its
                global rows are divided by the process count).

        Raises:
            ValueError: Several processes and a training model that returned its own ``num_samples`` (a count of
                the global batch, e.g. of its valid tokens, that cannot be split into the processes' counts).
        """
        if self.num_processes == 1:
            return num_samples
        rows = _sample_count(batch, 0)
        placed = any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable for leaf in jax.tree.leaves(batch))
        local = rows // self.num_processes if placed and rows is not None else rows  # a placed batch: global rows
        if type(num_samples) is int and local is not None and num_samples == local * self.num_processes:
            return local
        raise ValueError(
            f"the training model returned num_samples={num_samples!r:.60} while {self.num_processes} JAX processes "
            "train: the compiled step sees the global batch, so that count is the global batch's, and every process "
            "would weigh its metrics with it. Return no num_samples (each process's rows are counted); to weigh a "
            "metric by another count (e.g. valid tokens), return (value, weight) from the metric function, computed "
            "from inputs.batch and inputs.auxiliary_results (this process's part)"
        )

    def _is_placed(self, value: Any) -> bool:
        """Whether ``value`` is an array on the mesh's devices already (a batch placed before)."""
        return isinstance(value, jax.Array) and value.sharding.device_set == self._devices

    def local_outputs(self, tree: Tree, global_values: bool = False) -> Tree:
        """Several processes: every array of the step's outputs as an array of this process's first device of the
        mesh; other values as they are. One process: ``tree``.

        * ``global_values=False`` (the auxiliary results): an array split along axis 0 over the mesh (a per-sample
          output) as this process's part: its rows of the global batch, in the order it fed them (its shards on
          this process's devices, copied to that device and joined there). A 0-d or replicated array (a sum or
          count over the batch, a per-class ``[C]`` count) is refused: the compiled step sees the global batch, so
          it would be the global batch's value while the batch and ``num_samples`` that a metric sees are this
          process's part (a metric ``sum / inputs.num_samples`` would count every process's samples).
        * ``global_values=True`` (the loss: a mean over the global batch): this process's copy there.

        So a metric function's eager operations on them run on one device of this process: never a program over
        the devices of every process (which every process would have to run in the same order), nor one over this
        process's devices (whose collectives the CPU backend would open among the processes' devices under the same
        names). Device-to-device copies only: no wait for the device.

        Args:
            tree: The model's auxiliary results (a pytree), or with ``global_values`` the step's loss.
            global_values: Whether ``tree`` holds values of the global batch (the same on every process).

        Raises:
            ValueError: Several processes and a 0-d or replicated array among the auxiliary results (its key path
                is named; return per-sample values, shape ``[batch, ...]``, and reduce them in the metric).
        """
        if self.num_processes == 1:
            return tree
        target = self._first_local_device

        def local(path: tuple, value: Any) -> Any:
            if not isinstance(value, jax.Array) or value.is_fully_addressable:
                return value
            if value.ndim == 0 or value.sharding.is_fully_replicated:
                if not global_values:
                    raise ValueError(
                        f"auxiliary_results{jax.tree_util.keystr(path)} is a "
                        f"{'0-d' if value.ndim == 0 else 'replicated'} array (shape {tuple(value.shape)}) while "
                        f"{self.num_processes} JAX processes train: the "
                        "compiled step sees the global batch, so a value reduced over the batch (a sum, a count, a "
                        "per-class count) is the global batch's, while the batch and num_samples a metric sees are "
                        "this process's part (sum / inputs.num_samples would count every process's samples). Return "
                        "per-sample values instead (shape [batch, ...], e.g. pred == labels) and sum or average them "
                        "in the metric function"
                    )
                return jax.device_put(value.addressable_shards[0].data, target)
            spec = getattr(value.sharding, "spec", None)
            if spec is None or len(spec) < 1 or spec[0] != AXIS_NAME:
                return value
            shards = sorted(value.addressable_shards, key=lambda shard: shard.index[0].start or 0)
            return jnp.concatenate([jax.device_put(shard.data, target) for shard in shards])

        return jax.tree_util.tree_map_with_path(local, tree)

    def check_asynchronous_evaluation(self) -> None:
        """Several processes: raise (one process: nothing).

        Raises:
            RuntimeError: Several JAX processes train: every evaluation batch is one program over the devices of
                every process, and on a worker thread its collectives could interleave with the training steps'
                (and the host gathers of the logs) in another order on each process, which hangs.
        """
        if self.num_processes > 1:
            raise RuntimeError(
                f"asynchronous evaluation (TestMetricsLogger(run_async=True)) cannot run with {self.num_processes} "
                "JAX processes: each evaluation batch is one program over every process's devices, and on a worker "
                "thread it could meet the training steps' collectives in another order on each process and hang; "
                "evaluate synchronously (run_async=False)"
            )

    # ----- the Strategy protocol -----
    def prepare_training_model(self, training_model: Any, device: Any = None) -> Any:
        """Replicate every variable of ``training_model`` on the mesh (with several processes, process 0's values:
        broadcast here); returns the model itself."""
        variables = list(graphlib.flatten(training_model, graph=True)[1].leaves)  # each nnx.Variable once
        values = [variable.get_raw_value() for variable in variables]
        if self.num_processes > 1:
            values = broadcast_from_first_process(values)
        for variable, value in zip(variables, self.place_state(values)):
            variable.set_raw_value(value)
        return training_model

    def training_dataset(self, dataset: Any) -> Any:
        """Several processes: this process's part of every batch: the dataset's ``set_shard(rank, world_size)`` is
        called, in place, as on PyTorch (a resumable dataset such as ``ResumableArrayBatches``: over all processes,
        an epoch of one process with the global batch; a last global batch that the process count does not divide
        is padded with samples from the epoch's start, as ``DistributedSampler`` pads); one process: ``dataset``.

        Before training starts, every size of this process's batches (the last batch of an epoch included) is
        computed from the dataset's ``batch_sampler`` (``num_samples``, ``batch_size``, ``drop_last``, as
        ``mlp.data.ResumableArrayBatches`` has) and checked against this process's devices in the mesh, so that a
        bad size fails here and not at the end of an epoch (where a checkpoint would resume at that same batch).
        A dataset without such a sampler is checked per batch (:meth:`place_batch`).

        Raises:
            TypeError: Several processes and a dataset without ``set_shard(rank, world_size)`` (the message says what
                to implement).
            ValueError: Several processes and a batch size of this process that its devices in the mesh do not
                divide (the sizes and the fix are named).
        """
        if self.num_processes == 1:
            return dataset
        set_shard = getattr(dataset, "set_shard", None)
        if not callable(set_shard):
            raise TypeError(
                f"the training dataset ({type(dataset).__qualname__}) has no set_shard(rank, world_size): with "
                f"{self.num_processes} JAX processes each process must feed its part of every global batch; use "
                "mlp.data.ResumableArrayBatches, or implement set_shard(rank, world_size) on the dataset so that, "
                "after it, it yields rank's part of every batch (the same number of batches of the same sizes on "
                "every process)"
            )
        set_shard(self._context.rank, self._context.world_size)
        sampler = getattr(dataset, "batch_sampler", None)
        sizes = _batch_sizes(sampler, self._context.world_size)
        self._check_batch_sizes(sizes, sampler, "training")
        return dataset

    def evaluation_dataset(self, dataset: Any) -> Any:
        """Several processes: a copy of ``dataset`` over this process's samples ``rank, rank + world_size, ...``,
        unpadded (``dataset.shard(rank, world_size)``, e.g. ``mlp.data.ResumableArrayBatches``), so that every
        sample is evaluated once, by all processes together; ``dataset`` itself is not changed. One process:
        ``dataset``.

        Every evaluation batch is one program over the devices of every process, so the processes need as many
        batches of the same sizes: the dataset's sample count must be a multiple of the process count, every
        process's shard must have as many batches (``len(shard)``, compared over the processes: a collective, so
        every process calls this at the same point, as ``TestMetricsLogger`` does when the manager is made), and
        every batch of a process, its last one included, a multiple of its devices in the mesh (checked here from
        the shard's ``batch_sampler`` where it has one, else per batch by :meth:`place_batch`).

        Raises:
            TypeError: Several processes and a dataset without ``shard(rank, world_size)``, or a shard without
                ``len()`` (the message says what to implement).
            ValueError: Several processes and a sample count that the process count does not divide (the counts
                are named: padding would count samples twice), shards with different numbers of batches on the
                processes (the counts are named: the processes' programs would not match and the run would hang),
                or a batch size that this process's devices in the mesh do not divide (the sizes are named).
        """
        if self.num_processes == 1:
            return dataset
        rank, world_size = self._context.rank, self._context.world_size
        shard = getattr(dataset, "shard", None)
        if not callable(shard):
            raise TypeError(
                f"the evaluation dataset ({type(dataset).__qualname__}) has no shard(rank, world_size): with "
                f"{world_size} JAX processes each process evaluates its part of the samples, every sample once; use "
                "mlp.data.ResumableArrayBatches, or implement shard(rank, world_size) on the dataset, returning a "
                "dataset (with len()) of rank's samples only, with the same number of batches of the same sizes on "
                "every process"
            )
        num_samples = getattr(getattr(dataset, "batch_sampler", None), "num_samples", None)
        if isinstance(num_samples, int) and num_samples % world_size:
            usable = num_samples - num_samples % world_size
            raise ValueError(
                f"the evaluation dataset has {num_samples} samples, which {world_size} JAX processes cannot share "
                f"evenly: every evaluation batch is one program of all processes, and padding the last one would "
                f"count {world_size - num_samples % world_size} samples twice; evaluate a multiple of {world_size} "
                f"samples (e.g. the first {usable})"
            )
        part = shard(rank, world_size)
        try:
            length = len(part)
        except TypeError:
            raise TypeError(
                f"the shard of the evaluation dataset ({type(part).__qualname__}, from {type(dataset).__qualname__}"
                f".shard) has no len(): with {world_size} JAX processes the processes' numbers of evaluation batches "
                "must be compared before evaluating (one process evaluating a batch more would hang the run); give "
                "the shard a __len__ returning its number of batches"
            ) from None
        lengths = [int(count) for count in np.asarray(multihost_utils.process_allgather(np.int64(length))).ravel()]
        if len(set(lengths)) != 1:
            raise ValueError(
                f"the shards of the evaluation dataset have different numbers of batches on the {world_size} JAX "
                f"processes: {lengths} (by process): every evaluation batch is one program of all processes, so a "
                "process with a batch more would wait for the others forever; shard the dataset so that every "
                "process gets as many batches of the same sizes (e.g. a sample count that divides evenly)"
            )
        sampler = getattr(part, "batch_sampler", None)
        self._check_batch_sizes(_batch_sizes(sampler, 1), sampler, "evaluation")
        return part

    def _check_batch_sizes(self, sizes: list[int], sampler: Any, which: str) -> None:
        """Raise when this process's devices in the mesh do not divide one of ``sizes`` (the sizes of this process's
        batches in an epoch of the ``which`` dataset, from ``sampler``)."""
        bad = [size for size in sizes if size % self.num_local_devices]
        if not bad:
            return
        count = self.num_local_devices
        raise ValueError(
            f"with {self.num_processes} JAX processes, this process's {which} batches would have {sizes} samples "
            f"(from {sampler.num_samples} samples{'' if which == 'training' else ' of this process'}, batch_size "
            f"{sampler.batch_size} per process, drop_last={sampler.drop_last}), but {bad} cannot be split evenly over "
            f"this process's {count} devices of the data-parallel mesh: use "
            f"a batch_size that is a multiple of {count} and a sample count whose last batch is one too, or "
            "drop_last=True"
        )


def _batch_sizes(sampler: Any, world_size: int) -> list[int]:
    """The sizes of one process's batches in an epoch, the last one included, of a batch sampler with the attributes
    of :class:`mlpug.data.ResumableBatchSampler` (``num_samples``, ``batch_size`` per process, ``drop_last``) that
    ``world_size`` processes share (a last global batch the process count does not divide is padded, so each process
    gets ``ceil(rest / world_size)`` samples of it); ``[]`` when ``sampler`` has not those attributes."""
    num_samples = getattr(sampler, "num_samples", None)
    batch_size = getattr(sampler, "batch_size", None)
    drop_last = getattr(sampler, "drop_last", None)
    if not (type(num_samples) is int and type(batch_size) is int and isinstance(drop_last, bool) and batch_size > 0):
        return []
    global_size = batch_size * world_size
    sizes = [batch_size] if num_samples >= global_size else []
    rest = num_samples % global_size
    if rest and not drop_last:
        sizes.append(-(-rest // world_size))
    return sizes


def broadcast_from_first_process(values: list) -> list:
    """Process 0's ``values`` (arrays, PRNG key arrays included) on every process, as host-local arrays.

    A collective: every process calls it with values of the same shapes and dtypes.
    """
    keys = [isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key) for value in values]
    raw = [jax.random.key_data(value) if key else value for value, key in zip(values, keys)]
    received = multihost_utils.broadcast_one_to_all(raw)
    return [
        jax.random.wrap_key_data(jnp.asarray(new), impl=jax.random.key_impl(old)) if key else new
        for new, old, key in zip(received, values, keys)
    ]
