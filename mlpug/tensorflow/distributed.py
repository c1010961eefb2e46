"""TensorFlow: refusing a multi-worker cluster (``TF_CONFIG``) while data-parallel training is not supported.

A multi-worker launch gives every process a ``TF_CONFIG`` whose ``cluster`` lists all tasks. Without data-parallel
support (``tf.distribute``) they would be independent trainings of the same data writing the same files, so the
``DefaultTrainer`` calls :func:`check_single_process` at construction, next to its ``distribution_strategy``
argument, where data-parallel set-up will go.
"""

from __future__ import annotations

import json
import os

from mlpug.distributed import several_processes_error


def check_single_process() -> None:
    """Raise when ``TF_CONFIG`` describes a cluster of more than one task (chief, workers, parameter servers).

    Raises:
        RuntimeError: The cluster has several tasks (counted per job in the message).
        ValueError: ``TF_CONFIG`` is not a JSON object with a ``cluster`` of job name -> list of addresses.
    """
    value = os.environ.get("TF_CONFIG")
    if not value:
        return
    try:
        cluster = json.loads(value).get("cluster") or {}
        tasks = {job: len(addresses) for job, addresses in cluster.items() if job != "evaluator"}
    except (ValueError, AttributeError, TypeError):
        raise ValueError(
            f"the environment variable TF_CONFIG is {value!r:.200}, not a JSON object with a cluster of job name -> "
            'list of addresses (e.g. {"cluster": {"worker": ["host:port"]}, "task": {"type": "worker", "index": 0}})'
        ) from None
    if sum(tasks.values()) > 1:
        jobs = ", ".join(f"{job}: {count}" for job, count in tasks.items())
        raise several_processes_error(
            f"TF_CONFIG describes a cluster of {sum(tasks.values())} tasks ({jobs})", "unset TF_CONFIG"
        )
