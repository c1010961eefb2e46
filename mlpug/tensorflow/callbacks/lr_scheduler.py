"""TensorFlow ``LRSchedulerWrapper``: Keras ``LearningRateSchedule`` s, or callables of the step, applied by the
training loop.

See :mod:`mlpug.callbacks.lr_scheduler` for when they step. A schedule gives the learning rate of step
``s`` (the number of optimizer steps taken so far, or epochs with ``batch_level=False``); the wrapper sets it on its
optimizer with ``trainer.set_learning_rate`` (an assignment to the optimizer's learning-rate variable: no retrace
of the compiled step) before the step that uses it. Warm-up: Keras 3 schedules such as
``keras.optimizers.schedules.CosineDecay(..., warmup_target=..., warmup_steps=...)``, or any callable.
"""

from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf

from mlpug.callbacks.lr_scheduler import LRSchedulerWrapper as _NeutralLRSchedulerWrapper
from mlpug.trainers.run_context import RunContext
from mlpug.trainers.trainer import DefaultTrainer


class LRSchedulerWrapper(_NeutralLRSchedulerWrapper):
    """Sets each optimizer's learning rate from a schedule of the step.

    Args:
        schedulers: A ``tf.keras.optimizers.schedules.LearningRateSchedule`` or a callable ``step -> learning
            rate`` (a float or a scalar tensor), for the trainer's only (or first) optimizer; or a dict optimizer
            name -> schedule (the trainer's optimizer names: ``"optimizer"``, ``"optimizer_<i>"`` or its dict keys).
        batch_level: True (default): the step is the number of optimizer steps taken (skipped steps do not count);
            False: the epoch.
        metric_to_monitor: Not supported on TensorFlow (there is no plateau schedule of the step); must be None.
        name: The callback's name.

    Raises:
        TypeError: A schedule is not callable, or a list was given (name the optimizers with a dict).
        ValueError: ``metric_to_monitor`` was given; at the manager's construction, a dict key that is not an
            optimizer name of the trainer, or an optimizer created with a schedule of its own.
    """

    def __init__(
        self,
        schedulers: Any,
        batch_level: bool = True,
        metric_to_monitor: Optional[str] = None,
        name: Optional[str] = None,
    ):
        if isinstance(schedulers, (list, tuple)):
            raise TypeError(
                "schedulers must be one schedule or a dict optimizer name -> schedule on TensorFlow, got a list: "
                f"{schedulers!r:.200}"
            )
        if metric_to_monitor is not None:
            raise ValueError(
                f"metric_to_monitor={metric_to_monitor!r}: the TensorFlow LRSchedulerWrapper applies schedules of the "
                "step and takes no metric; pass metric_to_monitor=None"
            )
        super().__init__(schedulers, batch_level, None, name)
        self.steps = 0  # optimizer steps taken (batch level) or epochs completed

    def check_scheduler(self, name: str, scheduler: Any) -> None:
        if not callable(scheduler):
            raise TypeError(
                f"scheduler {name!r} must be a tf.keras.optimizers.schedules.LearningRateSchedule or a callable of "
                f"the step; got a {type(scheduler).__module__}.{type(scheduler).__qualname__}"
            )

    def _optimizer_name(self, name: str) -> Optional[str]:
        return None if name == "scheduler" else name

    def set_training_manager(self, manager: RunContext) -> bool:
        """Also check the optimizer names and that their learning rates can be set.

        Raises:
            TypeError: The trainer is not an mlpug ``DefaultTrainer`` (it has no named optimizers to schedule).
            ValueError: An unknown optimizer name, or an optimizer whose learning rate is a schedule itself.
        """
        optimizers = self._trainer(manager).optimizers
        for name in self.schedulers:
            target = self._optimizer_name(name)
            selected = [next(iter(optimizers.values()))] if target is None else [optimizers.get(target)]
            if selected[0] is None:
                raise ValueError(
                    f"{self.name}: no optimizer named {target!r}; the trainer's optimizers are {sorted(optimizers)}"
                )
            if not isinstance(selected[0].learning_rate, tf.keras.Variable):
                raise ValueError(
                    f"{self.name}: optimizer {target or next(iter(optimizers))!r} was created with a learning rate "
                    "schedule of its own; give it a float learning rate and the schedule to the LRSchedulerWrapper"
                )
        return bool(super().set_training_manager(manager))

    def _trainer(self, context: RunContext) -> DefaultTrainer:
        trainer = context.trainer
        if not isinstance(trainer, DefaultTrainer):
            raise TypeError(
                f"{self.name}: the LRSchedulerWrapper sets the learning rates of a DefaultTrainer's optimizers; the "
                f"trainer is a {type(trainer).__qualname__}"
            )
        return trainer

    def _apply(self) -> None:
        trainer = self._trainer(self.context)
        for name, schedule in self.schedulers.items():
            with tf.device("/CPU:0"):  # a schedule's ops on the host: no wait for the training device
                learning_rate = float(tf.convert_to_tensor(schedule(self.steps)).numpy())
            optimizer_name = self._optimizer_name(name) or next(iter(trainer.optimizers))
            trainer.set_learning_rate(learning_rate, optimizer_name)

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
