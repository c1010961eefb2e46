"""TensorFlow data parallelism on ``tf.distribute``: ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy``.

The user creates the strategy, creates the model components and optimizers in its scope (the Keras rule: their
variables must be mirrored) and passes it as ``DefaultTrainer(..., strategy=strategy)``; the training
script is otherwise the one of a single device. What the trainer then does:

* **The batch size is per process**, as in PyTorch's ``DistributedDataParallel``: a ``MirroredStrategy`` (one
  process, several devices) splits every batch the data yields over its replicas (:func:`split_for_replicas`); a
  ``MultiWorkerMirroredStrategy`` (one process per worker, ``TF_CONFIG``) trains every worker on its shard of the
  data (:func:`shard_training_dataset`), so a step's global batch is the batch size times the number of workers.
* **Gradients** of every replica are weighted by ``replica_samples / global_samples`` (one in-graph all-reduce of
  the sample counts per step), so that the sum the Keras optimizer all-reduces in its ``apply_gradients`` is the
  gradient of the global batch's mean loss, also when the replicas' shares differ (an odd last batch). The weighted
  loss is the replica's mean loss: Keras 3's ``1 / replicas`` scaling of a Keras loss object in a replica context
  is found before the first step and undone (:mod:`mlpug.tensorflow.trainers.replica_loss`).
* **Workers as ranks**: a ``MultiWorkerMirroredStrategy`` with several workers gives the neutral core a
  :class:`StrategyContext` (rank = worker, world size = workers), so that batch and dataset metrics are reduced
  as sums and counts and every worker stops at the same batch, as with PyTorch; a ``MirroredStrategy`` is one
  process (the core sees one rank; the step's outputs are those of all its replicas).
* Evaluation runs on one device per process (the variables' local copies, no collectives), on the worker's shard
  of the evaluation data (:func:`shard_evaluation_dataset`).

Without a strategy, a ``TF_CONFIG`` that describes several tasks is refused (:func:`check_cluster`): every process
would train alone on the same data and write the same files.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import tensorflow as tf

from mlpug.distributed import DistributedContext, SerialContext, free_ports

__all__ = [
    "StrategyContext",
    "check_cluster",
    "check_strategy",
    "check_strategy_options",
    "check_variables_in_scope",
    "launch",
    "mirrored_cpu_strategy",
    "resolve_strategy",
    "shard_evaluation_dataset",
    "shard_training_dataset",
    "split_for_replicas",
    "strategy_context",
]

_log = logging.getLogger("mlpug.tensorflow.distributed")

SUPPORTED_STRATEGIES = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)


def check_strategy(strategy: Any) -> None:
    """Raise unless ``strategy`` is None, a ``MirroredStrategy`` or a ``MultiWorkerMirroredStrategy``.

    Raises:
        TypeError: ``strategy`` is not a ``tf.distribute.Strategy``.
        NotImplementedError: Another strategy (TPU, parameter server, one device), untested with mlpug.
    """
    if strategy is None or isinstance(strategy, SUPPORTED_STRATEGIES):
        return
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            "strategy must be None, 'single_process', a tf.distribute.MirroredStrategy or MultiWorkerMirroredStrategy, "
            "or an mlp.strategies.TFDistributeStrategy; got"
            f" a {type(strategy).__module__}.{type(strategy).__qualname__}: {strategy!r:.100}"
        )
    raise NotImplementedError(
        f"strategy is a {type(strategy).__qualname__}; mlpug supports MirroredStrategy (several "
        "devices, one process) and MultiWorkerMirroredStrategy (several processes, TF_CONFIG)"
    )


def _cluster_tasks() -> dict[str, int]:
    """Tasks per job of ``TF_CONFIG``'s cluster (the evaluator job left out); empty without ``TF_CONFIG``.

    Raises:
        ValueError: ``TF_CONFIG`` is not a JSON object with a ``cluster`` of job name -> list of addresses.
    """
    value = os.environ.get("TF_CONFIG")
    if not value:
        return {}
    try:
        cluster = json.loads(value).get("cluster") or {}
        return {job: len(addresses) for job, addresses in cluster.items() if job != "evaluator"}
    except (ValueError, AttributeError, TypeError):
        raise ValueError(
            f"the environment variable TF_CONFIG is {value!r:.200}, not a JSON object with a cluster of job name -> "
            'list of addresses (e.g. {"cluster": {"worker": ["host:port"]}, "task": {"type": "worker", "index": 0}})'
        ) from None


def check_strategy_options(strategy: Any, optimizers: Mapping[str, Any], loss_scaling: bool) -> None:
    """Refuse what would make a strategy's step differ from one device's step on the global batch.

    Raises:
        NotImplementedError: float16 loss scaling (Keras' ``LossScaleOptimizer`` decides whether gradients are
            finite per replica, before its all-reduce: one replica's inf could be applied, or workers could disagree
            and wait in a collective until the time-out); an optimizer with ``clipnorm`` / ``clipvalue`` /
            ``global_clipnorm`` (Keras clips every replica's partial gradients before the all-reduce; the trainer's
            own ``clip_gradients_norm`` / ``clip_gradients_value`` clip the all-reduced ones).
    """
    if strategy is None:
        return

    if loss_scaling:
        raise NotImplementedError(
            "use_mixed_precision with autocast_dtype='float16' under a tf.distribute strategy: Keras' "
            "LossScaleOptimizer "
            "checks the gradients for inf/nan per replica before they are all-reduced, so replicas (or workers) could "
            "take different decisions. Use autocast_dtype='bfloat16' (no loss scaling), or train on one device."
        )
    for name, optimizer in optimizers.items():
        clips = {key: getattr(optimizer, key, None) for key in ("clipnorm", "clipvalue", "global_clipnorm")}
        clips = {key: value for key, value in clips.items() if value is not None}
        if clips:
            raise NotImplementedError(
                f"optimizer {name!r} clips gradients ({', '.join(f'{k}={v}' for k, v in clips.items())}) under a "
                "tf.distribute strategy: Keras clips each replica's partial gradients before they are all-reduced, so "
                "the step would not be the step of one device on the global batch. Create the optimizer without "
                "clipping."
            )


def check_cluster(strategy: Any) -> None:
    """Raise when ``TF_CONFIG`` describes several tasks but ``strategy`` is not a ``MultiWorkerMirroredStrategy``.

    Raises:
        RuntimeError: The cluster has several tasks (counted per job in the message): every process would train
            alone on the same data and write the same files. The message says to pass
            ``tf.distribute.MultiWorkerMirroredStrategy()`` or to unset ``TF_CONFIG``.
        ValueError: ``TF_CONFIG`` is malformed.
    """
    tasks = _cluster_tasks()
    if sum(tasks.values()) > 1 and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        jobs = ", ".join(f"{job}: {count}" for job, count in tasks.items())
        raise RuntimeError(
            f"TF_CONFIG describes a cluster of {sum(tasks.values())} tasks ({jobs}), but the strategy is "
            f"{type(strategy).__qualname__ if strategy is not None else 'one device (None)'}: every process would "
            "train alone on the same data, print the same progress and write the same checkpoint files. Train on all "
            "of them (create the model and optimizer in the scope of tf.distribute.MultiWorkerMirroredStrategy() and "
            "pass it as strategy=), or run one process (unset TF_CONFIG)."
        )


def resolve_strategy(strategy: Any) -> Any:
    """``strategy``, or None for TensorFlow's default strategy (one device, what ``tf.distribute.get_strategy()``
    returns outside any scope).

    Raises:
        TypeError / NotImplementedError: See :func:`check_strategy`.
    """
    if strategy is not None and not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return None
    check_strategy(strategy)
    return strategy


def num_local_replicas(strategy: Any) -> int:
    """Replicas (devices) of this process."""
    return len(strategy.extended.worker_devices)


class StrategyContext(DistributedContext):
    """The workers of a ``MultiWorkerMirroredStrategy`` as the neutral core's ranks.

    Rank 0 is the chief (``TF_CONFIG`` task ``chief``, else worker 0); collectives are blocking ``strategy.reduce``
    sums of float64 vectors, outside the compiled step, issued by every worker in the same order.
    Without a cluster (``MultiWorkerMirroredStrategy()`` without ``TF_CONFIG``: the resolver has no task) the
    process is the only worker: rank 0 of a world size of 1.

    Args:
        strategy: A ``MultiWorkerMirroredStrategy``.
    """

    def __init__(self, strategy: tf.distribute.MultiWorkerMirroredStrategy):
        self.strategy = strategy
        resolver = strategy.cluster_resolver
        jobs = resolver.cluster_spec().as_dict()
        chiefs = len(jobs.get("chief", []))
        if resolver.task_type is None or resolver.task_id is None:  # no TF_CONFIG: one local worker
            self.world_size, self.rank = 1, 0
        else:
            self.world_size = chiefs + len(jobs.get("worker", []))
            self.rank = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
        self._local = num_local_replicas(strategy)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        if not values:
            return []
        vector = tf.constant([float(value) for value in values], tf.float64)
        zeros = tf.zeros_like(vector)
        per_replica = self.strategy.experimental_distribute_values_from_function(
            lambda context: vector if context.replica_id_in_sync_group % self._local == 0 else zeros
        )
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy().tolist()

    def barrier(self) -> None:
        self.all_reduce_sum([0.0])


def strategy_context(strategy: Any) -> DistributedContext:
    """:class:`StrategyContext` for a strategy with several workers, else the one-process ``SerialContext``."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        context = StrategyContext(strategy)
        if context.world_size > 1:
            return context
    return SerialContext()


def _leaves_and_size(batch: Any) -> tuple[Any, Any]:
    batch = tf.nest.map_structure(tf.convert_to_tensor, batch)
    return batch, tf.shape(tf.nest.flatten(batch)[0])[0]


def split_for_replicas(strategy: Any, batch: Any) -> Any:
    """``batch`` (this process's) as a per-replica value: replica ``i`` of ``R`` local replicas gets the samples
    ``[i * n // R, (i + 1) * n // R)`` of every part (shares differ by at most one sample); used inside the
    compiled step. With one local replica, the batch itself."""
    local = num_local_replicas(strategy)
    if local == 1:
        return strategy.experimental_distribute_values_from_function(lambda context: batch)
    batch, size = _leaves_and_size(batch)

    def share(context: Any) -> Any:
        index = context.replica_id_in_sync_group % local
        start, stop = index * size // local, (index + 1) * size // local
        return tf.nest.map_structure(lambda tensor: tensor[start:stop], batch)

    return strategy.experimental_distribute_values_from_function(share)


def check_variables_in_scope(strategy: Any, owners: dict[str, Any]) -> None:
    """Raise when a variable of a model component or optimizer was created outside ``strategy.scope()``.

    Args:
        owners: What to check, e.g. ``{"model component 'model'": layer, "optimizer 'optimizer'": optimizer}``.

    Raises:
        ValueError: Names the owner and the variable, and says to create them under ``with strategy.scope():``.
    """
    for owner, holder in owners.items():
        for variable in holder.variables:
            value = getattr(variable, "value", variable)
            if not strategy.extended.variable_created_in_scope(value):
                raise ValueError(
                    f"{owner} has the variable {getattr(variable, 'path', variable.name)!r} created outside the scope "
                    f"of the strategy ({type(strategy).__qualname__}), so it is not mirrored over the "
                    "replicas. Create the model components, the training model and the optimizers under `with "
                    "strategy.scope():` (a Keras model without an Input that creates its weights on its first call may "
                    "also be created outside: the trainer builds it in the scope)."
                )


def _batches_per_worker(dataset: tf.data.Dataset, world_size: int) -> tf.data.Dataset:
    """``dataset`` cut to a multiple of ``world_size`` batches (every worker needs the same number of steps)."""
    cardinality = int(dataset.cardinality())
    if cardinality < 0:  # infinite: every shard is infinite; unknown: cannot be checked
        if cardinality == int(tf.data.UNKNOWN_CARDINALITY):
            _log.warning(
                "Data-parallel training: the training tf.data pipeline has an unknown number of batches, so mlpug "
                "cannot check that every worker gets the same number (a worker with fewer batches would leave the "
                "others waiting in a collective). Make the number known (e.g. dataset.apply("
                "tf.data.experimental.assert_cardinality(n))) or repeat() the dataset."
            )
        return dataset
    dropped = cardinality % world_size
    if dropped:
        _log.warning(
            f"Data-parallel training on {world_size} workers: the training tf.data pipeline has {cardinality} batches "
            f"per epoch; the last {dropped} are left out so that every worker trains on the same number of batches."
        )
        return dataset.take(cardinality - dropped)
    return dataset


def shard_training_dataset(dataset: Any, context: DistributedContext) -> Any:
    """This worker's part of a training ``dataset``; every worker gets the same number of batches.

    * a :class:`mlpug.data.ResumableBatchSampler` (of ``mlp.data.ResumableArrayBatches``) is sharded in place, as
      with PyTorch (``set_shard``): batch ``k`` of every worker is its part of global batch ``k``;
    * a ``tf.data.Dataset`` yields every ``world_size``-th batch (``shard(world_size, rank)``), cut to a multiple
      of ``world_size`` batches first;
    * anything else is used as it is, with a warning: every worker trains on what it yields.
    """
    from mlpug.data import find_resumable

    resumable = find_resumable(dataset)
    if resumable is not None and callable(getattr(resumable, "set_shard", None)):
        resumable.set_shard(context.rank, context.world_size)
        return dataset
    if isinstance(dataset, tf.data.Dataset):
        from mlpug.tensorflow.data import _unseeded_shuffles, pipeline_stages

        if _unseeded_shuffles(pipeline_stages(dataset)):
            _log.warning(
                "Data-parallel training: the training tf.data pipeline shuffles without a seed, so every worker "
                "shuffles in another order and their shards overlap (some samples are trained on twice per epoch, "
                "others not at all). Seed it (shuffle(..., seed=...) or keras.utils.set_random_seed(...) before "
                "building it)."
            )
        return _batches_per_worker(dataset, context.world_size).shard(context.world_size, context.rank)
    _log.warning(
        f"Data-parallel training on {context.world_size} workers: the training dataset ({type(dataset).__qualname__})"
        " is neither a tf.data.Dataset nor a mlp.data resumable dataset, so mlpug cannot shard it; every worker "
        "trains on what it yields (shard it by worker yourself, and give every worker the same number of batches)."
    )
    return dataset


def shard_evaluation_dataset(dataset: Any, context: DistributedContext) -> Any:
    """This worker's part of an evaluation ``dataset``, every sample counted on exactly one worker.

    ``mlp.data.ResumableArrayBatches``: the samples ``rank, rank + W, ...`` (unpadded); a ``tf.data.Dataset``:
    every ``W``-th batch (``shard``); anything else is evaluated whole on every worker, with a warning (the reduced
    values are the same, the work is repeated).
    """
    shard = getattr(dataset, "shard", None)
    if isinstance(dataset, tf.data.Dataset):
        return dataset.shard(context.world_size, context.rank)
    if callable(shard):
        return shard(context.rank, context.world_size)
    _log.warning(
        f"Data-parallel evaluation on {context.world_size} workers: the dataset ({type(dataset).__qualname__}) cannot "
        "be sharded by mlpug, so every worker evaluates all of it (the metrics are right, the work is repeated)."
    )
    return dataset


def mirrored_cpu_strategy(num_devices: int = 2) -> tf.distribute.MirroredStrategy:
    """A ``MirroredStrategy`` over ``num_devices`` logical CPU devices (to try data parallelism without GPUs).

    Must be called before TensorFlow initialises its devices (before the first tensor is created).

    Raises:
        ValueError: ``num_devices`` is not an int >= 1.
        RuntimeError: TensorFlow's devices are initialised already with another number of CPU devices.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be an int >= 1, got {num_devices!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError as error:
        existing = tf.config.list_logical_devices("CPU")
        if len(existing) != num_devices:
            raise RuntimeError(
                f"mirrored_cpu_strategy({num_devices}) must run before TensorFlow creates its first tensor; TensorFlow "
                f"has {len(existing)} logical CPU device(s) already ({error})"
            ) from None
    return tf.distribute.MirroredStrategy([device.name for device in tf.config.list_logical_devices("CPU")])


def _launched(index: int, addresses: list[str], function: Callable, args: tuple, kwargs: dict) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
    function(*args, **kwargs)


_GRACE_S = 60.0


def _exit_description(code: Optional[int]) -> str:
    if code is not None and code < 0:
        return f"was killed by signal {-code}"
    if code == 128 + 15:
        return "stopped on SIGTERM (exit code 143)"
    return f"exited with code {code} (its traceback is printed above)"


def launch(
    function: Callable,
    *args: Any,
    num_processes: Optional[int] = None,
    timeout_s: Optional[float] = None,
    **kwargs: Any,
) -> Any:
    """Run ``function(*args, **kwargs)`` on ``num_processes`` local worker processes, or here when that is 1.

    The same call as PyTorch's ``mlp.distributed.launch``. Each worker gets a ``TF_CONFIG`` of a cluster of
    ``num_processes`` workers on free loopback ports, so that a ``MultiWorkerMirroredStrategy()`` created in
    ``function`` joins them; under an existing ``TF_CONFIG`` (a cluster manager started the processes)
    ``function`` just runs. Processes are started with ``spawn``. When one exits with an error (or a signal), the
    others get 60 s to end on their own (their next collective fails; a SIGTERM stop lets the chief write its
    training checkpoint), then they are terminated, and a ``RuntimeError`` is raised here.

    Args:
        function: A picklable (module-level) function.
        num_processes: Worker processes (int >= 1); default 1.
        timeout_s: Terminate every worker and raise when they run longer (seconds); default no limit.

    Returns:
        What ``function`` returned when it ran in this process, else None.

    Raises:
        ValueError: ``num_processes`` is not an int >= 1.
        RuntimeError: A worker failed: the message names the one seen failing first (one killed by a signal
            before others seen in the same 0.1 s poll) and how, then how the others ended; or the time-out passed.
    """
    if os.environ.get("TF_CONFIG"):
        return function(*args, **kwargs)
    num_processes = 1 if num_processes is None else num_processes
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if num_processes == 1:
        return function(*args, **kwargs)
    addresses = [f"localhost:{port}" for port in free_ports(num_processes)]
    spawn = multiprocessing.get_context("spawn")
    workers = [
        spawn.Process(target=_launched, args=(index, addresses, function, args, kwargs))
        for index in range(num_processes)
    ]
    for worker in workers:
        worker.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed_at = None
    seen_failing: list[int] = []  # workers that ended with an error on their own, in the order seen
    try:
        while any(worker.is_alive() for worker in workers):
            _note_failures(workers, seen_failing)
            if failed_at is None and seen_failing:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() > failed_at + _GRACE_S:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the {num_processes} workers ran longer than timeout_s={timeout_s} s: terminated")
            time.sleep(0.1)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(10)
    _note_failures(workers, seen_failing)  # those that ended in the last interval, before any was terminated
    terminated = [index for index, worker in enumerate(workers) if worker.exitcode != 0 and index not in seen_failing]
    if seen_failing or terminated:
        index = (seen_failing or terminated)[0]
        message = f"worker {index} of {num_processes} {_exit_description(workers[index].exitcode)}"
        others = [i for i in seen_failing if i != index]
        if others:
            message += "; after it: " + "; ".join(
                f"worker {i} {_exit_description(workers[i].exitcode)}" for i in others
            )
        if terminated and seen_failing:
            message += f"; terminated by the launcher after {_GRACE_S:g} s: workers {terminated}"
        raise RuntimeError(message)
    return None


def _note_failures(workers: list, seen_failing: list[int]) -> None:
    """Append to ``seen_failing`` the workers that ended with a non-zero exit code since the last call; among those
    seen in the same call, one killed by a signal (a negative exit code) first: the others' collectives fail
    because it is gone."""
    new = [i for i, worker in enumerate(workers) if worker.exitcode not in (None, 0) and i not in seen_failing]
    seen_failing.extend(sorted(new, key=lambda i: (workers[i].exitcode >= 0, i)))


@tf.autograph.experimental.do_not_convert
def merge_local_results(strategy: Any, rows: Any, loss: Any, num_samples: Any, auxiliary_results: Any) -> tuple:
    """The outputs of this process's replicas as one batch's: the loss weighted by the replicas' shares of the
    process's rows (as their gradients are), ``num_samples`` summed, auxiliary results merged as chunks are
    (tensors of rank >= 1 concatenated, 0-d tensors stacked; :func:`mlpug.chunking.merge_auxiliary_results`).
    With one local replica, its outputs as they are. Used inside the compiled step."""
    from mlpug.chunking import merge_auxiliary_results, sum_values

    losses = strategy.experimental_local_results(loss)

    def local(value: Any) -> tuple:  # a Python value that is the same on every replica comes back once
        values = strategy.experimental_local_results(value)
        return values * len(losses) if len(values) == 1 else values

    counts = local(num_samples)
    leaves = [local(leaf) for leaf in tf.nest.flatten(auxiliary_results)]
    auxiliary = [
        tf.nest.pack_sequence_as(auxiliary_results, [values[i] for values in leaves]) for i in range(len(losses))
    ]
    if len(losses) == 1:
        return losses[0], counts[0], auxiliary[0]
    replica_rows = local(rows)
    total = sum_values(list(replica_rows))
    shares = [tf.math.divide_no_nan(count, total) for count in replica_rows]
    # an empty share (a batch with fewer samples than replicas) has a NaN mean loss and weight 0
    merged_loss = sum_values(
        [tf.math.multiply_no_nan(tf.cast(value, tf.float32), w) for value, w in zip(losses, shares)]
    )
    concatenate = lambda arrays: tf.concat(arrays, axis=0)  # noqa: E731
    return merged_loss, sum_values(list(counts)), merge_auxiliary_results(auxiliary, concatenate, tf.stack)
