"""One optimizer inside a compiled JAX step (:class:`TracedOptimizer`): the optax transformation with the state and
parameter values the step was called with, updated by :meth:`TracedOptimizer.apply`.

It lets the precision policy step the optimizers as on the other backends (``precision.step(optimizers,
gradients)``, :mod:`mlpug.trainers.precision`), although optax is functional: the new values are kept on the
object during the trace and returned by the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optax


class TracedOptimizer:
    """An optax transformation and the values it updates, inside a trace.

    Args:
        transformation: The ``optax.GradientTransformation``.
        state: Its state (tracers).
        parameters: The values of the parameters it updates (a list of tracers).

    Attributes:
        state: After :meth:`apply`, the new state.
        parameters: After :meth:`apply`, the new parameter values.
    """

    def __init__(self, transformation: optax.GradientTransformation, state: Any, parameters: Sequence[Any]):
        self.transformation = transformation
        self.state = state
        self.parameters = list(parameters)

    def apply(self, gradients: Sequence[Any]) -> None:
        """One optimizer step: ``updates, state = transformation.update(gradients, state, parameters)`` and
        ``parameters = optax.apply_updates(parameters, updates)`` (updates cast to the parameters' dtypes)."""
        updates, self.state = self.transformation.update(list(gradients), self.state, self.parameters)
        self.parameters = list(optax.apply_updates(self.parameters, updates))
