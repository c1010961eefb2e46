"""Several JAX processes training one model: joining them (:func:`initialize`), starting them (:func:`launch`) and
what the neutral core needs to know of them (:class:`JaxProcessContext`).

JAX trains on several processes as one program over one device mesh: every process runs the same compiled step on
*global* arrays that span the devices of every process, and XLA's collectives (on CPUs: gloo over TCP) join their
parts (see :mod:`mlpug.jax.strategies.data_parallel`). Each process feeds its part of every global batch; the
``DefaultTrainer`` gives the loss as the global batch's (the same on every process) and the per-sample outputs
(auxiliary results) as this process's part, matching the batch the process fed, so metrics computed from them are
this process's and the neutral core reduces them over the processes (:class:`JaxProcessContext`) as on PyTorch.

Only process 0 writes checkpoints and logs (``DistributedContext.is_primary``, as on every backend).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from mlpug.distributed import DistributedContext

DEFAULT_TIMEOUT_S = 300.0
"""Seconds :func:`initialize` waits for every process to join (``MLPUG_DISTRIBUTED_TIMEOUT_S`` overrides)."""

ENVIRONMENT = ("MLPUG_JAX_COORDINATOR", "MLPUG_JAX_NUM_PROCESSES", "MLPUG_JAX_PROCESS_ID")
"""The environment variables :func:`launch` sets for each process it starts (read by :func:`initialize`)."""


class JaxProcessContext(DistributedContext):
    """The processes of a ``jax.distributed`` run as the neutral core's :class:`~mlpug.distributed.DistributedContext`:
    rank ``jax.process_index()`` of ``jax.process_count()``; the collectives gather Python numbers from every process
    (``jax.experimental.multihost_utils.process_allgather``, a compiled all-gather over the processes' devices),
    blocking. The loss of a step is the global batch's on every process already; the metrics computed from a step's
    auxiliary results (this process's part, see the module docstring) are this process's, and the sample-weighted
    means over the processes make them the global batch's.
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launched(process_id: int, num_processes: int, port: int, function: Callable, args: tuple, kwargs: dict) -> None:
    os.environ.update(
        {
            "MLPUG_JAX_COORDINATOR": f"127.0.0.1:{port}",
            "MLPUG_JAX_NUM_PROCESSES": str(num_processes),
            "MLPUG_JAX_PROCESS_ID": str(process_id),
        }
    )
    initialize()
    function(*args, **kwargs)


def launch(
    function: Callable,
    *args: Any,
    num_processes: int = 1,
    timeout_s: Optional[float] = None,
    **kwargs: Any,
) -> Any:
    """Run ``function(*args, **kwargs)`` in ``num_processes`` local JAX processes joined into one run, or here when
    that is 1.

    Each process is started with ``multiprocessing`` (``spawn``), joins the others on the loopback address and a free
    port (:func:`initialize`: ``jax.distributed.initialize`` with the gloo CPU collectives) and then calls
    ``function``; a ``DefaultTrainer`` made there trains data parallel over the devices of every process (see
    :mod:`mlpug.jax.strategies.data_parallel`). When one process fails (exits with a non-zero code), the others are
    terminated and a ``RuntimeError`` names it.

    Args:
        function: A picklable (module-level) function.
        num_processes: Processes to start (int >= 1).
        timeout_s: Seconds the whole run may take (default: no limit); the processes are terminated after it.

    Returns:
        What ``function`` returned when it ran in this process, else None.

    Raises:
        ValueError: ``num_processes`` is not an int >= 1.
        RuntimeError: A process failed (its index and exit code are named) or the run took longer than
            ``timeout_s``.
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if num_processes == 1:
        return function(*args, **kwargs)
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(target=_launched, args=(index, num_processes, port, function, args, kwargs))
        for index in range(num_processes)
    ]
    for process in processes:
        process.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed: Optional[int] = None
    try:
        while any(process.is_alive() for process in processes):
            failed = next((i for i, p in enumerate(processes) if p.exitcode not in (None, 0)), None)
            if failed is not None:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the {num_processes} JAX processes ran longer than timeout_s={timeout_s} s")
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
    if failed is None:
        failed = next((i for i, p in enumerate(processes) if p.exitcode != 0), None)
    if failed is not None:
        codes = {index: process.exitcode for index, process in enumerate(processes)}
        raise RuntimeError(
            f"JAX process {failed} of {num_processes} failed first (exit code {codes[failed]}); exit codes: {codes}"
        )
    return None


__all__ = ["JaxProcessContext", "initialize", "launch"]
