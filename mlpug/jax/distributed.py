"""Several JAX processes training one model: joining them (:func:`initialize`), starting them (:func:`launch`) and
what the neutral core needs to know of them (:class:`JaxProcessContext`).

JAX trains on several processes as one program over one device mesh: every process runs the same compiled step on
*global* arrays that span the devices of every process, and XLA's collectives (on CPUs: gloo over TCP) join their
parts (see :mod:`mlpug.jax.strategies.data_parallel`). Each process feeds its part of every global batch; the
``DefaultTrainer`` gives the loss as the global batch's (the same on every process), and the sample count and the
per-sample outputs (auxiliary results) as this process's part, matching the batch the process fed, so metrics
computed from them are this process's and the neutral core reduces them over the processes
(:class:`JaxProcessContext`) as on PyTorch. A training model that returns its own ``num_samples`` is refused (the
compiled step can only count the global batch's).

Only process 0 writes checkpoints and logs (``DistributedContext.is_primary``, as on every backend).
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from mlpug.distributed import DistributedContext, after_first_failure, exit_description, first_failure, free_port

DEFAULT_TIMEOUT_S = 300.0
"""Seconds :func:`initialize` waits for every process to join (``MLPUG_DISTRIBUTED_TIMEOUT_S`` overrides)."""

ENVIRONMENT = ("MLPUG_JAX_COORDINATOR", "MLPUG_JAX_NUM_PROCESSES", "MLPUG_JAX_PROCESS_ID")
"""The environment variables :func:`launch` sets for each process it starts (read by :func:`initialize`)."""


class JaxProcessContext(DistributedContext):
    """The processes of a ``jax.distributed`` run as the neutral core's :class:`~mlpug.distributed.DistributedContext`:
    rank ``jax.process_index()`` of ``jax.process_count()``; the collectives gather Python numbers from every process
    (``jax.experimental.multihost_utils.process_allgather``, a compiled all-gather over the processes' devices),
    blocking.

    What the ``DefaultTrainer`` gives each process of a step (see the module docstring): the loss of the global batch
    (the same on every process), and the ``num_samples`` and auxiliary results of this process's part of the batch
    (:meth:`~mlpug.jax.strategies.DataParallelStrategy.local_num_samples`,
    :meth:`~mlpug.jax.strategies.DataParallelStrategy.local_outputs`), as on PyTorch. So the metrics are computed
    from this process's part, weighted by its samples (or by the weight a metric returns), and the sample-weighted
    means over the processes make them the global batch's; the loss's mean over the processes is the global loss.
    The logged ``batch_size`` is this process's.
    """

    def __init__(self) -> None:
        self.rank = jax.process_index()
        self.world_size = jax.process_count()

    def barrier(self) -> None:
        multihost_utils.sync_global_devices("mlpug barrier")

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` (Python numbers, the same count on every process) over the processes, in
        float64 on the host (gathered as float32 pairs of a high and a low part: about 48 significant bits, exact for
        the counts and flags the core reduces)."""
        numbers = np.asarray([float(value) for value in values], dtype=np.float64)
        high = numbers.astype(np.float32)
        low = (numbers - high.astype(np.float64)).astype(np.float32)
        gathered = np.asarray(multihost_utils.process_allgather(np.stack([high, low])), dtype=np.float64)
        return (gathered.reshape(self.world_size, 2, -1).sum(axis=(0, 1))).tolist()


def initialize(timeout_s: Optional[float] = None) -> JaxProcessContext:
    """Join the processes that :func:`launch` started (``jax.distributed.initialize`` from its environment; on
    CPUs with the gloo collectives), once per process; a process not started so is left alone.

    :func:`launch` calls it in every process it starts, before the training function. A process started otherwise
    (one command per process) sets ``MLPUG_JAX_COORDINATOR`` (``host:port`` of process 0),
    ``MLPUG_JAX_NUM_PROCESSES`` and ``MLPUG_JAX_PROCESS_ID`` and calls it first, before any JAX computation (JAX
    cannot join processes afterwards); or calls ``jax.distributed.initialize`` itself.

    Args:
        timeout_s: Seconds to wait for every process to join (default ``MLPUG_DISTRIBUTED_TIMEOUT_S`` or 300).

    Returns:
        The processes' context (rank, world size).

    Raises:
        ValueError: The environment of :func:`launch` is incomplete or invalid (the variables are named).
        RuntimeError: JAX was used before, so the processes can no longer be joined (``jax.distributed`` says so).
    """
    if jax.distributed.is_initialized() or "MLPUG_JAX_COORDINATOR" not in os.environ:
        return JaxProcessContext()
    missing = [name for name in ENVIRONMENT if name not in os.environ]
    if missing:
        raise ValueError(f"the environment of mlpug.jax.distributed.launch is incomplete: {missing} are not set")
    timeout = (
        timeout_s if timeout_s is not None else float(os.environ.get("MLPUG_DISTRIBUTED_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["MLPUG_JAX_COORDINATOR"],
        num_processes=int(os.environ["MLPUG_JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["MLPUG_JAX_PROCESS_ID"]),
        initialization_timeout=int(max(timeout, 1)),
    )
    return JaxProcessContext()


def _launched(
    process_id: int,
    num_processes: int,
    port: int,
    errors: str,
    function: Callable,
    args: tuple,
    kwargs: dict,
) -> None:
    """A process :func:`launch` started: join the others, run ``function``; when it raises, write the time and the
    traceback to ``errors/<process_id>.txt`` (read by :func:`_failure_report`) and raise on."""
    os.environ.update(
        {
            "MLPUG_JAX_COORDINATOR": f"127.0.0.1:{port}",
            "MLPUG_JAX_NUM_PROCESSES": str(num_processes),
            "MLPUG_JAX_PROCESS_ID": str(process_id),
        }
    )
    try:
        initialize()
        function(*args, **kwargs)
    except Exception:
        with open(os.path.join(errors, f"{process_id}.txt"), "w") as file:
            file.write(f"{time.time()!r}\n{traceback.format_exc()}")
        raise


def _raised(errors: str, process_id: int) -> Optional[tuple[float, str]]:
    """``(when, traceback)`` of what process ``process_id``'s function raised, or None when it did not."""
    path = os.path.join(errors, f"{process_id}.txt")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        moment, _, trace = file.read().partition("\n")
    return float(moment), trace


def _failure_report(processes: Sequence[Any], failed: Sequence[int], errors: str, terminated: Sequence[int]) -> str:
    """The message of a failed launch: which process failed first, with its traceback when its function raised,
    and how the others ended.

    The first failure is a process that ended without raising (killed, crashed, ``sys.exit``: the others'
    collectives then fail because it is gone), else the one that raised first.

    Args:
        processes: The started processes (joined).
        failed: The processes seen ending with a non-zero exit code while the others ran (at least one).
        errors: The directory the processes' tracebacks were written to (see :func:`_launched`).
        terminated: The processes the launcher terminated.
    """
    raised = [_raised(errors, index) for index in range(len(processes))]
    first = first_failure([error[0] if error is not None else 0.0 for error in raised], failed)
    last_lines = [error[1].strip().splitlines()[-1] if error is not None else "" for error in raised]
    after = after_first_failure(first, [process.exitcode for process in processes], last_lines, terminated)
    error = raised[first]
    if error is not None:
        return f"JAX process {first} of {len(processes)} failed first, with the following error:\n{error[1]}{after}"
    return (
        f"JAX process {first} of {len(processes)} failed first: it {exit_description(processes[first].exitcode)}{after}"
    )


def launch(
    function: Callable,
    *args: Any,
    num_processes: int = 1,
    timeout_s: Optional[float] = None,
    **kwargs: Any,
) -> Any:
    """Run ``function(*args, **kwargs)`` in ``num_processes`` local JAX processes joined into one run, or here when
    that is 1 or when this process is already one of a run (``MLPUG_JAX_COORDINATOR`` set, e.g. by a launch that
    started it or by a command per process, or ``jax.distributed.is_initialized()``): then it joins that run
    (:func:`initialize`) and calls ``function``, as PyTorch's ``launch`` does under ``torchrun``.

    Each process is started with ``multiprocessing`` (``spawn``), joins the others on the loopback address and a free
    port (:func:`initialize`: ``jax.distributed.initialize`` with the gloo CPU collectives) and then calls
    ``function``; a ``DefaultTrainer`` made there trains data parallel over the devices of every process (see
    :mod:`mlpug.jax.strategies.data_parallel`). When one process fails (raises, is killed, exits with a non-zero
    code), the others are terminated and a ``RuntimeError`` names the process that failed first (not one whose
    collective failed because a peer was gone), with its traceback, and how the others ended.

    Args:
        function: A picklable (module-level) function.
        num_processes: Processes to start (int >= 1).
        timeout_s: Seconds the whole run may take (default: no limit); the processes are terminated after it.

    Returns:
        What ``function`` returned when it ran in this process, else None.

    Raises:
        ValueError: ``num_processes`` is not an int >= 1.
        RuntimeError: A process failed (the message names the first and holds its traceback) or the run took longer
            than ``timeout_s``.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if "MLPUG_JAX_COORDINATOR" in os.environ or jax.distributed.is_initialized():
        initialize()
        return function(*args, **kwargs)
    if num_processes == 1:
        return function(*args, **kwargs)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mlpug-jax-launch-") as errors:
        port = free_port()
        processes = [
            context.Process(target=_launched, args=(index, num_processes, port, errors, function, args, kwargs))
            for index in range(num_processes)
        ]
        for process in processes:
            process.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failed: list[int] = []
        terminated: list[int] = []
        try:
            while any(process.is_alive() for process in processes):
                failed = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0)]
                if failed:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"the {num_processes} JAX processes ran longer than timeout_s={timeout_s} s")
                time.sleep(0.05)
        finally:
            terminated = [index for index, process in enumerate(processes) if process.is_alive()]
            for index in terminated:
                processes[index].terminate()
            for process in processes:
                process.join(30)
                if process.is_alive():
                    process.kill()
                    process.join()
        failed = failed or [i for i, p in enumerate(processes) if p.exitcode != 0]
        if failed:
            raise RuntimeError(_failure_report(processes, failed, errors, terminated))
    return None


__all__ = ["JaxProcessContext", "initialize", "launch"]
