"""TensorFlow precision policies (the protocol of :mod:`mlpug.trainers.precision`): full and mixed precision.

A policy owns the parts of the step that precision changes: the Keras dtype policy of the layers
(``prepare_model``), the optimizers (wrapped in a ``LossScaleOptimizer`` for float16, ``prepare_optimizers``),
scaling the loss before the backward pass (``scale_loss``) and applying the gradients, telling whether the step
was skipped (inf/nan gradients under loss scaling, ``step``). :class:`FullPrecision` is the null object: float32
layers, the optimizers as given, the loss as it is, every step applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import tensorflow as tf

from mlpug.trainers.precision import AutocastDtype, PrecisionPolicy, validate_mixed_precision


class FullPrecision(PrecisionPolicy):
    """Null precision policy: nothing changes the plain float32 step."""

    def step(self, optimizers: Mapping[str, Any], gradients: Optional[Mapping[str, list]] = None) -> Any:
        """``optimizer.apply_gradients(pairs)`` for every optimizer; returns False (no op, never skipped).

        Args:
            gradients: Per optimizer name, its ``(gradient, variable)`` pairs.
        """
        assert gradients is not None, "the TensorFlow step passes its gradients"
        for name, optimizer in optimizers.items():
            optimizer.apply_gradients(gradients[name])
        return False


class MixedPrecision(FullPrecision):
    """Keras mixed precision: layers compute in ``autocast_dtype``, variables stay float32.

    The Keras dtype policy ``mixed_bfloat16`` / ``mixed_float16`` is set on every float32 layer reachable from the
    model components and the training model (through ``Model.layers``, recursively), so the user does not need to
    set a global policy before building the model. Layers with another policy (e.g. ``mixed_float16`` already, or
    ``float64``) are left alone; a layer built with ``dtype="float32"`` is converted too, since Keras does not tell
    it from the default float32 policy. Where float32 outputs are needed (e.g. logits for a loss that does not
    cast), cast them in the training model (``tf.cast(logits, tf.float32)``). bfloat16 has the exponent range of
    float32 and needs no loss scaling; for float16 every optimizer is wrapped in a
    ``tf.keras.optimizers.LossScaleOptimizer`` (dynamic loss scaling, Micikevicius et al. 2018): the loss is
    multiplied by the scale before the backward pass, gradients are unscaled in ``apply_gradients``, and a step with
    inf/nan gradients is skipped while the scale is halved. Its scale and counters are optimizer variables, so they
    are part of the optimizer state.

    Args:
        autocast_dtype: ``"bfloat16"`` (CPU and recent GPUs) or ``"float16"`` (GPUs).
    """

    def __init__(self, autocast_dtype: AutocastDtype):
        self.autocast_dtype: Optional[AutocastDtype] = autocast_dtype
        self.policy_name = f"mixed_{autocast_dtype}"

    @property
    def uses_loss_scaling(self) -> bool:
        return self.autocast_dtype == "float16"

    def prepare_model(self, layers: Iterable[Any]) -> None:
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

    def prepare_optimizers(self, optimizers: Mapping[str, Any]) -> dict[str, Any]:
        """For float16, a ``LossScaleOptimizer`` around every optimizer (unless it is one already)."""
        return {name: self._wrap(optimizer) for name, optimizer in optimizers.items()}

    def _wrap(self, optimizer: Any) -> Any:
        if not self.uses_loss_scaling or isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer):
            return optimizer
        return tf.keras.optimizers.LossScaleOptimizer(optimizer)

    def scale_loss(self, loss: Any, optimizer: Any = None) -> Any:
        """``loss * scale`` for a ``LossScaleOptimizer`` (each has its own scale); the loss itself otherwise."""
        if isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer):
            return optimizer.scale_loss(loss)
        return loss

    def step(self, optimizers: Mapping[str, Any], gradients: Optional[Mapping[str, list]] = None) -> Any:
        """Apply the gradients; with loss scaling also return a boolean scalar tensor: True when a gradient held
        inf/nan, so that the ``LossScaleOptimizer`` skipped the step (and lowered its scale)."""
        skipped: Any = False
        if self.uses_loss_scaling:
            assert gradients is not None
            finite = [
                tf.reduce_all(tf.math.is_finite(g)) for pairs in gradients.values() for g, _ in pairs if g is not None
            ]
            skipped = tf.logical_not(tf.reduce_all(tf.stack(finite))) if finite else tf.constant(False)
        super().step(optimizers, gradients)
        return skipped


def precision_policy(use_mixed_precision: bool, autocast_dtype: Optional[str]) -> PrecisionPolicy:
    """The precision policy for the trainer arguments (see :func:`mlpug.trainers.precision.validate_mixed_precision`).

    Raises:
        TypeError / ValueError: Bad ``use_mixed_precision`` / ``autocast_dtype`` (the message echoes the value).
    """
    dtype = validate_mixed_precision(use_mixed_precision, autocast_dtype)
    return FullPrecision() if dtype is None else MixedPrecision(dtype)
