"""Gradient clipping in the TensorFlow step (see :mod:`mlpug.trainers.clipping` for the options): the default of
the TensorFlow ``DefaultTrainer.clip_gradients``, part of the traced step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import tensorflow as tf


def clip_gradient_pairs(
    pairs: dict[str, list],
    optimizers: Mapping[str, tf.keras.optimizers.Optimizer],
    clip_gradients_norm: Optional[float],
    clip_gradients_value: Optional[float],
) -> dict[str, list]:
    """Clip each optimizer's ``(gradient, variable)`` pairs before they are applied.

    ``clip_gradients_norm``: ``tf.clip_by_global_norm`` over that optimizer's gradients; ``clip_gradients_value``:
    ``tf.clip_by_value`` of every element, except that non-finite gradients stay as they are (``clip_by_value``
    would turn inf into +-v; the step is then skipped). Gradients of a ``LossScaleOptimizer`` are divided by its
    scale before clipping and multiplied by it afterwards (it unscales them itself), so the limits are in the units
    of the true gradients. A ``None`` gradient stays None.

    Args:
        pairs: Per optimizer name, its ``(gradient, variable)`` pairs.
        optimizers: The optimizers by name (a ``LossScaleOptimizer``'s scale is read).
        clip_gradients_norm: The global L2 norm per optimizer (float > 0), or None.
        clip_gradients_value: The limit per element (float > 0), or None.

    Returns:
        The pairs with clipped gradients; ``pairs`` itself when neither option is given.
    """
    if clip_gradients_norm is None and clip_gradients_value is None:
        return pairs
    clipped = {}
    for name, optimizer_pairs in pairs.items():
        optimizer = optimizers[name]
        scale = (
            tf.cast(optimizer.dynamic_scale, tf.float32)
            if isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer)
            else None
        )
        indices = [i for i, (gradient, _) in enumerate(optimizer_pairs) if gradient is not None]
        gradients = [tf.convert_to_tensor(optimizer_pairs[i][0]) for i in indices]
        if scale is not None:
            gradients = [gradient / scale for gradient in gradients]
        if clip_gradients_norm is not None:
            gradients, _ = tf.clip_by_global_norm(gradients, clip_gradients_norm)
        else:
            value = float(clip_gradients_value or 0.0)
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(gradient)) for gradient in gradients])
            gradients = [
                tf.where(finite, tf.clip_by_value(gradient, -value, value), gradient) for gradient in gradients
            ]
        if scale is not None:
            gradients = [gradient * scale for gradient in gradients]
        new_pairs = list(optimizer_pairs)
        for i, gradient in zip(indices, gradients):
            new_pairs[i] = (gradient, optimizer_pairs[i][1])
        clipped[name] = new_pairs
    return clipped
