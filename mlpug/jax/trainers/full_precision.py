"""The null JAX precision policy (:class:`FullPrecision`; the protocol is :mod:`mlpug.jax.trainers.precision`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from mlpug.jax.trainers.precision import PrecisionPolicy
from mlpug.jax.trainers.traced_optimizer import TracedOptimizer


class FullPrecision(PrecisionPolicy):
    """Null precision policy: nothing is cast, the loss is differentiated as it is, every optimizer steps."""

    def cast_parameters(self, values: Sequence[Any]) -> list:
        """The parameter values for the forward pass; here: as they are."""
        return list(values)

    def cast_batch(self, batch: Any) -> Any:
        """The batch for the forward pass; here: as it is."""
        return batch

    def cast_loss(self, loss: Any) -> Any:
        """The loss as the model returned it."""
        return loss

    def step(self, optimizers: Mapping[str, Any], gradients: Optional[Mapping[str, list]] = None) -> Any:
        """``optimizer.apply(gradients[name])`` for every :class:`TracedOptimizer`.

        Args:
            optimizers: Per optimizer name, its :class:`TracedOptimizer` (inside the step).
            gradients: Per optimizer name, the gradients of its parameters (a list, in the order of its state).

        Returns:
            False: no precision policy ever skips a step on JAX.
        """
        assert gradients is not None
        for name, optimizer in optimizers.items():
            assert isinstance(optimizer, TracedOptimizer)
            optimizer.apply(gradients[name])
        return False
