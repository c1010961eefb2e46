"""Random-state providers: the random number generators whose states a training checkpoint saves and restores.

A trainer lists the providers of its run (:meth:`mlpug.trainers.trainer.BackendTrainer.random_state_providers`): the
neutral ones below (Python's ``random`` module, NumPy's global generator) and those of its backend
(``mlpug.pytorch.random_state``, ``mlpug.tensorflow.random_state``). Nothing is registered globally at import.

Every provider returns plain containers of Python scalars (no tensors or arrays), so every saver can store every
provider's state.
"""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

_log = logging.getLogger("mlpug.random_state")


class RandomStateProvider(ABC):
    """One random number generator whose state is saved in training checkpoints.

    Attributes:
        name: The key of its state in checkpoints (``"python"``, ``"numpy"``, ``"torch"``, ...).
    """

    name: str = "random"

    @abstractmethod
    def get_state(self) -> Any:
        """The generator's state as plain containers of Python scalars."""

    @abstractmethod
    def set_state(self, state: Any) -> None:
        """Restore what :meth:`get_state` returned."""

    def capture(self) -> Any:
        """The state in whatever form is fastest to take and give back in this process (for
        :func:`isolated_random_states`; not saved); default :meth:`get_state`."""
        return self.get_state()

    def restore(self, captured: Any) -> None:
        """Give back what :meth:`capture` took; default :meth:`set_state`."""
        self.set_state(captured)

    def to_state(self, captured: Any) -> Any:
        """What :meth:`capture` took, as :meth:`get_state` would have returned it then (plain containers)."""
        return captured


class PythonRandomState(RandomStateProvider):
    """Python's ``random`` module (its global Mersenne Twister)."""

    name = "python"

    def get_state(self) -> Any:
        return random.getstate()

    def set_state(self, state: Any) -> None:
        version, internal, gauss = state
        random.setstate((version, tuple(internal), gauss))


class NumpyRandomState(RandomStateProvider):
    """NumPy's legacy global generator (``numpy.random.seed`` / ``numpy.random.rand``, MT19937)."""

    name = "numpy"

    def get_state(self) -> dict:
        state = np.random.get_state(legacy=False)
        assert isinstance(state, dict)
        return {
            "bit_generator": state["bit_generator"],
            "key": [int(k) for k in state["state"]["key"]],
            "pos": int(state["state"]["pos"]),
            "has_gauss": int(state["has_gauss"]),
            "gauss": float(state["gauss"]),
        }

    def capture(self) -> Any:
        return np.random.get_state()

    def restore(self, captured: Any) -> None:
        np.random.set_state(captured)

    def to_state(self, captured: Any) -> dict:
        name, key, pos, has_gauss, gauss = captured
        return {"bit_generator": name, "key": [int(k) for k in key], "pos": int(pos), "has_gauss": int(has_gauss),
                "gauss": float(gauss)}  # fmt: skip

    def set_state(self, state: Mapping[str, Any]) -> None:
        np.random.set_state(
            {
                "bit_generator": state["bit_generator"],
                "state": {"key": np.asarray(state["key"], dtype=np.uint32), "pos": state["pos"]},
                "has_gauss": state["has_gauss"],
                "gauss": state["gauss"],
            }
        )


@contextmanager
def isolated_random_states(providers: Sequence[RandomStateProvider]) -> Iterator[None]:
    """A context after which every provider's generator is where it was before: what runs inside (e.g. evaluation,
    whose ``iter(DataLoader)`` draws from torch's global generator) does not move the training's random streams."""
    captured = [provider.capture() for provider in providers]
    try:
        yield
    finally:
        for provider, state in zip(providers, captured):
            provider.restore(state)


def capture_random_states(providers: Sequence[RandomStateProvider]) -> list:
    """Every provider's state in its fastest form (:meth:`RandomStateProvider.capture`); see :func:`plain_states`."""
    return [provider.capture() for provider in providers]


def plain_states(providers: Sequence[RandomStateProvider], captured: Sequence[Any]) -> dict[str, Any]:
    """What :func:`capture_random_states` took, as :func:`get_random_states` would have returned it then."""
    return {provider.name: provider.to_state(state) for provider, state in zip(providers, captured)}


def get_random_states(providers: Sequence[RandomStateProvider]) -> dict[str, Any]:
    """State of every provider, keyed by its name."""
    return {provider.name: provider.get_state() for provider in providers}


def set_random_states(providers: Sequence[RandomStateProvider], states: Mapping[str, Any]) -> None:
    """Restore the states from :func:`get_random_states`; a saved state without a provider here is reported.

    Args:
        providers: The providers of this run.
        states: Saved states by provider name.
    """
    by_name = {provider.name: provider for provider in providers}
    for name, state in states.items():
        provider = by_name.get(name)
        if provider is None:
            _log.warning(f"The checkpoint holds the random state of {name!r}, which is not in use here; ignored.")
            continue
        provider.set_state(state)


def check_seed(seed: Any) -> int:
    """A seed for :func:`set_python_and_numpy_seed` and the backends' ``set_random_seed``.

    Raises:
        ValueError: ``seed`` is not an int in ``[0, 2**32)`` (NumPy's range).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return seed


def set_python_and_numpy_seed(seed: int) -> None:
    """Seed Python's ``random`` and NumPy's global generator (``np.random.seed``) with ``seed``.

    Raises:
        ValueError: See :func:`check_seed`.
    """
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
