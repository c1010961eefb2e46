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
Checkpoints read the replicated state (one copy), so they are the files of one device.

Several processes (``jax.distributed.initialize``, see :mod:`mlpug.jax.distributed`): the mesh spans the devices of
every process, each process feeds its part of every global batch (its ``rank``-th share of the samples, see
:meth:`DataParallelStrategy.training_dataset`), the arrays it gives are joined into one global array
(``jax.make_array_from_process_local_data``), and the parameters are broadcast from process 0 when the training
model is set, so that every process starts from the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.nnx import graphlib
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlpug.distributed import DistributedContext, SerialContext
from mlpug.jax.strategies.jax_strategy import JaxStrategy, Tree

AXIS_NAME = "data"
"""The name of the mesh axis that the batches are split along."""


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


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

    Batches: every array of a batch with a sample axis is split along it into ``num_devices`` equal parts, so the
    batch size must be a multiple of ``num_devices`` (with several processes: the batch size of each process a
    multiple of its devices in the mesh); the first batch that is not raises ``ValueError`` naming the size and the
    count. In one process, a batch smaller than one before it (the short last batch of an epoch) that does not
    split evenly runs replicated instead: every device computes all of it, exact but without a speed-up (drop it,
    e.g. ``ResumableArrayBatches(..., drop_last=True)``, to save that time). Arrays without a sample axis (0-d) are
    replicated.

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
        self._largest_batch = 0  # the most samples of a batch placed so far (a smaller one may be the short last)
        self.num_processes = jax.process_count()
        self.num_local_devices = sum(1 for device in self.devices if device.process_index == jax.process_index())
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
        """``batch`` with every array split along ``batch_axis`` over the mesh (0-d arrays replicated); other values
        as they are. With several processes, each array is this process's part of the global batch.

        A batch whose sample count the device count does not divide is refused, unless it is smaller than a batch
        placed before in one process (the short last batch of an epoch): that one is replicated, every device
        computing all of it (exact, without a speed-up).

        Raises:
            ValueError: An array's size along ``batch_axis`` is not a multiple of the mesh's device count (of this
                process's devices in the mesh, with several processes), and the batch is not a short last batch: the
                array's position, shape and the count are named.
        """
        count = self.num_local_devices if self.num_processes > 1 else self.num_devices
        sized = [
            (path, np.shape(value))
            for path, value in jax.tree_util.tree_leaves_with_path(batch)
            if _is_array(value) and np.ndim(value) > batch_axis and not self._is_placed(value)
        ]
        uneven = [(path, shape) for path, shape in sized if shape[batch_axis] % count]
        replicate = False
        if uneven:
            path, shape = uneven[0]
            size = shape[batch_axis]
            if self.num_processes > 1 or size >= self._largest_batch:
                where = f"batch{jax.tree_util.keystr(path)}" if path else "the batch"
                devices = f"this process's {count} devices" if self.num_processes > 1 else f"{count} devices"
                raise ValueError(
                    f"{where} has {size} samples (shape {tuple(shape)}, sample axis {batch_axis}), which cannot be "
                    f"split evenly over the {devices} of the data-parallel mesh: use batches of a multiple of {count} "
                    "samples (only a short last batch, smaller than the batches before it, may differ in one process)"
                )
            replicate = True
        self._largest_batch = max([self._largest_batch, *(shape[batch_axis] for _, shape in sized)])

        def place(value: Any) -> Any:
            if not _is_array(value) or self._is_placed(value):
                return value
            sharding = self.replicated if replicate else self.batch_sharding(np.ndim(value), batch_axis)
            if self.num_processes > 1:
                return jax.make_array_from_process_local_data(sharding, value)
            return jax.device_put(value, sharding)

        return jax.tree_util.tree_map(place, batch)

    def _is_placed(self, value: Any) -> bool:
        """Whether ``value`` is an array on the mesh's devices already (a batch placed before)."""
        return isinstance(value, jax.Array) and value.sharding.device_set == self._devices

    def local_outputs(self, tree: Tree) -> Tree:
        """Several processes: every array split along axis 0 over the mesh as this process's part (its rows of the
        global batch, in the order it fed them; ``multihost_utils.global_array_to_host_local_array``), the others
        (replicated: the loss, means) as they are. One process: ``tree``."""
        if self.num_processes == 1:
            return tree
        split = P(AXIS_NAME)

        def local(value: Any) -> Any:
            if isinstance(value, jax.Array) and not value.is_fully_addressable and value.ndim >= 1:
                spec = getattr(value.sharding, "spec", None)
                if spec is not None and len(spec) >= 1 and spec[0] == AXIS_NAME:
                    return multihost_utils.global_array_to_host_local_array(value, self.mesh, split)
            return value

        return jax.tree_util.tree_map(local, tree)

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
        """Several processes: this process's part of every batch (``set_shard(rank, world_size)`` of a resumable
        dataset such as ``ResumableArrayBatches``: over all processes, an epoch of one process with the global
        batch); one process: ``dataset``.

        Raises:
            TypeError: Several processes and a dataset without ``set_shard`` (give each process its part of every
                batch yourself, and pass that dataset with ``strategy``'s context in mind).
        """
        if self.num_processes == 1:
            return dataset
        return _shard(dataset, self._context, "training")

    def evaluation_dataset(self, dataset: Any) -> Any:
        """Several processes: this process's part of every evaluation batch (as :meth:`training_dataset`); every
        global batch is evaluated once, by all processes together. One process: ``dataset``."""
        if self.num_processes == 1:
            return dataset
        return _shard(dataset, self._context, "evaluation")


def _shard(dataset: Any, context: DistributedContext, what: str) -> Any:
    set_shard = getattr(dataset, "set_shard", None)
    if set_shard is None:
        raise TypeError(
            f"the {what} dataset ({type(dataset).__qualname__}) has no set_shard(rank, world_size): with "
            f"{context.world_size} JAX processes each process must feed its part of every batch; use "
            "mlp.data.ResumableArrayBatches, or give each process a dataset of its parts"
        )
    set_shard(context.rank, context.world_size)
    return dataset


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
