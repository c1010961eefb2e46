"""TensorFlow ``LRSchedulerWrapper``: Keras ``LearningRateSchedule`` s, or callables of the step, applied by the
training loop.

See :mod:`mlpug.callbacks.lr_scheduler` for when they step and :mod:`mlpug.callbacks.step_schedule` for the step
count. A schedule gives the learning rate of step ``s`` (the number of optimizer steps taken so far, or epochs with
``batch_level=False``); the wrapper sets it on its optimizer with ``trainer.set_learning_rate`` (an assignment to the
optimizer's learning-rate variable: no retrace of the compiled step) before the step that uses it. Warm-up: Keras 3
schedules such as ``keras.optimizers.schedules.CosineDecay(..., warmup_target=..., warmup_steps=...)``, or any
callable.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from mlpug.callbacks.step_schedule import StepScheduleWrapper
from mlpug.trainers.trainer import DefaultTrainer


class LRSchedulerWrapper(StepScheduleWrapper):
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

    backend_name = "TensorFlow"
    schedule_kinds = "a tf.keras.optimizers.schedules.LearningRateSchedule"

    def learning_rate_at(self, schedule: Any, step: int) -> float:
        with tf.device("/CPU:0"):  # a schedule's ops on the host: no wait for the training device
            return float(tf.convert_to_tensor(schedule(step)).numpy())

    def check_settable(self, trainer: DefaultTrainer, optimizer_name: str) -> None:
        """Raises ValueError when the optimizer was created with a learning rate schedule of its own."""
        if not isinstance(trainer.optimizers[optimizer_name].learning_rate, tf.keras.Variable):
            raise ValueError(
                f"{self.name}: optimizer {optimizer_name!r} was created with a learning rate schedule of its own; "
                "give it a float learning rate and the schedule to the LRSchedulerWrapper"
            )
