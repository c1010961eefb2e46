"""``LRSchedulerWrapper``: learning rate schedules stepped by the training loop (the neutral part).

The wrapper steps its schedulers after every optimizer step (``batch_level=True``, the default) or after every
epoch (``batch_level=False``), in the batch-end / epoch-end hooks, so that the learning rate logged for a batch
(``logs.current.training_params.batch.lr``) is the one that batch was trained with. A step that the optimizer did
not take (float16 loss scaling found inf/nan gradients, or ``non_finite_loss="skip_step"``) does not step the
schedule; telling it reads the step's skipped flag (a host wait per step) only where a step can be skipped
(elsewhere the flag is the constant False). With ``metric_to_monitor`` the schedulers are stepped with the value at
that path (e.g. ``validation.dataset.loss`` for PyTorch's ``ReduceLROnPlateau``): once per published evaluation
result of that dataset (``on_evaluation_result``, also when two land together), else at every epoch end.

The schedulers' states are part of training checkpoints (``get_state``), so a resumed run continues its schedule
exactly. What a scheduler is depends on the backend (``mlpug.pytorch.callbacks.LRSchedulerWrapper``:
``torch.optim.lr_scheduler`` objects; ``mlpug.tensorflow.callbacks.LRSchedulerWrapper``: Keras
``LearningRateSchedule`` s or callables of the step); the backend classes implement :meth:`check_scheduler`,
:meth:`step_scheduler`, :meth:`scheduler_state` and :meth:`load_scheduler_state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from mlpug.logs import get_value_at, to_number
from mlpug.trainers.callback import Callback, check_log_path
from mlpug.trainers.evaluation_result import EvaluationResult
from mlpug.trainers.run_context import RunContext

_MISSING = object()


def named_schedulers(schedulers: Any) -> dict[str, Any]:
    """``{name: scheduler}``: a dict as given, a list as ``scheduler_<i>``, one scheduler as ``scheduler``.

    Raises:
        ValueError: No scheduler.
    """
    if isinstance(schedulers, Mapping):
        named = {str(name): scheduler for name, scheduler in schedulers.items()}
    elif isinstance(schedulers, (list, tuple)):
        named = {f"scheduler_{index}": scheduler for index, scheduler in enumerate(schedulers)}
    else:
        named = {"scheduler": schedulers}
    if not named:
        raise ValueError("schedulers is empty: give a scheduler, a list or a dict of them")
    return named


class LRSchedulerWrapper(Callback):
    """Steps learning rate schedulers from the training loop (see the module docstring); use a backend's class.

    Args:
        schedulers: A scheduler, a list or a dict of them (what a scheduler is: see the backend's class).
        batch_level: True (default) steps after every optimizer step; False after every epoch.
        metric_to_monitor: A dotted path under ``logs["current"]`` whose value is passed to the schedulers' step
            (e.g. ``"validation.dataset.loss"``); checked at the manager's construction. A metric of published
            results steps the schedulers once per result of its dataset; any other is read at epoch ends (an epoch
            without the value does not step). It needs ``batch_level=False``.
        name: The callback's name (key of the schedulers' states in training checkpoints).

    Raises:
        ValueError: ``metric_to_monitor`` with ``batch_level=True``, or a path that no callback writes (at the
            manager's construction); what the backend refuses (see :meth:`check_scheduler`).
        TypeError: ``batch_level`` is not a bool.
    """

    def __init__(
        self,
        schedulers: Any,
        batch_level: bool = True,
        metric_to_monitor: Optional[str] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name)
        if not isinstance(batch_level, bool):
            raise TypeError(f"batch_level must be a bool, got {batch_level!r:.100}")
        if metric_to_monitor is not None and (not isinstance(metric_to_monitor, str) or not metric_to_monitor):
            raise ValueError(f"metric_to_monitor must be a dotted path such as 'validation.dataset.loss' or None, got "
                             f"{metric_to_monitor!r:.100}")  # fmt: skip
        if metric_to_monitor is not None and batch_level:
            raise ValueError(
                f"metric_to_monitor={metric_to_monitor!r} is read at the end of an epoch: pass batch_level=False"
            )
        self.schedulers = named_schedulers(schedulers)
        self._last_epoch: Optional[int] = None
        self._from_results = False  # the metric comes from on_evaluation_result (set with the run context)
        self.batch_level = batch_level
        self.metric_to_monitor = metric_to_monitor
        for scheduler_name, scheduler in self.schedulers.items():
            self.check_scheduler(scheduler_name, scheduler)

    # ----- backend part -----
    def check_scheduler(self, name: str, scheduler: Any) -> None:
        """Raise when ``scheduler`` cannot be stepped by this backend (at construction)."""
        raise NotImplementedError("use the LRSchedulerWrapper of a backend: mlp.callbacks.LRSchedulerWrapper")

    def step_scheduler(self, name: str, scheduler: Any, metric: Optional[float]) -> None:
        """Advance ``scheduler`` by one step (``metric``: the monitored value, or None)."""
        raise NotImplementedError

    def scheduler_state(self, name: str, scheduler: Any) -> Any:
        """The plain-container state of ``scheduler`` for training checkpoints."""
        raise NotImplementedError

    def load_scheduler_state(self, name: str, scheduler: Any, state: Any) -> None:
        """Restore what :meth:`scheduler_state` returned."""
        raise NotImplementedError

    # ----- hooks -----
    def set_training_manager(self, manager: RunContext) -> bool:
        """Keep the run context; check ``metric_to_monitor``.

        Raises:
            ValueError: No callback writes ``metric_to_monitor``.
        """
        if self.metric_to_monitor is not None:
            check_log_path(self.metric_to_monitor, manager.callbacks, f"{self.name}: metric_to_monitor")
            self._from_results = manager.is_result_metric(self.metric_to_monitor)
        return bool(super().set_training_manager(manager))

    def _optimizer_stepped(self) -> bool:
        result = self.context.step_result
        skipped = False if result is None else result.optimizer_step_skipped
        return not (skipped if isinstance(skipped, bool) else bool(to_number(skipped)))

    def _step_all(self, metric: Optional[float]) -> None:
        for scheduler_name, scheduler in self.schedulers.items():
            self.step_scheduler(scheduler_name, scheduler, metric)

    def batches_until_model_access(self, global_iter: int) -> Optional[int]:
        """Batch level: 1 (the schedulers step after every batch, before the next step); epoch level: None. For a
        per-step schedule with several steps per call, give the optimizer a schedule of its own backend instead
        (e.g. a ``tf.keras.optimizers.schedules.LearningRateSchedule``), which runs inside the compiled step."""
        return 1 if self.batch_level else None

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """None: its batch hook reads only the step's own skipped flag, never a value reduced over the ranks."""
        return None

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> bool:
        if self.batch_level and self._optimizer_stepped():
            self._step_all(None)
        return True

    def on_evaluation_result(self, result: EvaluationResult, logs: dict) -> bool:
        """A result of the monitored dataset steps the schedulers with its value, once per evaluated epoch."""
        if self._from_results and self.metric_to_monitor is not None:
            self._step_for_epoch(result.epoch, result.value_of(self.metric_to_monitor, _MISSING))
        return True

    def on_epoch_completed(self, logs: dict) -> bool:
        if self.batch_level or self._from_results:
            return True
        current = logs["current"]
        if self.metric_to_monitor is None:
            self._step_for_epoch(current["epoch"], None)
        else:
            self._step_for_epoch(current["epoch"], get_value_at(current, self.metric_to_monitor, _MISSING))
        return True

    def _step_for_epoch(self, epoch: int, value: Any) -> None:
        """Step every scheduler once for ``epoch`` (an epoch end repeated after a failed hook steps once only);
        with ``metric_to_monitor``, only when ``value`` is there."""
        if epoch == self._last_epoch:
            return
        if self.metric_to_monitor is not None and (value is _MISSING or value is None):
            return
        self._last_epoch = epoch
        self._step_all(None if self.metric_to_monitor is None else float(to_number(value)))

    # ----- state -----
    def get_state(self) -> dict:
        """The schedulers' states, and the last epoch they were stepped for (so that an epoch end repeated on
        resume, after a failed hook, does not step them again)."""
        return {
            "schedulers": {name: self.scheduler_state(name, scheduler) for name, scheduler in self.schedulers.items()},
            "last_epoch": self._last_epoch,
        }

    def set_state(self, state: dict) -> None:
        schedulers = state["schedulers"] if "schedulers" in state else state  # also the flat form of older states
        for name, scheduler in self.schedulers.items():
            if name in schedulers:
                self.load_scheduler_state(name, scheduler, schedulers[name])
        self._last_epoch = state.get("last_epoch")
