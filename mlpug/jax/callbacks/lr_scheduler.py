"""JAX ``LRSchedulerWrapper``: optax schedules, or Python functions of the step, applied by the training loop.

See :mod:`mlpug.callbacks.lr_scheduler` for when they step. A schedule gives the learning rate of step ``s`` (the
number of optimizer steps taken so far, or epochs with ``batch_level=False``); the wrapper sets it on its optimizer
with ``trainer.set_learning_rate`` before the step that uses it. The learning rate lives in the optimizer's state,
where ``optax.inject_hyperparams`` keeps it, so the optimizer must be made that way, e.g.
``optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)``; setting it replaces a 0-d array of that state (no
recompilation of the step). An optax schedule (``optax.warmup_cosine_decay_schedule(...)``, ``optax.join_schedules``
...) is evaluated on the host CPU (``jax.default_device`` of the CPU), so reading its value never waits for an
accelerator.

A schedule applied by this callback runs between steps, so with ``DefaultTrainer(steps_per_execution=K)`` a
batch-level wrapper makes every call run one step (it needs the model after every batch). To keep K steps per
call, give the schedule to the optimizer itself (``optax.inject_hyperparams(optax.adam)(learning_rate=schedule)``),
which optax evaluates inside the compiled step from its own step count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import jax
import numpy as np

from mlpug.callbacks.step_schedule import StepScheduleWrapper
from mlpug.trainers.hook_dispatcher import add_note
from mlpug.trainers.trainer import DefaultTrainer

Schedule = Callable[[int], Union[float, jax.Array, np.ndarray]]
"""``schedule(step) -> learning rate``: an optax schedule (``optax.Schedule``) or any Python function of the step
(an int >= 0) returning a number or a 0-d array."""


class LRSchedulerWrapper(StepScheduleWrapper):
    """Sets each optimizer's learning rate from a schedule of the step.

    Args:
        schedulers: A schedule (see :data:`Schedule`) for the trainer's only (or first) optimizer; or a dict
            optimizer name -> schedule (the trainer's optimizer names: ``"optimizer"`` or its dict keys).
        batch_level: True (default): the step is the number of optimizer steps taken (skipped steps, under
            ``non_finite_loss="skip_step"``, do not count); False: the number of epochs completed.
        metric_to_monitor: Not supported on JAX (there is no plateau schedule of the step); must be None.
        name: The callback's name (the key of its state, the step count, in training checkpoints).

    Raises:
        TypeError: A schedule is not callable, or a list was given (name the optimizers with a dict); at the
            manager's construction, an optimizer whose learning rate cannot be set (not made with
            ``optax.inject_hyperparams``, or made with a schedule of its own).
        ValueError: ``metric_to_monitor`` was given; at the manager's construction, a dict key that is not an
            optimizer name of the trainer.
    """

    backend_name = "JAX"
    schedule_kinds = "an optax schedule"

    def learning_rate_at(self, schedule: Any, step: int) -> float:
        with jax.default_device(jax.devices("cpu")[0]):  # an optax schedule's ops on the host: no accelerator wait
            return float(np.asarray(schedule(step)))

    def check_settable(self, trainer: DefaultTrainer, optimizer_name: str) -> None:
        """Sets the learning rate to its current value (one host transfer, here only); raises the trainer's
        TypeError when the optimizer was not made with ``optax.inject_hyperparams`` or has a schedule of its own."""
        try:
            trainer.set_learning_rate(trainer.get_learning_rate(optimizer_name), optimizer_name)  # type: ignore[arg-type]
        except TypeError as error:
            add_note(
                error, f"mlpug: {self.name} sets the learning rate of optimizer {optimizer_name!r} from its schedule"
            )
            raise
