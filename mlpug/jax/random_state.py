"""JAX's random state: the ``nnx.Rngs`` streams of the training model (:class:`NnxRngStreams`), and
``set_random_seed``.

JAX has no global random generator: random numbers come from explicit keys. In Flax NNX a module draws them from
``nnx.Rngs`` streams (``nnx.Dropout``, initialisers), whose keys and counts are ``nnx.RngState`` variables of the
model. The JAX ``DefaultTrainer`` lists them as one random-state provider (besides Python's and NumPy's), so a
training checkpoint holds them as plain ints and a resumed run draws the same dropout masks; they are not part of
the model components' weights (``trainer.get_state()["model_components"]``).

Capturing and restoring the streams around an evaluation (:func:`mlpug.random_state.isolated_random_states`, which a
batch-level ``TestMetricsLogger`` runs at every batch) stays on the device: :meth:`NnxRngStreams.capture` copies the
arrays on their device (a compiled step donates the variables' buffers, so a reference alone would be deleted by the
next step) and :meth:`NnxRngStreams.restore` writes copies back; only :meth:`NnxRngStreams.to_state`, when a
checkpoint asks for the values, transfers them to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mlpug.random_state import RandomStateProvider, check_seed, set_python_and_numpy_seed

RngVariables = Callable[[], list[tuple[str, nnx.Variable]]]
"""Returns the ``nnx.RngState`` variables of the model with their names (dotted paths), in a stable order."""


def _is_key(value: Any) -> bool:
    return jnp.issubdtype(value.dtype, jax.dtypes.prng_key)


class NnxRngStreams(RandomStateProvider):
    """The keys and counts of the ``nnx.Rngs`` streams of a model, as plain ints.

    Args:
        variables: The ``nnx.RngState`` variables to save and restore (see :data:`RngVariables`); called every time,
            so that it follows the trainer's training model.
    """

    name = "flax_nnx_rngs"

    def __init__(self, variables: RngVariables):
        self._variables = variables

    def get_state(self) -> dict:
        """Per variable name ``{"key": bool, "shape": [...], "data": [int, ...]}``: the key data (``uint32``) of a
        key, or the values of a count; one host transfer for all."""
        named = self._variables()
        return self._plain([(name, variable.get_raw_value()) for name, variable in named])

    @staticmethod
    def _plain(named_values: list[tuple[str, jax.Array]]) -> dict:
        """:meth:`get_state`'s form of ``(name, value)`` pairs, with one host transfer for all."""
        keys = [_is_key(value) for _, value in named_values]
        host = jax.device_get([jax.random.key_data(v) if is_key else v for (_, v), is_key in zip(named_values, keys)])
        return {
            name: {"key": is_key, "shape": list(np.shape(array)), "data": np.asarray(array).reshape(-1).tolist()}
            for (name, _), is_key, array in zip(named_values, keys, host)
        }

    def capture(self) -> list[tuple[str, nnx.Variable, jax.Array]]:
        """``(name, variable, copy of its value)`` of every stream variable, copied on the device (no host
        transfer, no wait for the device; see the module docstring)."""
        return [
            (name, variable, jnp.array(variable.get_raw_value(), copy=True)) for name, variable in self._variables()
        ]

    def restore(self, captured: list[tuple[str, nnx.Variable, jax.Array]]) -> None:
        """Write what :meth:`capture` took back into the same variables (copies, on the device: ``captured`` stays
        valid after the next donating step)."""
        for _, variable, value in captured:
            variable.set_raw_value(jnp.array(value, copy=True))

    def to_state(self, captured: list[tuple[str, nnx.Variable, jax.Array]]) -> dict:
        """What :meth:`capture` took, as :meth:`get_state` would have returned it then (one host transfer)."""
        return self._plain([(name, value) for name, _, value in captured])

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`get_state` returned.

        Raises:
            ValueError: The saved streams have other names, kinds or shapes than the model's (a different model).
        """
        named = dict(self._variables())
        if set(named) != set(state):
            raise ValueError(
                f"the checkpoint's nnx.Rngs variables {sorted(state)} do not match the model's {sorted(named)}"
            )
        new_values = {}
        for name, variable in named.items():
            saved, current = state[name], variable.get_raw_value()
            is_key = _is_key(current)
            current_data = jax.random.key_data(current) if is_key else current
            if bool(saved["key"]) != is_key or list(saved["shape"]) != list(np.shape(current_data)):
                raise ValueError(
                    f"nnx.Rngs variable {name!r}: saved as {'a key' if saved['key'] else 'a count'} of shape "
                    f"{saved['shape']}, the model has {'a key' if is_key else 'a count'} of shape "
                    f"{list(np.shape(current_data))}"
                )
            data = np.asarray(saved["data"], dtype=np.dtype(current_data.dtype)).reshape(saved["shape"])
            if is_key:
                new_values[name] = jax.random.wrap_key_data(jnp.asarray(data), impl=jax.random.key_impl(current))
            else:
                new_values[name] = jnp.asarray(data)
        for name, value in new_values.items():
            named[name].set_raw_value(value)


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random`` and NumPy's global generator (``mlp.set_random_seed``, the same call on every
    backend). JAX has no global generator: seed the model's ``nnx.Rngs(seed)`` (and any ``jax.random.key(seed)``)
    yourself.

    Raises:
        ValueError: ``seed`` is not an int in ``[0, 2**32)``.
    """
    check_seed(seed)
    set_python_and_numpy_seed(seed)
