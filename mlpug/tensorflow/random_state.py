"""TensorFlow's random-state provider: the global generator (``tf.random.get_global_generator()``).

See :mod:`mlpug.random_state`; the TensorFlow ``DefaultTrainer`` lists it among its providers. The states of the
Keras seed generators of the model (dropout etc.) are part of the trainer state instead
(:mod:`mlpug.tensorflow.trainers.seed_generators`). What public APIs cannot capture is not saved: the hidden
counters of stateful random ops seeded by ``tf.random.set_seed`` (e.g. ``tf.random.normal`` without a
generator) and Keras' global ``SeedGenerator`` used by ``keras.random`` functions called without a seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from mlpug.random_state import RandomStateProvider, check_seed


class TensorFlowRandomState(RandomStateProvider):
    """The state and algorithm of TensorFlow's global ``tf.random.Generator``, as plain ints."""

    name = "tensorflow"

    def get_state(self) -> dict:
        generator = tf.random.get_global_generator()
        return {"global_generator": {"state": generator.state.numpy().tolist(), "algorithm": int(generator.algorithm)}}

    def capture(self) -> Any:
        """A copy of the generator's state variable, made on its device (no host round trip)."""
        generator = tf.random.get_global_generator()
        return generator, tf.identity(generator.state)

    def restore(self, captured: Any) -> None:
        generator, state = captured
        if tf.random.get_global_generator() is not generator:  # replaced in between: put the old one back
            tf.random.set_global_generator(generator)
        generator.state.assign(state)

    def to_state(self, captured: Any) -> dict:
        generator, state = captured
        return {"global_generator": {"state": state.numpy().tolist(), "algorithm": int(generator.algorithm)}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = state["global_generator"]
        values = np.asarray(saved["state"], dtype=np.int64)
        generator = tf.random.get_global_generator()
        if int(generator.algorithm) != int(saved["algorithm"]):
            tf.random.set_global_generator(tf.random.Generator.from_state(values, saved["algorithm"]))
        else:
            generator.reset(values)


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy, TensorFlow and Keras 3 (``keras.utils.set_random_seed``: Keras
    initializers and ``keras.random`` follow it, not ``tf.random.set_seed`` alone) and TensorFlow's global
    ``tf.random.Generator``, so that a run is repeatable (``mlp.set_random_seed``, the same call on every backend).

    Raises:
        ValueError: ``seed`` is not an int in ``[0, 2**32)``.
    """
    check_seed(seed)
    tf.keras.utils.set_random_seed(seed)
    tf.random.set_global_generator(tf.random.Generator.from_seed(seed))
