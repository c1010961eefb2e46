"""``ImprovementRule``: the one rule that decides whether a monitored value is "better" than the best so far.

Every callback that keeps a best value (``CheckpointManager``, ``EarlyStopping``, ``ProgressBar``) asks this rule:
in mode ``"min"`` a value improves when ``value < best - min_delta``, in mode ``"max"`` when
``value > best + min_delta`` (strict: a value equal to the bound is no improvement). A NaN or infinite value is
never an improvement (not even ``inf`` in mode ``"max"``); with no best yet (``best`` None) any finite value is one.
"""

from __future__ import annotations

import math
from typing import Literal, Optional


class ImprovementRule:
    """Whether a value improves on the best so far, by mode and minimum change.

    Args:
        mode: ``"min"`` (lower is better) or ``"max"`` (higher is better).
        min_delta: The smallest change over the best (a number >= 0, in the metric's units) that counts as an
            improvement; 0 makes any strictly better value one.
        mode_argument: The name of ``mode`` in the caller's arguments, used in error messages.
        min_delta_argument: The name of ``min_delta`` in the caller's arguments, used in error messages.

    Raises:
        ValueError: ``mode`` is not ``"min"`` or ``"max"``, or ``min_delta`` is not a number >= 0 (the message
            names the caller's argument and the bad value).

    Attributes:
        mode: ``"min"`` or ``"max"``.
        min_delta: The minimum change, a float >= 0.
    """

    def __init__(
        self,
        mode: Literal["min", "max"] = "min",
        min_delta: float = 0.0,
        *,
        mode_argument: str = "mode",
        min_delta_argument: str = "min_delta",
    ):
        if mode not in ("min", "max"):
            raise ValueError(f"{mode_argument} must be 'min' or 'max', got {mode!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
            raise ValueError(f"{min_delta_argument} must be a number >= 0 (in the metric's units), got {min_delta!r}")
        self.mode: Literal["min", "max"] = mode
        self.min_delta = float(min_delta)

    def is_improvement(self, value: float, best: Optional[float]) -> bool:
        """Whether ``value`` improves on ``best`` (None: no best yet) by more than ``min_delta``.

        Args:
            value: The new value of the monitored metric.
            best: The best value so far, or None before the first one.

        Returns:
            False for a NaN or infinite ``value``; True for any finite ``value`` when ``best`` is None; else
            ``value < best - min_delta`` (mode ``"min"``) or ``value > best + min_delta`` (mode ``"max"``).
        """
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        if self.mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def describe(self) -> str:
        """A short text of the rule for messages, e.g. ``"min, min_delta 0.0"``."""
        return f"{self.mode}, min_delta {self.min_delta}"

    def __repr__(self) -> str:
        return f"ImprovementRule(mode={self.mode!r}, min_delta={self.min_delta!r})"
