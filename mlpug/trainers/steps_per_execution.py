"""``StepsPerExecution``: how many batches the ``TrainingManager`` trains in one trainer call.

With ``trainer.steps_per_execution`` K > 1 (TensorFlow's ``DefaultTrainer(steps_per_execution=K)``) the batch loop
takes up to K batches at a time, never past the epoch's end nor past the batch at which a callback needs the model
(``Callback.batches_until_model_access``, e.g. a batch-level checkpoint), trains them with one
``trainer.train_on_batches`` call and then runs every batch's hooks in order, each with its own ``StepResult``
(see "Several steps per call" in :mod:`mlpug.trainers.training_manager`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mlpug.trainers.callback import Callback

_log = logging.getLogger("mlpug.TrainingManager")


class StepsPerExecution:
    """The size of each trainer call of a run with ``steps_per_execution`` > 1.

    Args:
        steps_per_execution: Batches per call at most (the trainer's, >= 2).
        callbacks: The run's callbacks; each may limit a call (``batches_until_model_access``).
    """

    def __init__(self, steps_per_execution: int, callbacks: Sequence[Callback]):
        self.steps_per_execution = steps_per_execution
        self.callbacks = list(callbacks)

    def batches_in_call(self, batch_step: int, num_batches_per_epoch: int, global_iter: int) -> int:
        """How many batches the next call trains (>= 1): ``steps_per_execution`` at most, up to the epoch's end and
        to the first batch at which a callback needs the model. The same on every rank (callbacks must answer
        alike)."""
        size = min(self.steps_per_execution, num_batches_per_epoch - batch_step)
        for callback in self.callbacks:
            needed = callback.batches_until_model_access(global_iter)
            if needed is not None:
                size = min(size, needed)
        return max(size, 1)

    def warn_if_limited(self, global_iter: int) -> None:
        """One warning naming the callbacks that need the model after every batch, so that
        ``steps_per_execution`` has no effect."""
        every_batch = [
            callback.name
            for callback in self.callbacks
            if callback.batches_until_model_access(global_iter) == 1
            and callback.batches_until_model_access(global_iter + 1) == 1
        ]
        if every_batch:
            _log.warning(
                f"steps_per_execution={self.steps_per_execution} has no effect: callbacks {every_batch} need the "
                "model after every batch (they act before a step, or read or change the model, the optimizer or the "
                "learning rate in a batch hook; see Callback.batches_until_model_access), so training runs one step "
                "per call"
            )
