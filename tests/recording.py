"""A callback that records every hook call (name and key arguments), for life-cycle tests."""

from __future__ import annotations

import copy

from mlpug.logs import resolve
from mlpug.trainers.callback import Callback


class RecordingCallback(Callback):
    """Records ``(hook, details)`` tuples in ``self.calls``; optional actions run at given hooks.

    Args:
        actions: ``{(hook, global_iter_or_None): callable(manager)}``; run when that hook fires (for batch hooks,
            at that ``logs.current.global_iter``).
        snapshot_logs: Keep a resolved copy of ``logs`` at every ``on_batch_training_completed`` and
            ``on_epoch_completed`` (in ``self.snapshots``).
    """

    def __init__(self, name=None, actions=None, snapshot_logs=False):
        super().__init__(name)
        self.calls = []
        self.actions = actions or {}
        self.snapshot_logs = snapshot_logs
        self.snapshots = []
        self.ended_with = None

    def _act(self, hook, global_iter=None):
        action = self.actions.get((hook, global_iter))
        if action is not None:
            action(self.training_manager)

    def set_training_manager(self, manager):
        self.calls.append(("set_training_manager", None))
        return super().set_training_manager(manager)

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        self.calls.append(
            ("on_training_start", (num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter))
        )
        self._act("on_training_start")

    def on_epoch_start(self, logs):
        self.calls.append(("on_epoch_start", logs["epoch"]))
        self._act("on_epoch_start", logs["epoch"])

    def on_batch_training_start(self, training_batch, logs):
        current = logs["current"]
        self.calls.append(
            ("on_batch_training_start", (current["epoch"], current["batch_step"], current["global_iter"]))
        )
        self._act("on_batch_training_start", current["global_iter"])

    def on_batch_training_failed(self, exception, logs):
        self.calls.append(("on_batch_training_failed", type(exception).__name__))

    def on_batch_training_completed(self, training_batch, logs):
        current = logs["current"]
        self.calls.append(
            ("on_batch_training_completed", (current["epoch"], current["batch_step"], current["global_iter"]))
        )
        if self.snapshot_logs:
            self.snapshots.append(("batch", resolve(logs)))
        self._act("on_batch_training_completed", current["global_iter"])

    def on_batch_checkpoint(self, logs):
        current = logs["current"]
        self.calls.append(("on_batch_checkpoint", (current["epoch"], current["batch_step"], current["global_iter"])))

    def on_epoch_checkpoint(self, logs):
        self.calls.append(("on_epoch_checkpoint", logs["epoch"]))

    def on_training_checkpoint(self, stopped_early, stopped_on_error, interrupted):
        self.calls.append(("on_training_checkpoint", (stopped_early, stopped_on_error, interrupted)))

    def on_epoch_completed(self, logs):
        self.calls.append(("on_epoch_completed", logs["epoch"]))
        if self.snapshot_logs:
            self.snapshots.append(("epoch", resolve(logs)))
        self._act("on_epoch_completed", logs["epoch"])

    def on_training_ended(self, stopped_early, stopped_on_error, interrupted, callback_calls_success):
        self.ended_with = dict(
            stopped_early=stopped_early,
            stopped_on_error=stopped_on_error,
            interrupted=interrupted,
            callback_calls_success=callback_calls_success,
        )
        self.calls.append(("on_training_ended", copy.copy(self.ended_with)))

    def hook_names(self):
        return [name for name, _ in self.calls]

    def count(self, hook):
        return sum(1 for name, _ in self.calls if name == hook)


class CountBatches(Callback):
    """A stateful callback: counts the batches it saw, keeps their losses and where it saw ``is_best``."""

    def __init__(self, name):
        super().__init__(name)
        self.count, self.saw_best, self.losses = 0, [], []

    def on_batch_training_completed(self, training_batch, logs):
        self.count += 1
        self.losses.append(logs["current"]["training"]["batch"]["loss"])
        if logs["current"]["is_best"]:
            self.saw_best.append(logs["current"]["global_iter"])

    def get_state(self):
        return {"count": self.count}

    def set_state(self, state):
        self.count = state["count"]

    def improvements(self):
        """Global iterations whose batch loss was lower than every earlier one (what "min" mode calls best)."""
        losses = self.losses
        return [i for i, loss in enumerate(losses) if loss < min(losses[:i], default=float("inf"))]
