"""``StepScheduleWrapper``: the ``LRSchedulerWrapper`` of backends whose schedules are functions of the step
(TensorFlow's Keras ``LearningRateSchedule`` s, JAX's optax schedules, or any callable ``step -> learning rate``).

The wrapper counts the steps itself (optimizer steps taken, or epochs with ``batch_level=False``; skipped steps do not
count, see :mod:`mlpug.callbacks.lr_scheduler`), evaluates every schedule at that count on the host and sets the
result with ``trainer.set_learning_rate`` before the step that uses it; the count is its checkpoint state, so a
resumed run continues the schedule exactly. A backend names its schedule types (:attr:`schedule_kinds`), says how a
schedule is evaluated on the host (:meth:`learning_rate_at`) and checks that an optimizer's learning rate can be set
(:meth:`check_settable`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from mlpug.callbacks.lr_scheduler import LRSchedulerWrapper
from mlpug.trainers.run_context import RunContext
from mlpug.trainers.trainer import DefaultTrainer


class StepScheduleWrapper(LRSchedulerWrapper):
    """Sets each optimizer's learning rate from a schedule of the step (see the module docstring); use a backend's
    class.

    Args:
        schedulers: A schedule, a callable ``step -> learning rate`` (the step an int >= 0; a number or a 0-d array
            returned), for the trainer's only (or first) optimizer; or a dict optimizer name -> schedule (the trainer's
            optimizer names: ``"optimizer"``, ``"optimizer_<i>"`` or its dict keys).
        batch_level: True (default): the step is the number of optimizer steps taken (skipped steps do not count);
            False: the number of epochs completed.
        metric_to_monitor: Not supported (there is no plateau schedule of the step); must be None.
        name: The callback's name (the key of its state, the step count, in training checkpoints).

    Raises:
        TypeError: A schedule is not callable, or a list was given (name the optimizers with a dict); at the
            manager's construction, a trainer that is not an mlpug ``DefaultTrainer``, or what
            :meth:`check_settable` raises.
        ValueError: ``metric_to_monitor`` was given; at the manager's construction, a dict key that is not an
            optimizer name of the trainer, or what :meth:`check_settable` raises.
    """

    backend_name: ClassVar[str] = ""
    """The backend, in error messages (``"TensorFlow"``, ``"JAX"``)."""
    schedule_kinds: ClassVar[str] = "a callable of the step"
    """What a schedule may be, in error messages."""

    def __init__(
        self,
        schedulers: Any,
        batch_level: bool = True,
        metric_to_monitor: Optional[str] = None,
        name: Optional[str] = None,
    ):
        if isinstance(schedulers, (list, tuple)):
            raise TypeError(
                f"schedulers must be one schedule or a dict optimizer name -> schedule on {self.backend_name}, got a "
                f"list: {schedulers!r:.200}"
            )
        if metric_to_monitor is not None:
            raise ValueError(
                f"metric_to_monitor={metric_to_monitor!r}: the {self.backend_name} LRSchedulerWrapper applies "
                "schedules of the step and takes no metric; pass metric_to_monitor=None"
            )
        super().__init__(schedulers, batch_level, None, name)
        self.steps = 0  # optimizer steps taken (batch level) or epochs completed

    def learning_rate_at(self, schedule: Any, step: int) -> float:
        """The learning rate of ``schedule`` at ``step``, evaluated on the host (no wait for an accelerator)."""
        raise NotImplementedError("use the LRSchedulerWrapper of a backend: mlp.callbacks.LRSchedulerWrapper")

    def check_settable(self, trainer: DefaultTrainer, optimizer_name: str) -> None:
        """Raise when the learning rate of the trainer's optimizer ``optimizer_name`` cannot be set (the error says
        why and what to do)."""
        raise NotImplementedError("use the LRSchedulerWrapper of a backend: mlp.callbacks.LRSchedulerWrapper")

    def check_scheduler(self, name: str, scheduler: Any) -> None:
        if not callable(scheduler):
            raise TypeError(
                f"scheduler {name!r} must be {self.schedule_kinds} or a callable of the step; got a "
                f"{type(scheduler).__module__}.{type(scheduler).__qualname__}: {scheduler!r:.100}"
            )

    def _optimizer_name(self, name: str, trainer: DefaultTrainer) -> str:
        return next(iter(trainer.optimizers)) if name == "scheduler" else name

    def _trainer(self, context: RunContext) -> DefaultTrainer:
        trainer = context.trainer
        if not isinstance(trainer, DefaultTrainer):
            raise TypeError(
                f"{self.name}: the LRSchedulerWrapper sets the learning rates of a DefaultTrainer's optimizers; the "
                f"trainer is a {type(trainer).__qualname__}"
            )
        return trainer

    def set_training_manager(self, manager: RunContext) -> bool:
        """Also check the optimizer names and that their learning rates can be set (:meth:`check_settable`).

        Raises:
            TypeError: The trainer is not an mlpug ``DefaultTrainer``, or what :meth:`check_settable` raises.
            ValueError: An unknown optimizer name, or what :meth:`check_settable` raises.
        """
        trainer = self._trainer(manager)
        for name in self.schedulers:
            target = self._optimizer_name(name, trainer)
            if target not in trainer.optimizers:
                names = sorted(trainer.optimizers)
                raise ValueError(f"{self.name}: no optimizer named {target!r}; the trainer's optimizers are {names}")
            self.check_settable(trainer, target)
        return bool(super().set_training_manager(manager))

    def _apply(self) -> None:
        trainer = self._trainer(self.context)
        rates = {name: self.learning_rate_at(schedule, self.steps) for name, schedule in self.schedulers.items()}
        for name, learning_rate in rates.items():
            trainer.set_learning_rate(learning_rate, self._optimizer_name(name, trainer))

    def on_training_start(self, num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter):
        self._apply()  # the first (or resumed) step's learning rate
        return True

    def step_scheduler(self, name: str, scheduler: Any, metric: Optional[float]) -> None:
        pass  # all schedules advance together in _step_all

    def _step_all(self, metric: Optional[float]) -> None:
        self.steps += 1
        self._apply()

    def scheduler_state(self, name: str, scheduler: Any) -> Any:
        return {"steps": self.steps}

    def load_scheduler_state(self, name: str, scheduler: Any, state: Any) -> None:
        self.steps = int(state["steps"])
