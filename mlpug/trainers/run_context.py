"""``RunContext``: what a callback may read and do while the ``TrainingManager`` trains.

Every callback receives one in ``set_training_manager(context)`` and keeps it as ``self.training_manager`` (the
2021 name of the attribute). It is a view of the manager, not a copy: the counters, ``logs`` and the step result
are those of the moment it is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

from mlpug.distributed import BatchReduction, DistributedContext
from mlpug.trainers.evaluation_result import EvaluationResult, is_result_metric
from mlpug.trainers.trainer import BackendTrainer, StepResult

if TYPE_CHECKING:
    from mlpug.trainers.callback import Callback
    from mlpug.trainers.training_manager import TrainingManager


class RunContext:
    """The typed interface between the training loop and its callbacks.

    What it gives (read-only): the trainer, ``logs``, the distributed context, the callbacks, the run's size and
    counters, the step result and batch reduction of the batch being completed, and the error that ended training.
    What a callback may do: ask training to stop, ask for the finite check of losses and weights, publish an
    :class:`~mlpug.trainers.evaluation_result.EvaluationResult`, and take the training state for a checkpoint.

    Args:
        manager: The ``TrainingManager`` this context belongs to (it constructs the context itself).
    """

    __slots__ = ("_manager",)

    def __init__(self, manager: TrainingManager):
        self._manager = manager

    # ----- what a callback reads -----
    @property
    def trainer(self) -> BackendTrainer:
        """The backend trainer that runs the steps."""
        return self._manager.trainer

    @property
    def logs(self) -> dict:
        """The ``logs`` of the run (schema: :mod:`mlpug.logs`)."""
        return self._manager.logs

    @property
    def distributed(self) -> DistributedContext:
        """The distributed context: rank, world size and collectives (a single process: ``SerialContext``)."""
        return self._manager.distributed

    @property
    def callbacks(self) -> Sequence[Callback]:
        """All callbacks of the run, in the order given to the manager (for construction-time checks such as
        :func:`~mlpug.trainers.callback.check_log_path`)."""
        return tuple(self._manager.callbacks)

    @property
    def num_epochs(self) -> int:
        """Epochs the run trains in all."""
        return self._manager.num_epochs

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches per epoch (this rank's)."""
        return self._manager.num_batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch (0-based) being trained; in an epoch's checkpoint phase already the next one."""
        return self._manager.epoch

    @property
    def batch_step(self) -> int:
        """The next batch step to train in ``epoch``: after a batch's step, the one after it."""
        return self._manager.batch_step

    @property
    def global_iter(self) -> int:
        """The number of batches trained so far in the run."""
        return self._manager.global_iter

    @property
    def step_result(self) -> Optional[StepResult]:
        """The :class:`~mlpug.trainers.trainer.StepResult` of the batch being completed (read it in
        ``on_batch_training_completed``); None before the first step."""
        return self._manager.step_result

    @property
    def batch_reduction(self) -> Optional[BatchReduction]:
        """With several ranks, the batch's pairs to reduce over the ranks at the next read point (callbacks with
        ``reduces_batch_metrics`` add their values in ``on_batch_training_completed``); None in a single process."""
        return self._manager.batch_reduction

    @property
    def training_error(self) -> Optional[BaseException]:
        """The exception that ended training (set before the end hooks run), else None."""
        return self._manager.training_error

    @property
    def non_finite_loss_policy(self) -> str:
        """``TrainingManager(non_finite_loss=...)``: ``"raise"``, ``"skip_step"`` or ``"warn"``."""
        return self._manager.non_finite.policy

    @property
    def result_datasets(self) -> frozenset:
        """The dataset names whose evaluations reach the callbacks as ``on_evaluation_result`` events (declared by
        a callback's ``publishes_results``)."""
        return self._manager.result_datasets

    def is_result_metric(self, path: str) -> bool:
        """Whether the dotted ``path`` is a metric of published results (``<dataset>.dataset.<metric>`` of a
        dataset in :attr:`result_datasets`): a consumer reads it from ``on_evaluation_result``, once per result,
        not from ``logs`` at epoch ends."""
        return is_result_metric(path, self._manager.result_datasets)

    def is_asynchronous(self, dataset_name: str) -> bool:
        """Whether the results of ``dataset_name`` are published late (declared by a callback's
        ``asynchronous_results``): the weights they evaluated are older than the weights of the hook."""
        return dataset_name in self._manager.asynchronous_result_datasets

    # ----- what a callback may do -----
    def stop_training(self) -> None:
        """Ask training to stop: the current batch (with several steps per call, the current call) finishes, then
        the end hooks run. With several ranks every rank stops after the same batch."""
        self._manager.stop_training()

    def check_finite(self, weights: bool = False, recheck_weights: bool = False) -> None:
        """Check the training losses since the last check (one device wait), and with ``weights`` the trainable
        weights (one more device wait, none when they were checked at this step already, unless
        ``recheck_weights``: a hook may have set other weights since).

        Raises:
            NonFiniteLossError / NonFiniteWeightsError: Found, with the policy ``"raise"``.
        """
        if recheck_weights:
            self._manager.weights_check.forget()
        self._manager.check_finite(weights=weights or recheck_weights)

    def publish_result(self, result: EvaluationResult) -> None:
        """Dispatch ``result`` now: ``on_evaluation_result(result, logs)`` on every callback that implements it, in
        dispatch order. Producers publish from their own hooks, which run before the other callbacks' part of the
        same hook (see :func:`~mlpug.trainers.callback.dispatch_order`), so a consumer sees a result before it
        handles the hook in which the result landed.

        Raises:
            ValueError: ``result.dataset_name`` is not declared in any callback's ``publishes_results``.
            Exception: What a callback's ``on_evaluation_result`` raised (training ends through the failure path).
        """
        self._manager.dispatch_result(result)

    def get_state(self) -> dict:
        """The training state, the content of a training checkpoint (see ``TrainingManager.get_state``)."""
        return self._manager.get_state()
