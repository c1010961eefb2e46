"""TensorFlow precision policies composed into the ``DefaultTrainer`` step: full precision and mixed precision.

A policy owns the parts of the step that precision changes: the Keras dtype policy of the layers, the optimizer
(wrapped in a ``LossScaleOptimizer`` for float16), scaling the loss before the backward pass, and telling
whether the optimizer step was skipped (inf/nan gradients under loss scaling). :class:`FullPrecision` is the
null object: float32 layers, the optimizer as given, the loss as it is, no step ever skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import tensorflow as tf

from mlpug.trainers.precision import validate_mixed_precision


class FullPrecision:
    """Null precision policy: nothing changes the plain float32 step."""

    autocast_dtype: Optional[str] = None
    uses_loss_scaling = False

    def prepare_layers(self, layers: Iterable[tf.keras.layers.Layer]) -> None:
        """Nothing to do: layers keep their dtype policy."""

    def wrap_optimizer(self, optimizer: tf.keras.optimizers.Optimizer) -> tf.keras.optimizers.Optimizer:
        """The optimizer itself."""
        return optimizer

    def scale_loss(self, loss: tf.Tensor, optimizer: tf.keras.optimizers.Optimizer) -> tf.Tensor:
        """The loss itself."""
        return loss

    def step_skipped(self, gradients: Sequence[Any]) -> Any:
        """False: without loss scaling every step is applied (the Python constant, no tensor op)."""
        return False


class MixedPrecision(FullPrecision):
    """Keras mixed precision: layers compute in ``autocast_dtype``, variables stay float32.

    The Keras dtype policy ``mixed_bfloat16`` / ``mixed_float16`` is set on every float32 layer reachable from
    the model components and the training model (through ``Model.layers``, recursively), so the user does not
    need to set a global policy before building the model. Layers with another policy (e.g. an output layer the
    user pinned to float32) are left alone. bfloat16 has the exponent range of float32 and needs no loss
    scaling; for float16 every optimizer is wrapped in a ``tf.keras.optimizers.LossScaleOptimizer`` (dynamic
    loss scaling, Micikevicius et al. 2018): the loss is multiplied by the scale before the backward pass,
    gradients are unscaled in ``apply_gradients``, and a step with inf/nan gradients is skipped while the scale
    is halved. Its scale and counters are optimizer variables, so they are part of the optimizer state.

    Args:
        autocast_dtype: ``"bfloat16"`` (CPU and recent GPUs) or ``"float16"`` (GPUs).
    """

    def __init__(self, autocast_dtype: str):
        self.autocast_dtype = autocast_dtype
        self.policy_name = f"mixed_{autocast_dtype}"
        self.uses_loss_scaling = autocast_dtype == "float16"

    def prepare_layers(self, layers: Iterable[tf.keras.layers.Layer]) -> None:
        """Set the mixed policy on every float32 layer reachable from ``layers``."""
        seen: set = set()
        stack = list(layers)
        while stack:
            layer = stack.pop()
            if id(layer) in seen or not isinstance(layer, tf.keras.layers.Layer):
                continue
            seen.add(id(layer))
            if layer.dtype_policy.name == "float32":
                layer.dtype_policy = self.policy_name
            stack.extend(getattr(layer, "layers", ()))

    def wrap_optimizer(self, optimizer: tf.keras.optimizers.Optimizer) -> tf.keras.optimizers.Optimizer:
        """For float16, a ``LossScaleOptimizer`` around ``optimizer`` (unless it is one already)."""
        if not self.uses_loss_scaling or isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer):
            return optimizer
        return tf.keras.optimizers.LossScaleOptimizer(optimizer)

    def scale_loss(self, loss: tf.Tensor, optimizer: tf.keras.optimizers.Optimizer) -> tf.Tensor:
        """``loss * scale`` for a ``LossScaleOptimizer``; the loss itself otherwise."""
        if isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer):
            return optimizer.scale_loss(loss)
        return loss

    def step_skipped(self, gradients: Sequence[Any]) -> Any:
        """With loss scaling, a boolean scalar tensor: True when a gradient holds inf/nan (the step is skipped)."""
        if not self.uses_loss_scaling:
            return False
        finite = [tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None]
        return tf.logical_not(tf.reduce_all(tf.stack(finite))) if finite else tf.constant(False)


def precision_policy(use_mixed_precision: bool, autocast_dtype: Optional[str]) -> FullPrecision:
    """The precision policy for the trainer arguments (see :func:`mlpug.trainers.precision.validate_mixed_precision`).

    Raises:
        TypeError / ValueError: Bad ``use_mixed_precision`` / ``autocast_dtype`` (the message echoes the value).
    """
    dtype = validate_mixed_precision(use_mixed_precision, autocast_dtype)
    return FullPrecision() if dtype is None else MixedPrecision(dtype)
