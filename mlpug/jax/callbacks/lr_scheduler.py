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
from typing import Any, Optional, Union

import jax
import numpy as np

from mlpug.callbacks.lr_scheduler import LRSchedulerWrapper as _NeutralLRSchedulerWrapper
from mlpug.jax.trainers.trainer import DefaultTrainer
from mlpug.trainers.hook_dispatcher import add_note
from mlpug.trainers.run_context import RunContext

Schedule = Callable[[int], Union[float, jax.Array, np.ndarray]]
"""``schedule(step) -> learning rate``: an optax schedule (``optax.Schedule``) or any Python function of the step
(an int >= 0) returning a number or a 0-d array."""


class LRSchedulerWrapper(_NeutralLRSchedulerWrapper):
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

    def __init__(
        self,
        schedulers: Any,
        batch_level: bool = True,
        metric_to_monitor: Optional[str] = None,
        name: Optional[str] = None,
    ):
        if isinstance(schedulers, (list, tuple)):
            raise TypeError(
                "schedulers must be one schedule or a dict optimizer name -> schedule on JAX, got a list: "
                f"{schedulers!r:.200}"
            )
        if metric_to_monitor is not None:
            raise ValueError(
                f"metric_to_monitor={metric_to_monitor!r}: the JAX LRSchedulerWrapper applies schedules of the step "
                "and takes no metric; pass metric_to_monitor=None"
            )
        super().__init__(schedulers, batch_level, None, name)
        self.steps = 0  # optimizer steps taken (batch level) or epochs completed

    def check_scheduler(self, name: str, scheduler: Any) -> None:
        if not callable(scheduler):
            raise TypeError(
                f"scheduler {name!r} must be an optax schedule or a callable of the step (e.g. "
                f"optax.cosine_decay_schedule(1e-3, 1000)); got a {type(scheduler).__module__}."
                f"{type(scheduler).__qualname__}: {scheduler!r:.100}"
            )

    def _optimizer_name(self, name: str, trainer: DefaultTrainer) -> str:
        return next(iter(trainer.optimizers)) if name == "scheduler" else name

    def _trainer(self, context: RunContext) -> DefaultTrainer:
        trainer = context.trainer
        if not isinstance(trainer, DefaultTrainer):
            raise TypeError(
                f"{self.name}: the LRSchedulerWrapper sets the learning rates of a JAX DefaultTrainer's optimizers; "
                f"the trainer is a {type(trainer).__qualname__}"
            )
        return trainer

    def set_training_manager(self, manager: RunContext) -> bool:
        """Also check the optimizer names and that their learning rates can be set (the learning rate is set to
        its current value: one host transfer per optimizer, here only).

        Raises:
            TypeError: The trainer is not a JAX ``DefaultTrainer``, or an optimizer's learning rate cannot be set
                (not made with ``optax.inject_hyperparams``, or with a schedule of its own).
            ValueError: An unknown optimizer name.
        """
        trainer = self._trainer(manager)
        for name in self.schedulers:
            target = self._optimizer_name(name, trainer)
            if target not in trainer.optimizers:
                names = sorted(trainer.optimizers)
                raise ValueError(f"{self.name}: no optimizer named {target!r}; the trainer's optimizers are {names}")
            try:
                trainer.set_learning_rate(trainer.get_learning_rate(target), target)  # type: ignore[arg-type]
            except TypeError as error:
                add_note(error, f"mlpug: {self.name} sets the learning rate of optimizer {target!r} from its schedule")
                raise
        return bool(super().set_training_manager(manager))

    def _apply(self) -> None:
        trainer = self._trainer(self.context)
        with jax.default_device(jax.devices("cpu")[0]):  # an optax schedule's ops on the host: no accelerator wait
            rates = {name: float(np.asarray(schedule(self.steps))) for name, schedule in self.schedulers.items()}
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
