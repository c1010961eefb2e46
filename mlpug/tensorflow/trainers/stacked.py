"""Several batches per compiled call on TensorFlow (``steps_per_execution``, ``evaluation_steps_per_execution``):
:class:`StackedSteps` makes the compiled steps of stacked batches, stacks the batches of a call and unstacks the
results (the loop inside a call, a ``tf.while_loop`` over the batches, is
:func:`mlpug.tensorflow.trainers.compilation.run_stacked`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mlpug.tensorflow.trainers.compilation import (
    CompiledStep,
    StepFunction,
    check_batch_signature,
    run_stacked,
    same_shape_runs,
    stack_batches,
    stacked_signature,
    unstack_outputs,
)
from mlpug.trainers.trainer import ModelOutputs, StepResult


class StackedSteps:
    """The compiled steps of stacked batches of the TensorFlow ``DefaultTrainer``, and calling them.

    A call trains (or evaluates) consecutive batches of the same shapes, stacked; a batch of its own shape (the
    short last batch) is stacked alone, through the same trace: without a ``batch_data_signature`` the first call
    is traced with the number of batches and the samples per batch left open.

    Args:
        batch_data_signature: The trainer's nested ``tf.TensorSpec`` s of one batch, or None.
        training_settings_signature: The trainer's nested ``tf.TensorSpec`` s of the training settings, or None.
        steps_per_execution: Training batches per compiled call at most (int >= 1).
        evaluation_steps_per_execution: Evaluation batches per compiled call at most (int >= 1).
    """

    def __init__(
        self,
        batch_data_signature: Any,
        training_settings_signature: Any,
        steps_per_execution: int,
        evaluation_steps_per_execution: int,
    ):
        self.batch_data_signature = batch_data_signature
        self.training_settings_signature = training_settings_signature
        self.steps_per_execution = steps_per_execution
        self.evaluation_steps_per_execution = evaluation_steps_per_execution

    def training_step(self, train_step_function: StepFunction) -> CompiledStep:
        """The compiled step that runs ``train_step_function(batch, settings)`` for every batch of a stacked call."""
        return CompiledStep(
            lambda batches, settings: run_stacked(train_step_function, batches, settings),
            f"train step x{self.steps_per_execution} (steps_per_execution)",
            stacked_signature(self.batch_data_signature),
            self.training_settings_signature,
            relax_leading_dimension=True,
        )

    def evaluation_step(self, evaluate_function: StepFunction, name: str) -> CompiledStep:
        """The compiled step that runs ``evaluate_function(batch, settings)`` for every batch of a stacked call."""
        return CompiledStep(
            lambda batches, settings: run_stacked(evaluate_function, batches, settings),
            name,
            stacked_signature(self.batch_data_signature),
            relax_leading_dimension=True,
        )

    def train(
        self,
        step: StepFunction,
        batches: Sequence[Any],
        training_settings: Any,
        learning_rate_for_logs: Callable[[], Any],
    ) -> list[StepResult]:
        """One optimisation step per batch with ``step`` (:meth:`training_step`), a call per run of batches of the
        same shapes (the models are built, and the checks before a first step done).

        Args:
            learning_rate_for_logs: ``() -> the learning rate for logs`` after a call (every batch of the call gets
                that value).

        Returns:
            One :class:`StepResult` per batch, in order.

        Raises:
            ValueError: A batch does not match ``batch_data_signature`` (the message names it).
        """
        results: list[StepResult] = []
        for run in same_shape_runs(batches):
            outputs = self._call(step, run, training_settings)
            learning_rate = learning_rate_for_logs()
            for loss, num_samples, auxiliary_results, skipped in unstack_outputs(outputs, len(run)):
                results.append(
                    StepResult(
                        loss, num_samples, auxiliary_results, False if skipped is None else skipped, learning_rate
                    )
                )
        return results

    def evaluate(self, step: StepFunction, batches: Sequence[Any], evaluate_settings: Any) -> list[ModelOutputs]:
        """The outputs of every batch with ``step`` (:meth:`evaluation_step`), at most
        ``evaluation_steps_per_execution`` batches of the same shapes per call; in order.

        Raises:
            ValueError: A batch does not match ``batch_data_signature`` (the message names it).
        """
        outputs: list[ModelOutputs] = []
        per_call = self.evaluation_steps_per_execution
        for run in same_shape_runs(batches):
            for start in range(0, len(run), per_call):
                part = run[start : start + per_call]
                stacked = self._call(step, part, evaluate_settings)
                outputs.extend(ModelOutputs(*output) for output in unstack_outputs(stacked, len(part)))
        return outputs

    def _call(self, step: StepFunction, batches: list, settings: Any) -> Any:
        """``step`` on the stacked ``batches``; a batch that does not match ``batch_data_signature`` is named."""
        try:
            return step(stack_batches(batches), settings)
        except (TypeError, ValueError):
            for batch in batches:
                check_batch_signature(batch, self.batch_data_signature)
            raise
