"""``HookDispatcher``: calls the callbacks' hooks for the ``TrainingManager``.

Every hook goes to the callbacks that override it (base no-ops are skipped), in dispatch order (producers of logs
first, see :func:`mlpug.trainers.callback.dispatch_order`). A hook that raises ends training through the failure
path (its name kept for the failure note); one that returns False only marks ``logs["cb_calls_success"]`` and
training goes on; the end-phase hooks run on every callback even when some raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

from mlpug.trainers.callback import HOOKS, Callback, dispatch_order
from mlpug.trainers.non_finite import NonFiniteLossError, NonFiniteWeightsError

_log = logging.getLogger("mlpug.TrainingManager")

BoundHooks = list[tuple[Callback, Callable[..., Optional[bool]]]]
"""``(callback, bound hook method)`` pairs, in dispatch order."""


class BatchHooks(NamedTuple):
    """The bound hooks of a batch. With several ranks the callbacks that add to the step's reduction
    (``reduces_batch_metrics``) get ``on_batch_training_completed`` first, then it is issued, then the others."""

    start: BoundHooks
    completed: BoundHooks
    reducing_completed: BoundHooks
    other_completed: BoundHooks
    checkpoint: BoundHooks


class HookDispatcher:
    """The dispatch table of one run's callbacks, and the record of the hook that raised.

    Args:
        callbacks: The callbacks of the run.
        logs: The run's ``logs`` (``cb_calls_success`` is set to False when a hook returns False).

    Attributes:
        ordered_callbacks: ``callbacks`` in dispatch order.
        failed_hook: The name of the hook that raised (for the failure note), else None; the manager also sets it
            for its own checks (``"check_finite"``).

    Raises:
        ValueError: Producers consume from each other in a cycle (see ``dispatch_order``).
    """

    def __init__(self, callbacks: Sequence[Callback], logs: dict):
        self.logs = logs
        self.ordered_callbacks = dispatch_order(callbacks)
        self.failed_hook: Optional[str] = None
        self._attributed: Optional[BaseException] = None  # the error whose hook and callback were noted
        self._hooks: dict[str, BoundHooks] = {
            hook: [(cb, getattr(cb, hook)) for cb in self.ordered_callbacks if cb.overrides(hook)]
            for hook in HOOKS
            if hook != "set_training_manager"
        }

    def batch_hooks(self) -> BatchHooks:
        """The bound hooks of a batch (see :class:`BatchHooks`)."""
        completed = self._hooks["on_batch_training_completed"]
        return BatchHooks(
            self._hooks["on_batch_training_start"],
            completed,
            [(c, m) for c, m in completed if c.reduces_batch_metrics],
            [(c, m) for c, m in completed if not c.reduces_batch_metrics],
            self._hooks["on_batch_checkpoint"],
        )

    def dispatch(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback that implements it, in dispatch order (producers first).

        Raises:
            ValueError: ``hook`` is not one of ``HOOKS``.
            Exception: What a hook raised, with a note naming the callback and the hook.
        """
        if hook not in self._hooks:
            raise ValueError(f"unknown hook {hook!r}; hooks are: {', '.join(HOOKS)}")
        self.call(self._hooks[hook], hook, *args)

    def call(self, bound_hooks: BoundHooks, hook: str, *args: Any) -> None:
        """Call the ``bound_hooks`` of ``hook`` in order; the first exception ends the dispatch."""
        for callback, method in bound_hooks:
            try:
                result = method(*args)
            except Exception as error:
                if error is not self._attributed:  # else raised in a hook dispatched inside this one, and named
                    self._attributed = error
                    self.failed_hook = hook
                    if not isinstance(
                        error, (NonFiniteLossError, NonFiniteWeightsError)
                    ):  # found by the check the callback asked for, not its fault
                        add_note(error, f"mlpug: raised by callback {callback.name!r} in {hook}")
                raise
            if result is False:
                self._report_problem(callback, hook)

    def call_all(self, hook: str, errors: list, *args: Any) -> None:
        """Call an end-phase ``hook`` on every callback even when some raise; their errors go to ``errors``."""
        for callback, method in self._hooks[hook]:
            try:
                if method(*args) is False:
                    self._report_problem(callback, hook)
            except Exception as error:
                _log.exception(f"{callback.name}.{hook} raised")
                errors.append(error)

    def dispatch_failure(self, error: BaseException, logs: dict) -> None:
        """``on_batch_training_failed`` on every callback that implements it; their own errors are only logged."""
        for callback, method in self._hooks["on_batch_training_failed"]:
            try:
                method(error, logs)
            except Exception:
                _log.exception(f"{callback.name}.on_batch_training_failed raised while handling a failed step")

    def _report_problem(self, callback: Callback, hook: str) -> None:
        self.logs["cb_calls_success"] = False
        _log.warning(f"Callback {callback.name!r} reported a problem in {hook} (returned False); training goes on.")


def add_note(error: BaseException, note: str) -> None:
    """Add ``note`` to ``error`` once (Python 3.11 exception notes)."""
    if hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
        error.add_note(note)
