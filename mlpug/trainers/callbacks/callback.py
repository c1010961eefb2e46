"""The ``Callback`` base class and the one list of hooks.

The position of every hook in the training life cycle is written down in
:mod:`mlpug.trainers.training` (``TrainingManager``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

HOOKS = (
    "set_training_manager",
    "on_training_start",
    "on_epoch_start",
    "on_batch_training_start",
    "on_batch_training_failed",
    "on_batch_training_completed",
    "on_epoch_completed",
    "on_training_ended",
)
"""Every hook, in life-cycle order. Dispatching a name not in this list is an error."""


class Callback:
    """Base class of all callbacks: every hook is a no-op here.

    A hook may return ``False`` to report a non-fatal problem: the manager logs it and sets
    ``logs["cb_calls_success"] = False``. Raising an exception runs the failure path and ends training.

    Callbacks that write into ``logs`` declare the dataset names they produce (``produces``) and those
    that read them declare what they consume (``consumes``), so the manager can warn when a consumer is
    placed before its producer in the callback list.

    Args:
        name: Unique name of this callback; it is the key of its state in training checkpoints.
    """

    def __init__(self, name: Optional[str] = None):
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        self.name = name or type(self).__name__
        self.training_manager = None
        self._log = logging.getLogger(f"mlpug.{type(self).__name__}")

    # Producers / consumers of logs sections (dataset names such as "training" or "validation").
    @property
    def produces(self) -> frozenset:
        return frozenset()

    @property
    def consumes(self) -> frozenset:
        return frozenset()

    # ----- hooks -----
    def set_training_manager(self, manager: Any) -> Optional[bool]:
        self.training_manager = manager
        return True

    def on_training_start(
        self, num_epochs: int, num_batches_per_epoch: int, start_epoch: int, start_batch: int, start_update_iter: int
    ) -> Optional[bool]:
        return True

    def on_epoch_start(self, logs: dict) -> Optional[bool]:
        return True

    def on_batch_training_start(self, training_batch: Any, logs: dict) -> Optional[bool]:
        return True

    def on_batch_training_failed(self, exception: BaseException, logs: dict) -> Optional[bool]:
        return True

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> Optional[bool]:
        return True

    def on_epoch_completed(self, logs: dict) -> Optional[bool]:
        return True

    def on_training_ended(
        self, stopped_early: bool, stopped_on_error: bool, interrupted: bool, callback_calls_success: bool
    ) -> Optional[bool]:
        return True

    # ----- state -----
    def get_state(self) -> dict:
        """Plain-container state for training checkpoints; stateless callbacks return ``{}``."""
        return {}

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned."""

    def overrides(self, hook: str) -> bool:
        """True when this callback's class implements ``hook`` itself (the base no-op is skipped)."""
        return getattr(type(self), hook) is not getattr(Callback, hook)
