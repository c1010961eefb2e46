"""Gradient clipping, the trainer option shared by the backends: by global norm or by value.

The backend trainers clip between the backward pass (after all chunks of a batch were accumulated, and after the
data-parallel all-reduce) and the optimizer step, in their ``clip_gradients`` method, which a subclass may
override:

* **by norm** (``clip_gradients_norm=c``): the gradients of each optimizer's parameters are scaled by
  ``min(1, c / ||g||)``, with ``||g||`` the L2 norm of all of them together (Pascanu et al. 2013, "On the
  difficulty of training recurrent neural networks"; ``torch.nn.utils.clip_grad_norm_``,
  ``tf.clip_by_global_norm``);
* **by value** (``clip_gradients_value=v``): every gradient element is clipped to ``[-v, v]``.

Under float16 loss scaling the gradients are unscaled first (PyTorch: ``GradScaler.unscale_``; TensorFlow: divided
by the ``LossScaleOptimizer``'s scale and scaled back after clipping, since it unscales them itself), so that
``c`` and ``v`` are in the units of the true gradients.
"""

from __future__ import annotations

from typing import Any, Optional


def validate_clipping(clip_gradients_norm: Any, clip_gradients_value: Any) -> tuple[Optional[float], Optional[float]]:
    """The checked clipping options as floats (or None).

    Raises:
        ValueError: A value that is not a number > 0, or both options at once.
    """
    for name, value in (("clip_gradients_norm", clip_gradients_norm), ("clip_gradients_value", clip_gradients_value)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
    if clip_gradients_norm is not None and clip_gradients_value is not None:
        raise ValueError(
            f"give clip_gradients_norm or clip_gradients_value, not both (got {clip_gradients_norm!r} and "
            f"{clip_gradients_value!r})"
        )
    return (
        None if clip_gradients_norm is None else float(clip_gradients_norm),
        None if clip_gradients_value is None else float(clip_gradients_value),
    )
