"""Gradient clipping in the JAX step (see :mod:`mlpug.trainers.clipping` for the options): the default of the JAX
``DefaultTrainer.clip_gradients``, part of the compiled step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import jax.numpy as jnp
import optax


def clip_gradient_lists(
    gradients: Mapping[str, list], clip_gradients_norm: Optional[float], clip_gradients_value: Optional[float]
) -> dict[str, list]:
    """Each optimizer's gradients clipped before they are applied.

    ``clip_gradients_norm``: ``optax.clip_by_global_norm`` over that optimizer's gradients (scaled by
    ``c / ||g||`` when their global L2 norm ``||g||`` exceeds ``c``); ``clip_gradients_value``: every element
    clipped to ``[-v, v]``, except when a gradient of the optimizer is not finite: then they stay as they are (as on
    TensorFlow: clipping would turn inf into +-v and hide it).

    Args:
        gradients: Per optimizer name, its gradients (a list of arrays).
        clip_gradients_norm: The global L2 norm per optimizer (float > 0), or None.
        clip_gradients_value: The limit per element (float > 0), or None.

    Returns:
        The clipped gradients; ``gradients`` itself when neither option is given.
    """
    if clip_gradients_norm is None and clip_gradients_value is None:
        return dict(gradients)
    clipped = {}
    for name, values in gradients.items():
        if clip_gradients_norm is not None:
            clipped[name], _ = optax.clip_by_global_norm(clip_gradients_norm).update(list(values), optax.EmptyState())
        else:
            limit = float(clip_gradients_value or 0.0)
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(value)) for value in values]))
            clipped[name] = [jnp.where(finite, jnp.clip(value, -limit, limit), value) for value in values]
    return clipped
