"""PyTorch: refusing a launch of several processes (``torchrun``) while data-parallel training is not supported.

``torchrun --nproc_per_node N`` starts N copies of the script with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in
their environment. Without data-parallel support they would be N independent trainings of the same data writing
the same files, so the ``DefaultTrainer`` calls :func:`check_single_process` at construction, where data-parallel
set-up (a process group, a gradient synchronisation instead of the null ``GradientSync``) will go.
"""

from __future__ import annotations

import os

from mlpug.distributed import several_processes_error


def check_single_process() -> None:
    """Raise when the environment says that several processes were launched (``WORLD_SIZE > 1``).

    Raises:
        RuntimeError: ``WORLD_SIZE`` is above 1 (with ``RANK`` and ``LOCAL_RANK`` in the message).
        ValueError: ``WORLD_SIZE`` is not an int.
    """
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return
    try:
        world_size = int(value)
    except ValueError:
        raise ValueError(
            f"the environment variable WORLD_SIZE is {value!r}, not an int (torchrun sets it to the number of "
            "processes); unset it to train in one process"
        ) from None
    if world_size > 1:
        ranks = ", ".join(f"{name}={os.environ.get(name, '?')}" for name in ("RANK", "LOCAL_RANK"))
        raise several_processes_error(
            f"torchrun (or another launcher) started {world_size} processes (WORLD_SIZE={world_size}, {ranks})",
            "python script.py, or torchrun --nproc_per_node 1",
        )
