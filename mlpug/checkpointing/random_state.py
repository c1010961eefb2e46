"""The process-global registry of random number generators whose states training checkpoints save."""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

import numpy as np

_log = logging.getLogger("mlpug.checkpointing")

_RANDOM_STATE_SOURCES: dict = {}


def register_random_state(name: str, get: Callable[[], Any], set_: Callable[[Any], None]) -> None:
    """Register a random number generator whose state training checkpoints save and restore.

    Backends register theirs at import (``"torch"``, ``"tensorflow"``); the core registers ``"python"``
    (the ``random`` module) and ``"numpy"`` (NumPy's global generator). ``get`` must return plain containers
    of Python scalars only (no tensors or arrays): a process may import several backends, and every
    backend's saver must be able to store every registered state.
    """
    _RANDOM_STATE_SOURCES[name] = (get, set_)


def get_random_state() -> dict:
    """State of every registered random number generator, keyed by source name."""
    return {name: get() for name, (get, _) in _RANDOM_STATE_SOURCES.items()}


def set_random_state(state: dict) -> None:
    """Restore generator states from :func:`get_random_state`; sources not registered here are reported."""
    for name, value in state.items():
        if name not in _RANDOM_STATE_SOURCES:
            _log.warning(f"The checkpoint holds the random state of {name!r}, which is not in use here; ignored.")
            continue
        _RANDOM_STATE_SOURCES[name][1](value)


def _get_numpy_state() -> dict:
    state = np.random.get_state(legacy=False)
    return {
        "bit_generator": state["bit_generator"],
        "key": [int(k) for k in state["state"]["key"]],
        "pos": int(state["state"]["pos"]),
        "has_gauss": int(state["has_gauss"]),
        "gauss": float(state["gauss"]),
    }


def _set_numpy_state(state: dict) -> None:
    np.random.set_state(
        {
            "bit_generator": state["bit_generator"],
            "state": {"key": np.asarray(state["key"], dtype=np.uint32), "pos": state["pos"]},
            "has_gauss": state["has_gauss"],
            "gauss": state["gauss"],
        }
    )


register_random_state("python", random.getstate, random.setstate)
register_random_state("numpy", _get_numpy_state, _set_numpy_state)
