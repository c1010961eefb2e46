"""State of the Keras seed generators of a model (``Dropout`` and other random layers), for exact resume.

A Keras 3 random layer draws from a ``keras.random.SeedGenerator`` whose state is a non-trainable ``int64``
variable of shape ``(2,)`` (its path ends in ``seed_generator_state``); every draw advances it. It is one of
``model.variables`` but not of ``model.weights``, so ``get_weights()`` / ``set_weights()`` leave it out. The
TensorFlow ``DefaultTrainer`` keeps these states next to the weights in its ``get_state()``, so that a restored
trainer draws the same dropout masks as the original would have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SEED_STATE_SUFFIX = "seed_generator_state"  # name of the state variable of a keras.random.SeedGenerator


def find_seed_generator_variables(models: Iterable[Any]) -> list:
    """The seed generator state variables of ``models``, each once, in the order the models list them.

    Args:
        models: Keras layers / models (None entries are skipped), e.g. the model components followed by the
            training model; a variable reachable from several of them is listed at its first appearance.

    Returns:
        The ``seed_generator_state`` variables (``tf.Variable``-like, int64, shape ``(2,)``).
    """
    found, seen = [], set()
    for model in models:
        for variable in getattr(model, "variables", None) or []:
            path = getattr(variable, "path", None) or variable.name
            if path.endswith(SEED_STATE_SUFFIX) and id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


def get_seed_generator_states(variables: Sequence[Any]) -> list:
    """Copies of the states of seed generator ``variables`` as numpy arrays (int64, shape ``(2,)`` each)."""
    return [np.array(variable.numpy()) for variable in variables]


def set_seed_generator_states(variables: Sequence[Any], states: Sequence[Any]) -> None:
    """Assign ``states`` (what :func:`get_seed_generator_states` returned) to ``variables``, in order.

    Raises:
        ValueError: Another number of states than variables, or a state of another shape (the state was taken
            from another model).
    """
    if len(states) != len(variables):
        raise ValueError(
            f"the state holds {len(states)} Keras seed generator states (Dropout and other random layers), the "
            f"model components and training model have {len(variables)}; it was taken from another model"
        )
    for index, (variable, value) in enumerate(zip(variables, states)):
        value = np.asarray(value)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"seed generator state {index} has shape {tuple(value.shape)}, but variable "
                f"{getattr(variable, 'path', index)!r} has shape {tuple(variable.shape)}"
            )
        variable.assign(value.astype(variable.numpy().dtype))
