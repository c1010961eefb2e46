"""Several optimisation steps per trainer call in the ``TrainingManager``'s batch loop (a mixin; see "Several
steps per call" in :mod:`mlpug.trainers.training`).

With ``trainer.steps_per_execution`` > 1 (TensorFlow's ``DefaultTrainer(steps_per_execution=K)``) the batch loop
takes up to K batches at a time, never past the epoch's end nor past the batch at which a callback needs the model
(``Callback.batches_until_model_access``, e.g. a batch-level checkpoint), trains them with one
``trainer.train_on_batches`` call and then runs every batch's hooks in order, each with its own ``StepResult``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mlpug import logs as logs_module

_log = logging.getLogger("mlpug.TrainingManager")


class StepsPerCall:
    """The batch loop of one epoch in calls of several steps, for the
    :class:`~mlpug.trainers.training.TrainingManager`."""

    # provided by the TrainingManager
    trainer: Any
    callbacks: list
    epoch: int
    batch_step: int
    global_iter: int
    num_batches_per_epoch: int
    _batch_hooks: Any  # () -> the bound batch hooks
    _call: Any  # (bound hooks, hook name, *args)
    _complete_batch: Any  # (batch, StepResult, current, duration, hooks)
    _dispatch_failure: Any  # (error, logs)
    _next_batch: Any  # (data iterator, batch step) -> batch
    _should_stop: Any  # () -> bool
    _next_weights_check: float  # the step count after which the weights are checked (check_weights_every)
    _check_finite_in_loop: Any  # () -> None: the losses and weights checked, by the loop

    def _train_epoch_in_calls(self, data: Any, logs: dict) -> bool:
        """:meth:`_train_epoch` with several optimisation steps per trainer call (``steps_per_execution``).

        Each call trains up to ``steps_per_execution`` batches, never past the epoch's end nor past a batch at
        which a callback needs the model (``Callback.batches_until_model_access``); the batch hooks then run for
        every batch of the call, in order, as after one step per call (``on_batch_training_start`` for all of them
        before the call). A stop request or a signal takes effect at the end of a call. Each batch's logged
        duration is the call's duration divided by its batches.
        """
        trainer, training_settings = self.trainer, logs["training_settings"]
        hooks = self._batch_hooks()
        start_hooks = hooks[0]
        epoch, new_current = self.epoch, logs_module.new_current
        batch_step = self.batch_step
        while batch_step < self.num_batches_per_epoch:
            if self._should_stop():
                return False
            self.batch_step = batch_step
            size = self._batches_per_call(batch_step)
            batches = [self._next_batch(data, batch_step + index) for index in range(size)]
            currents = []
            for index, batch in enumerate(batches):
                logs["current"] = current = new_current(epoch, batch_step + index, self.global_iter + index)
                currents.append(current)
                if start_hooks:
                    self._call(start_hooks, "on_batch_training_start", batch, logs)
            start_time = time.perf_counter()
            try:
                results = trainer.train_on_batches(batches, training_settings)
            except Exception as error:
                self._dispatch_failure(error, logs)
                raise
            duration = (time.perf_counter() - start_time) / size
            end_step, end_iter = batch_step + size, self.global_iter + size
            try:
                for batch, result, current in zip(batches, results, currents):
                    logs["current"] = current
                    self._complete_batch(batch, result, current, duration, hooks)
            except BaseException:
                # the model has trained every batch of the call: a checkpoint of the failure resumes after them
                self.batch_step, self.global_iter = end_step, end_iter
                raise
            batch_step = end_step
            if self.global_iter >= self._next_weights_check:  # after the call: the weights of its last step
                self._check_finite_in_loop()
        return True

    def _batches_per_call(self, batch_step: int) -> int:
        """How many batches the next call trains: ``steps_per_execution`` at most, up to the epoch's end and to
        the first batch at which a callback needs the model (the same on every rank)."""
        size = min(self.trainer.steps_per_execution, self.num_batches_per_epoch - batch_step)
        for callback in self.callbacks:
            needed = callback.batches_until_model_access(self.global_iter)
            if needed is not None:
                size = min(size, needed)
        return max(size, 1)

    def _warn_if_steps_per_call_limited(self) -> None:
        """One warning per callback that needs the model after every batch, so that ``steps_per_execution`` > 1
        has no effect."""
        steps = self.trainer.steps_per_execution
        if steps == 1:
            return
        every_batch = [
            callback.name
            for callback in self.callbacks
            if callback.batches_until_model_access(self.global_iter) == 1
            and callback.batches_until_model_access(self.global_iter + 1) == 1
        ]
        if every_batch:
            _log.warning(
                f"steps_per_execution={steps} has no effect: callbacks {every_batch} need the model after every "
                "batch (they act before a step, or read or change the model, the optimizer or the learning rate in "
                "a batch hook; see Callback.batches_until_model_access), so training runs one step per call"
            )
