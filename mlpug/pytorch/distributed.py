"""PyTorch data-parallel training on ``torch.distributed``: the process group, DDP gradient sync, data shards, launch.

Nothing but the launch command changes a script: under ``torchrun --nproc_per_node N script.py`` (or
:func:`launch`) the ``DefaultTrainer`` joins the process group from the environment ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; see :func:`init_distributed`), wraps
the training model in ``DistributedDataParallel``, shards the training and evaluation datasets by rank and gives
the ``TrainingManager`` a :class:`TorchDistributedContext`. Collectives are torch's own; this module only decides
where they are issued:

* the gradient all-reduce is DDP's, in the backward pass of the last chunk of a batch (``no_sync`` before it:
  :class:`DDPGradientSync`);
* the batch losses and batch metrics (as sums and counts) of the steps since the last read point and the stop flag
  go in one asynchronous all-reduce at a read point (``async_op=True``; :class:`mlpug.distributed.StepReductions`,
  :mod:`mlpug.trainers.read_points`), read where consumers read values anyway; under
  ``non_finite_loss="skip_step"`` the trainer also waits for the loss over all ranks before every optimizer step,
  so that every rank skips the same steps;
* stop requests at epoch ends and other host values are agreed on a CPU (gloo) group, so that agreeing never waits
  for a GPU.

Failure (see ``docs/distributed.md``): when a rank raises, it runs its end phases (no collective there) and exits
with the error; the other ranks' next collective fails as soon as its process is gone (gloo: "Connection closed by
peer", within a second) or, where the engine does not notice (NCCL), when the process group ``timeout`` ends, unless
the launcher (``torchrun``'s agent, :func:`launch`) stops them first: it does as soon as a process exits with an
error, and names the process that failed first.

Exit: a process group that :func:`init_distributed` created is destroyed when the interpreter exits (an ``atexit``
handler), on every rank, after a success, a stop or an error; until then the script may go on using it after
training. Python has joined the non-daemon threads by then (mlpug's asynchronous evaluation worker and background
checkpoint writer; neither issues a collective). Unless the process ends with an uncaught error, every rank first
waits for the others, at most :data:`EXIT_BARRIER_TIMEOUT_S` seconds; after an error it destroys the group at once,
so that the other ranks' collectives fail at once. A group the script created, or destroyed itself, is left alone.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import torch
import torch.distributed as dist

from mlpug import logging as mlpug_logging
from mlpug.chunking import BatchChunk
from mlpug.distributed import (
    DistributedContext,
    SerialContext,
    after_first_failure,
    exit_description,
    first_failure,
    free_port,
)
from mlpug.trainers.gradient_sync import GradientSync

__all__ = [
    "DDPGradientSync",
    "ShardSampler",
    "TorchDistributedContext",
    "environment_world_size",
    "init_distributed",
    "launch",
    "local_device",
]

_log = logging.getLogger("mlpug.pytorch.distributed")

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective waits for the other ranks before it raises (``MLPUG_DISTRIBUTED_TIMEOUT_S`` overrides)."""

EXIT_BARRIER_TIMEOUT_S = 60.0
"""Seconds a rank waits at exit for the other ranks before it destroys the process group mlpug created."""


def environment_world_size() -> int:
    """``WORLD_SIZE`` of the environment (what ``torchrun`` sets), 1 when unset.

    Raises:
        ValueError: ``WORLD_SIZE`` is not an int >= 1.
    """
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return 1
    try:
        world_size = int(value)
    except ValueError:
        world_size = 0
    if world_size < 1:
        raise ValueError(
            f"the environment variable WORLD_SIZE is {value!r}, not an int >= 1 (torchrun sets it to the number of "
            "processes); unset it to train in one process"
        )
    return world_size


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Pass it as ``DefaultTrainer(device=...)`` and move the model components there before creating the optimizer;
    the same line serves one process and many.
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> DistributedContext:
    """Join the process group of a data-parallel launch, once per process; a :class:`SerialContext` otherwise.

    With ``WORLD_SIZE`` > 1 in the environment (``torchrun``, :func:`launch`), ``torch.distributed`` is initialised
    from it (``init_method="env://"``) unless that was done already (then the existing group is used, and left to
    the script). Calling it again returns the same context. A group created here is destroyed at interpreter exit
    (see the module docstring), not before: the script may use it after training.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: Seconds a collective waits for the other ranks (default ``MLPUG_DISTRIBUTED_TIMEOUT_S`` or
            :data:`DEFAULT_TIMEOUT_S`).

    Raises:
        ValueError: ``WORLD_SIZE`` or the timeout is invalid.
        RuntimeError: ``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT`` is missing (a launcher other than torchrun).
    """
    global _context, _created_group
    if _context is not None:
        return _context
    if not dist.is_available():
        return SerialContext()
    if not dist.is_initialized():
        world_size = environment_world_size()
        if world_size == 1:
            return SerialContext()
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} is set, but {missing} not: launch with torchrun --nproc_per_node "
                f"{world_size} script.py (or mlp.distributed.launch), which sets RANK, LOCAL_RANK, MASTER_ADDR and "
                "MASTER_PORT, or unset WORLD_SIZE to train in one process"
            )
        timeout_s = float(timeout_s or os.environ.get("MLPUG_DISTRIBUTED_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # After a restart (torchrun --max-restarts) the store may still hold the addresses of the workers of the
        # attempt before, which the new process group would try to connect to: one key prefix per attempt.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"mlpug/attempt_{attempt}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        _created_group = dist.group.WORLD
        atexit.register(_tear_down_at_exit)
    if dist.get_world_size() == 1:
        return SerialContext()
    _context = TorchDistributedContext()
    mlpug_logging.set_rank(_context.rank, _context.world_size)
    return _context


def join_launch(strategy_name: str, backend: Optional[str], timeout_s: Optional[float]) -> TorchDistributedContext:
    """The process group of a data-parallel launch for a strategy that needs several processes (DDP, FSDP).

    Args:
        strategy_name: The strategy's name, e.g. ``"ddp"`` (in the message).
        backend: See :func:`init_distributed`.
        timeout_s: See :func:`init_distributed`.

    Raises:
        ValueError: This process is alone (``WORLD_SIZE`` unset or 1, no process group of several ranks); what
            :func:`init_distributed` raises.
    """
    context = init_distributed(backend, timeout_s)
    if not isinstance(context, TorchDistributedContext):
        raise ValueError(
            f"{strategy_name.upper()}Strategy (strategy={strategy_name!r}) needs a data-parallel launch (torchrun "
            f"--nproc_per_node N script.py, or mlp.distributed.launch), but this process is alone "
            f"(WORLD_SIZE={environment_world_size()}); leave strategy out (or pass 'single_process') to train in one "
            "process"
        )
    return context


_context: Optional[DistributedContext] = None
_created_group: Optional[Any] = None
"""The default process group when :func:`init_distributed` created it (mlpug tears it down at exit), else None."""
_ending_with_error = False
"""Set by :func:`launch`'s processes when the function raised (Python sets ``sys.last_value`` only for an error
that reached the top level)."""


def _tear_down_at_exit() -> None:
    """Destroy the process group mlpug created, if it is still the default group, after the other ranks arrived
    (a barrier of at most :data:`EXIT_BARRIER_TIMEOUT_S`, skipped when this process ends with an error)."""
    global _context, _created_group
    group, _created_group = _created_group, None
    if group is None or not dist.is_initialized() or dist.group.WORLD is not group:
        return  # destroyed by the script (which may have created a group of its own since)
    failed = _ending_with_error or getattr(sys, "last_value", None) is not None
    if not failed and isinstance(_context, TorchDistributedContext):
        try:
            _context.exit_barrier(EXIT_BARRIER_TIMEOUT_S)
        except Exception as error:  # a rank ended earlier or is still busy: tear down without it
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            _log.warning(
                f"at exit, not every rank arrived within {EXIT_BARRIER_TIMEOUT_S:g} s ({reason}); destroying the "
                "process group without them"
            )
    try:
        dist.destroy_process_group()
    except Exception as error:
        _log.warning(f"at exit, destroying the process group failed: {type(error).__name__}: {error}")
    _context = None


class TorchDistributedContext(DistributedContext):
    """Rank, world size and the collectives of the neutral core on an initialised ``torch.distributed`` group.

    Metric reductions run on the default group, on its device (CUDA for NCCL, CPU for gloo), and return tensors
    without waiting for them; flags and Python numbers go through a CPU (gloo) group.
    """

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        self._cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def barrier(self) -> None:
        dist.barrier(group=self._cpu_group)

    def exit_barrier(self, timeout_s: float) -> None:
        """Wait until every rank arrives here, at most ``timeout_s`` seconds (on the CPU group).

        Raises:
            RuntimeError: A rank did not arrive in time, or its process is gone.
        """
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.monitored_barrier(group=self._cpu_group, timeout=timeout, wait_all_ranks=True)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        tensor = torch.tensor([float(value) for value in values], dtype=torch.float64)
        dist.all_reduce(tensor, group=self._cpu_group)
        return tensor.tolist()

    def any_rank(self, flag: bool) -> bool:
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(tensor, group=self._cpu_group)
        return bool(tensor.item())

    def broadcast_int(self, value: int) -> int:
        """The primary rank's ``value`` on every rank (e.g. a shuffle seed)."""
        tensor = torch.tensor([int(value)], dtype=torch.int64)
        dist.broadcast(tensor, src=0, group=self._cpu_group)
        return int(tensor.item())

    def all_reduce_pairs_async(self, pairs: Sequence[tuple[Any, Any]]) -> Callable[[], list[float]]:
        """One asynchronous all-reduce (``async_op=True``) of the stacked float64 ``[value * weight..., weight...]``
        on the default group's device; the returned function waits for it and converts (one device wait)."""
        device = self.device or torch.device("cpu")
        values = torch.stack([torch.as_tensor(value, device=device).detach().reshape(()) for value, _ in pairs])
        weights = torch.stack([torch.as_tensor(weight, device=device).detach().reshape(()) for _, weight in pairs])
        values, weights = values.to(torch.float64), weights.to(torch.float64)
        sums = torch.cat([values * weights, weights])
        work = dist.all_reduce(sums, async_op=True)

        def result() -> list[float]:
            work.wait()
            return sums.tolist()

        return result


class DDPGradientSync(GradientSync):
    """Gradient synchronisation of ``DistributedDataParallel``: its all-reduce runs in the backward pass of the last
    chunk of a batch only; the chunks before it accumulate locally under ``no_sync()``.

    Args:
        model: The ``DistributedDataParallel`` training model.
    """

    def __init__(self, model: torch.nn.parallel.DistributedDataParallel):
        self.model = model

    def chunk_context(self, chunk: BatchChunk) -> AbstractContextManager:
        return nullcontext() if chunk.is_last else self.model.no_sync()


class ShardSampler(torch.utils.data.Sampler):
    """The sample indices ``rank, rank + world_size, ...`` of a map-style dataset of ``num_samples`` samples, in order.

    For evaluation: unlike ``DistributedSampler`` it pads nothing, so over all ranks every sample is evaluated
    exactly once (shards differ in length by at most one sample).
    """

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def _data_loader_arguments(loader: torch.utils.data.DataLoader) -> dict:
    """The arguments of ``loader`` that a sharded copy keeps (everything but the sampling)."""
    return {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
    }


def _is_map_style_loader(dataset: Any) -> bool:
    return isinstance(dataset, torch.utils.data.DataLoader) and not isinstance(
        dataset.dataset, torch.utils.data.IterableDataset
    )


def shard_training_dataset(dataset: Any, context: TorchDistributedContext) -> Any:
    """This rank's part of a training ``dataset``; every rank gets the same number of batches.

    * a :class:`mlpug.data.ResumableBatchSampler` (the dataset's or a ``DataLoader``'s ``batch_sampler``) is
      sharded in place (``set_shard``): global batch ``k`` of the epoch's order is split over the ranks;
    * a ``DataLoader`` with ``batch_size`` and a sequential or random sampler gets a copy with a
      ``DistributedSampler`` (shuffling as the original, seed broadcast from the primary rank, padded as
      ``DistributedSampler`` pads), whose epoch the manager sets every epoch;
    * a ``DataLoader`` with a ``DistributedSampler`` is used as it is;
    * anything else is used as it is, with a warning: every rank trains on what it yields.
    """
    from mlpug.data import find_resumable

    resumable = find_resumable(dataset)
    if resumable is not None and callable(getattr(resumable, "set_shard", None)):
        resumable.set_shard(context.rank, context.world_size)
        return dataset
    if _is_map_style_loader(dataset):
        sampler = dataset.sampler
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            return dataset
        plain = isinstance(sampler, (torch.utils.data.SequentialSampler, torch.utils.data.RandomSampler))
        if dataset.batch_size is not None and plain:
            seed = context.broadcast_int(torch.initial_seed() % 2**62)
            distributed_sampler: torch.utils.data.DistributedSampler = torch.utils.data.DistributedSampler(
                dataset.dataset,
                num_replicas=context.world_size,
                rank=context.rank,
                shuffle=isinstance(sampler, torch.utils.data.RandomSampler),
                seed=seed,
                drop_last=dataset.drop_last,
            )
            return torch.utils.data.DataLoader(
                dataset.dataset,
                batch_size=dataset.batch_size,
                sampler=distributed_sampler,
                drop_last=dataset.drop_last,
                **_data_loader_arguments(dataset),
            )
    _log.warning(
        f"Data-parallel training on {context.world_size} ranks: the training dataset ({type(dataset).__qualname__}) "
        "is not a DataLoader over a map-style dataset or a mlp.data resumable dataset, so mlpug cannot shard it; "
        "every rank trains on what it yields (shard it by rank yourself, and give every rank the same number of "
        "batches)."
    )
    return dataset


def shard_evaluation_dataset(dataset: Any, context: TorchDistributedContext) -> Any:
    """This rank's part of an evaluation ``dataset``, every sample on exactly one rank, unpadded.

    A ``DataLoader`` over a map-style dataset gets a copy with a :class:`ShardSampler` (its order is the
    original's when that was sequential); a :class:`mlpug.pytorch.data.ResumableArrayBatches` a sharded copy;
    anything else is evaluated whole on every rank (the reduced means are the same, the work is repeated), with a
    warning.
    """
    shard = getattr(dataset, "shard", None)
    if callable(shard):
        return shard(context.rank, context.world_size)
    if _is_map_style_loader(dataset) and dataset.batch_size is not None:
        return torch.utils.data.DataLoader(
            dataset.dataset,
            batch_size=dataset.batch_size,
            sampler=ShardSampler(len(dataset.dataset), context.rank, context.world_size),
            drop_last=False,
            **_data_loader_arguments(dataset),
        )
    _log.warning(
        f"Data-parallel evaluation on {context.world_size} ranks: the dataset ({type(dataset).__qualname__}) cannot "
        "be sharded by mlpug, so every rank evaluates all of it (the metrics are right, the work is repeated)."
    )
    return dataset


def warn_if_random_states_differ(context: TorchDistributedContext) -> bool:
    """Warn (on every rank whose state differs) when this rank's torch CPU random state is not rank 0's.

    A training checkpoint holds the primary rank's random states, which every rank restores on resume: exact when
    the ranks draw alike (the same seed), otherwise the other ranks' streams (e.g. their dropout masks) continue
    from rank 0's after a resume. Called by the ``DefaultTrainer`` in ``set_training_model`` (every rank; two
    small collectives).

    Returns:
        True when some rank's state differs.
    """
    import zlib

    own = zlib.crc32(torch.random.get_rng_state().numpy().tobytes())
    differs = own != context.broadcast_int(own)
    any_differs = context.any_rank(differs)
    if differs:
        _log.warning(
            f"rank {context.rank}'s torch random state differs from rank 0's (seeded differently?): a training "
            "checkpoint holds rank 0's random states, which every rank restores, so after a resume this rank's "
            "random draws (e.g. dropout) do not continue exactly. Seed every rank alike (torch.manual_seed(seed)) "
            "for an exact resume."
        )
    return any_differs


def _launched(
    local_rank: int, function: Callable, args: tuple, kwargs: dict, world_size: int, port: int, raised_at: Any
) -> None:
    global _ending_with_error
    os.environ.update(
        {
            "RANK": str(local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    try:
        function(*args, **kwargs)
    except Exception:
        _ending_with_error = True
        raised_at[local_rank] = time.monotonic()
        raise


def _join(context: Any, raised_at: Any) -> None:
    """Wait for the processes of ``context``; when one fails, terminate the others and raise for the process that
    failed first (:func:`mlpug.distributed.first_failure`), naming how the others ended."""
    processes = context.processes
    sentinels = {process.sentinel: index for index, process in enumerate(processes)}
    seen: list[int] = []
    while sentinels and not seen:
        for sentinel in multiprocessing.connection.wait(list(sentinels)):
            index = sentinels.pop(sentinel)
            processes[index].join()
            if processes[index].exitcode != 0:
                seen.append(index)
    if not seen:
        return
    first = first_failure(list(raised_at), seen)
    terminated = [index for index, process in enumerate(processes) if process.is_alive()]
    for index in terminated:
        processes[index].terminate()
    deadline = time.monotonic() + 30.0
    for index in terminated:
        processes[index].join(max(deadline - time.monotonic(), 0.0))
        if processes[index].is_alive():
            processes[index].kill()
            processes[index].join()
    raised = [_raised_error(context.error_files[index]) for index in range(len(processes))]
    after = after_first_failure(first, [process.exitcode for process in processes], raised, terminated)
    code = processes[first].exitcode
    trace = _raised_error(context.error_files[first], whole=True)
    if trace:
        message = f"\n\n-- Process {first:d} of {len(processes)} failed first, with the following error:\n{trace}"
        raise torch.multiprocessing.ProcessRaisedException(message + after, first, processes[first].pid)
    signal_name = None
    if code is not None and code < 0:
        try:
            signal_name = signal.Signals(-code).name
        except ValueError:
            signal_name = str(-code)
    raise torch.multiprocessing.ProcessExitedException(
        f"process {first:d} of {len(processes)} failed first: it {exit_description(code)}{after}",
        error_index=first,
        error_pid=processes[first].pid,
        exit_code=code,
        signal_name=signal_name,
    )


def _raised_error(error_file: str, whole: bool = False) -> str:
    """What a process's function raised (torch's ``start_processes`` writes its traceback to ``error_file``): the
    last line of the traceback, or all of it; empty when it did not raise."""
    if not os.access(error_file, os.R_OK):
        return ""
    with open(error_file, "rb") as file:  # the pickled str of traceback.format_exc(), written by our own child
        trace = pickle.load(file)
    lines = str(trace).strip().splitlines()
    return str(trace) if whole else (lines[-1] if lines else "")


def launch(function: Callable, *args: Any, num_processes: Optional[int] = None, **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` on ``num_processes`` local processes, or in this process when that is 1.

    The same training function runs on every GPU of the machine, or, where there is one device (or only the CPU),
    here, unchanged. Under ``torchrun`` (``WORLD_SIZE`` set) it just calls ``function``: torchrun already started
    the processes.

    Processes are started with ``torch.multiprocessing.start_processes`` (``spawn``), on the loopback address
    with a free port; each gets the environment ``torchrun`` would set (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), so the ``DefaultTrainer`` joins the process group itself, and, unless set,
    ``OMP_NUM_THREADS`` = CPU cores / processes. When one process fails (raises, is killed, exits with a non-zero
    code), the others are terminated and the failure of the process that failed first (not one whose collective
    failed because a peer was gone) is raised here, with the child's traceback and how the others ended.

    Args:
        function: A picklable (module-level) function.
        num_processes: Processes to start (int >= 1); default the number of CUDA devices, 1 without CUDA.

    Returns:
        What ``function`` returned when it ran in this process, else None.

    Raises:
        ValueError: ``num_processes`` is not an int >= 1.
        torch.multiprocessing.ProcessRaisedException / ProcessExitedException: A process failed (``error_index``:
            the one that failed first; the message says how the others ended).
    """
    if "WORLD_SIZE" in os.environ:
        return function(*args, **kwargs)
    if num_processes is None:
        num_processes = max(torch.cuda.device_count(), 1)
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if num_processes == 1:
        return function(*args, **kwargs)
    threads_set = "OMP_NUM_THREADS" in os.environ
    if not threads_set:  # as torchrun does: the cores shared by the processes, not oversubscribed
        os.environ["OMP_NUM_THREADS"] = str(max((os.cpu_count() or 1) // num_processes, 1))
    raised_at = torch.multiprocessing.get_context("spawn").Array("d", num_processes, lock=False)
    try:
        context = torch.multiprocessing.start_processes(
            _launched,
            args=(function, args, kwargs, num_processes, free_port(), raised_at),
            nprocs=num_processes,
            join=False,
            start_method="spawn",
        )
        _join(context, raised_at)
    finally:
        if not threads_set:
            del os.environ["OMP_NUM_THREADS"]
    return None
