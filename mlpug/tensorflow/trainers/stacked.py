"""Several batches per compiled call on TensorFlow (``steps_per_execution``, ``evaluation_batches_per_call``):
the part of the ``DefaultTrainer`` that stacks batches and unstacks the results (the stacked step itself, a
``tf.while_loop`` over the batches, is :func:`mlpug.tensorflow.trainers.compilation.run_stacked`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from mlpug.tensorflow.trainers.compilation import (
    CompiledStep,
    check_batch_signature,
    same_shape_runs,
    stack_batches,
    unstack_outputs,
)
from mlpug.trainers.trainer import DefaultTrainer as NeutralDefaultTrainer
from mlpug.trainers.trainer import ModelOutputs, StepResult


class StackedCalls(NeutralDefaultTrainer):
    """``train_on_batches`` and ``evaluate_losses`` of the TensorFlow ``DefaultTrainer``, which holds the compiled
    steps and the options they use."""

    # provided by the TensorFlow DefaultTrainer
    batch_data_signature: Any
    eager_mode: bool
    _prepared: bool
    _train_steps: Optional[CompiledStep]  # the stacked training step (None: eager, or steps_per_execution == 1)
    _build: Any  # (batch, settings) -> bool: builds the models and optimizers from a first batch
    _replica_loss_pending: bool  # whether Keras' replica scaling of the loss is still to be probed
    _settle_replica_loss: Any  # (batch, settings) -> None: the probe, before a training step
    _check_first_batch: Any  # (batch, settings) -> None: the first-batch checks, before the first step
    _evaluate_step: Any  # (inference_mode, stacked) -> the evaluation step
    _learning_rate_for_logs: Any  # () -> the learning rate for logs

    def train_on_batches(self, batches: Sequence[Any], training_settings: Any = None) -> list[StepResult]:
        """One optimisation step per batch, several in one compiled call (``steps_per_execution``, see the
        ``DefaultTrainer`` docstring): consecutive batches of the same shapes are stacked and trained in a
        ``tf.while_loop``; a batch of its own shape (the short last batch) is stacked alone, through the same trace
        (its sample dimension is open). Eager mode, or one batch: :meth:`train_on` per batch.

        Returns:
            One :class:`StepResult` per batch, in order, as :meth:`train_on` returns them.

        Raises:
            ValueError: A batch does not match ``batch_data_signature`` (the message names it), or the loss mixes
                terms that Keras scales for the replicas with others (see ``train_on``).
        """
        if self._train_steps is None or len(batches) == 1:
            return super().train_on_batches(batches, training_settings)
        self.ensure_ready()
        if not self._prepared:
            check_batch_signature(batches[0], self.batch_data_signature)
            self._build(batches[0], training_settings)
        if self._replica_loss_pending:
            self._settle_replica_loss(batches[0], training_settings)
        if self._first_batch_checks:
            self._check_first_batch(batches[0], training_settings)
        results: list[StepResult] = []
        for run in same_shape_runs(batches):
            outputs = self._call_stacked(self._train_steps, run, training_settings)
            learning_rate = self._learning_rate_for_logs()
            for loss, num_samples, auxiliary_results, skipped in unstack_outputs(outputs, len(run)):
                results.append(
                    StepResult(
                        loss, num_samples, auxiliary_results, False if skipped is None else skipped, learning_rate
                    )
                )
        return results

    def _call_stacked(self, step: Any, batches: list, settings: Any) -> Any:
        """``step`` on the stacked ``batches``; a batch that does not match ``batch_data_signature`` is named."""
        try:
            return step(stack_batches(batches), settings)
        except (TypeError, ValueError):
            for batch in batches:
                check_batch_signature(batch, self.batch_data_signature)
            raise

    def evaluate_losses(
        self, batches: Sequence[Any], evaluate_settings: Any = None, inference_mode: bool = True
    ) -> list[ModelOutputs]:
        """:meth:`evaluate_loss` of each batch, ``evaluation_batches_per_call`` of them per compiled call when more
        than one (stacked and evaluated in a ``tf.while_loop``, as :meth:`train_on_batches`); the same values."""
        if self.eager_mode or self.evaluation_batches_per_call == 1 or len(batches) < 2:
            return super().evaluate_losses(batches, evaluate_settings, inference_mode)
        self.ensure_ready()
        if not self._prepared:
            self._build(batches[0], evaluate_settings)
        step = self._evaluate_step(bool(inference_mode), stacked=True)
        outputs: list[ModelOutputs] = []
        per_call = self.evaluation_batches_per_call
        for run in same_shape_runs(batches):
            for start in range(0, len(run), per_call):
                part = run[start : start + per_call]
                stacked = self._call_stacked(step, part, evaluate_settings)
                outputs.extend(ModelOutputs(*output) for output in unstack_outputs(stacked, len(part)))
        return outputs
