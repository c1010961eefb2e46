"""The JAX precision policy protocol (:class:`PrecisionPolicy`): the neutral one of :mod:`mlpug.trainers.precision`
with the two casts that the compiled step calls.

Inside the compiled step (see :mod:`mlpug.jax.trainers.trainer`) the trainer calls, unconditionally::

    model = merge(precision.cast_parameters(values), ...)      # the parameter values of the forward pass
    outputs = model(precision.cast_batch(chunk), ...)         # the batch of the forward pass
    loss = precision.cast_loss(outputs.loss)                  # differentiated, returned and logged
    target = precision.scale_loss(loss)                       # what is differentiated
    precision.step(optimizers, gradients)                     # every optimizer steps (TracedOptimizer.apply)

The policies: :class:`~mlpug.jax.trainers.full_precision.FullPrecision` (the null object: nothing is cast) and
:class:`~mlpug.jax.trainers.mixed_precision.MixedPrecision` (a bfloat16 forward pass). float16 would need loss
scaling, which the JAX backend does not implement.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from mlpug.trainers.precision import PrecisionPolicy as _NeutralPrecisionPolicy


class PrecisionPolicy(_NeutralPrecisionPolicy):
    """A JAX precision policy: the neutral protocol plus the casts of the forward pass (module docstring).

    Attributes:
        autocast_dtype: ``None`` (full precision) or ``"bfloat16"``.
    """

    @abstractmethod
    def cast_parameters(self, values: Sequence[Any]) -> list:
        """The parameter values for the forward pass (inside the step; gradients flow back through the cast).

        Args:
            values: The values of one optimizer's parameters (tracers), in the order of its state.

        Returns:
            The values the forward pass uses, in the same order.
        """

    @abstractmethod
    def cast_batch(self, batch: Any) -> Any:
        """The batch (or batch chunk) for the forward pass, in the same structure (inside the step)."""

    @abstractmethod
    def cast_loss(self, loss: Any) -> Any:
        """The loss the model returned (a 0-d array, inside the step) as it is differentiated, returned by
        ``train_on`` / ``evaluate_loss`` and logged."""
