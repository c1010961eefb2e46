"""PyTorch's random-state provider: the CPU generator and, when CUDA is initialised, every CUDA device's.

See :mod:`mlpug.random_state`; the PyTorch ``DefaultTrainer`` lists it among its providers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch

from mlpug.random_state import RandomStateProvider, set_python_and_numpy_seed

_log = logging.getLogger("mlpug.pytorch.random_state")


class TorchRandomState(RandomStateProvider):
    """``torch.get_rng_state()`` and ``torch.cuda.get_rng_state_all()``, as plain lists of byte values."""

    name = "torch"

    def get_state(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        return {"cpu": torch.get_rng_state().tolist(), "cuda": [state.tolist() for state in cuda]}

    def capture(self) -> Any:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    def restore(self, captured: Any) -> None:
        cpu, cuda = captured
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    def to_state(self, captured: Any) -> dict:
        cpu, cuda = captured
        return {"cpu": cpu.tolist(), "cuda": [state.tolist() for state in cuda or []]}

    def set_state(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
        cuda_states: Optional[list] = state.get("cuda")
        if not cuda_states:
            return
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda_states):
            _log.warning(
                f"The checkpoint holds the random states of {len(cuda_states)} CUDA devices, but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} are available here; not restored."
            )
            return
        torch.cuda.set_rng_state_all([torch.tensor(values, dtype=torch.uint8) for values in cuda_states])


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (``torch.manual_seed``: the CPU and every CUDA
    device), so that a run is repeatable (``mlp.set_random_seed``, the same call on every backend).

    Raises:
        ValueError: ``seed`` is not an int in ``[0, 2**32)``.
    """
    set_python_and_numpy_seed(seed)
    torch.manual_seed(seed)
