"""Hook dispatch of the ``TrainingManager`` (a mixin: the manager holds the callbacks and ``logs``).

Every hook goes to the callbacks that override it (base no-ops are skipped), in dispatch order (producers of logs
first, see :func:`mlpug.trainers.callbacks.callback.dispatch_order`). A hook that raises ends training through the
failure path (its name kept for the failure note); one that returns False only marks ``logs["cb_calls_success"]``
and training goes on; the end-phase hooks run on every callback even when some raise.
"""

from __future__ import annotations

import logging
from typing import Any

from mlpug.trainers.callbacks.callback import HOOKS, Callback
from mlpug.trainers.non_finite import NonFiniteLossError, NonFiniteWeightsError

_log = logging.getLogger("mlpug.TrainingManager")


class HookDispatch:
    """Calls the callbacks' hooks for the :class:`~mlpug.trainers.training.TrainingManager`."""

    # provided by the TrainingManager
    logs: dict
    _ordered_callbacks: list  # the callbacks in dispatch order
    _hooks: dict  # hook name -> [(callback, bound method)], from _build_dispatch_table
    _failed_hook: Any  # the hook that raised, for the failure note

    def _batch_hooks(self) -> tuple:
        """``(start, completed, reducing completed, other completed, checkpoint)`` bound hooks of a batch; with
        several ranks the callbacks that add to the step's reduction come first, then it is issued, then the
        others."""
        completed_hooks = self._hooks["on_batch_training_completed"]
        return (
            self._hooks["on_batch_training_start"],
            completed_hooks,
            [(c, m) for c, m in completed_hooks if c.reduces_batch_metrics],
            [(c, m) for c, m in completed_hooks if not c.reduces_batch_metrics],
            self._hooks["on_batch_checkpoint"],
        )

    def _call_all(self, hook: str, errors: list, *args: Any) -> None:
        """Call an end-phase ``hook`` on every callback even when some raise; their errors go to ``errors``."""
        for callback, method in self._hooks[hook]:
            try:
                if method(*args) is False:
                    self._report_problem(callback, hook)
            except Exception as error:
                _log.exception(f"{callback.name}.{hook} raised")
                errors.append(error)

    def _build_dispatch_table(self) -> dict:
        """Per hook, the bound methods of the callbacks that implement it (base no-ops are skipped), in
        dispatch order."""
        return {
            hook: [(cb, getattr(cb, hook)) for cb in self._ordered_callbacks if cb.overrides(hook)]
            for hook in HOOKS
            if hook != "set_training_manager"
        }

    def _dispatch(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback that implements it, in dispatch order (producers first).

        Raises:
            ValueError: ``hook`` is not one of ``HOOKS``.
        """
        if hook not in self._hooks:
            raise ValueError(f"unknown hook {hook!r}; hooks are: {', '.join(HOOKS)}")
        self._call(self._hooks[hook], hook, *args)

    def _call(self, bound_hooks: list, hook: str, *args: Any) -> None:
        for callback, method in bound_hooks:
            try:
                result = method(*args)
            except Exception as error:
                self._failed_hook = hook
                if not isinstance(
                    error, (NonFiniteLossError, NonFiniteWeightsError)
                ):  # found by the check the callback asked for, not its fault
                    add_note(error, f"mlpug: raised by callback {callback.name!r} in {hook}")
                raise
            if result is False:
                self._report_problem(callback, hook)

    def _dispatch_failure(self, error: BaseException, logs: dict) -> None:
        for callback, method in self._hooks["on_batch_training_failed"]:
            try:
                method(error, logs)
            except Exception:
                _log.exception(f"{callback.name}.on_batch_training_failed raised while handling a failed step")

    def _report_problem(self, callback: Callback, hook: str) -> None:
        self.logs["cb_calls_success"] = False
        _log.warning(f"Callback {callback.name!r} reported a problem in {hook} (returned False); training goes on.")


def add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
        error.add_note(note)
