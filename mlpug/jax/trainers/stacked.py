"""Several batches per compiled call on JAX (``steps_per_execution``, ``evaluation_steps_per_execution``).

:class:`StackedSteps` compiles, with ``jax.jit``, a ``jax.lax.scan`` of the trainer's own step over batches stacked
along a new leading dimension::

    train_steps(trainable, optimizer_states, rest, stacked_batches, settings)   # jax.jit, the first three donated
        carry = (trainable, optimizer_states, rest)
        carry, per_batch = lax.scan(train_step_function(*carry, batch, settings), carry, stacked_batches)
        return *carry, [per_batch[i] for i in range(K)]     # each batch's outputs, unstacked inside the call

``train_step_function`` is the very body of the one-batch step (:meth:`mlpug.jax.trainers.trainer.DefaultTrainer.
_train_step_function`): the parameters, optimizer states and the model's other variables (``nnx.Rngs`` counts,
batch statistics) are the scan's carry, so K steps in one call are the K steps one after the other, in the same
order, with the same random draws. Evaluation is a scan of the evaluation step over the batches (nothing carried).

Batches are stacked only when they have the same tree structure, the same constants (the values that are not
arrays, :class:`~mlpug.jax.trainers.compilation.StaticValue`) and the same shapes and dtypes
(:func:`same_shape_runs`); a batch of another shape (the short last batch) goes to another call. The compiled
function is traced once per number of batches and batch signature (``jax.jit`` 's cache), so a run of calls of K
batches, the short last call of an epoch included, compiles once per distinct call length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlpug.jax.trainers.compilation import compile_step, from_traceable
from mlpug.jax.trainers.live_model import LiveModel
from mlpug.jax.trainers.optimizers import OptaxOptimizers
from mlpug.trainers.trainer import ModelOutputs, StepResult

TrainStepFunction = Callable[..., tuple]
"""``(trainable, states, rest, batch, settings, skip_non_finite) -> (trainable, states, rest, outputs, skipped,
learning_rate)``: the trainer's traced one-batch training step."""

EvaluateStepFunction = Callable[..., Any]
"""``(trainable, rest, batch, settings, inference_mode) -> outputs``: the trainer's traced evaluation step."""

PlaceBatch = Callable[..., Any]
"""``place_batch(batch, batch_axis)``: the strategy's placement of a batch (see
:meth:`mlpug.jax.strategies.JaxStrategy.place_batch`)."""

LocalOutputs = Callable[..., Any]
"""``local_outputs(auxiliary_results)``: the strategy's per-sample outputs of a step as this process's part;
``local_outputs(loss, global_values=True)``: the step's loss as this process's copy (see
:meth:`mlpug.jax.strategies.JaxStrategy.local_outputs`)."""

LocalNumSamples = Callable[[Any, Any], Any]
"""``local_num_samples(num_samples, batch)``: the strategy's sample count of a step as this process's (see
:meth:`mlpug.jax.strategies.JaxStrategy.local_num_samples`)."""


def _same_count(num_samples: Any, batch: Any) -> Any:
    """The default :data:`LocalNumSamples`: ``num_samples`` as it is (one process)."""
    return num_samples


def step_outputs(outputs: Any, local_outputs: LocalOutputs) -> tuple[Any, Any, Any]:
    """``(loss, num_samples, auxiliary_results)`` of a compiled step's traceable outputs, the auxiliary results
    localised by the strategy (this process's rows, matching the batch it fed) before their dicts become plain dicts
    again (so they keep the model's key order), the loss localised too (this process's copy, so that eager operations
    on it run on this process's device only), values that are not arrays back as Python values.

    Args:
        outputs: The step's ``as_traceable((loss, num_samples, auxiliary_results))``.
        local_outputs: The strategy's :meth:`~mlpug.jax.strategies.JaxStrategy.local_outputs`.
    """
    loss, num_samples, auxiliary_results = outputs
    return from_traceable((local_outputs(loss, global_values=True), num_samples, local_outputs(auxiliary_results)))


def batch_signature(batch: Any) -> tuple:
    """What must be equal for two (traceable) batches to be stacked: the tree structure (with the constants) and
    every array's shape, dtype and weak typing."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple(
        (np.shape(leaf), np.dtype(leaf.dtype), bool(getattr(leaf, "weak_type", False))) for leaf in leaves
    )


def same_shape_runs(batches: Sequence[Any], max_length: int) -> list[list[int]]:
    """The positions of ``batches`` split into runs of consecutive batches with the same :func:`batch_signature`
    (so each run can be stacked), at most ``max_length`` long, in order; e.g. full batches and the short last
    batch of an epoch form two runs.

    Args:
        batches: Traceable batches (:func:`~mlpug.jax.trainers.compilation.as_traceable`).
        max_length: The most batches per run (int >= 1).
    """
    runs: list[list[int]] = []
    previous = None
    for index, batch in enumerate(batches):
        signature = batch_signature(batch)
        if runs and signature == previous and len(runs[-1]) < max_length:
            runs[-1].append(index)
        else:
            runs.append([index])
        previous = signature
    return runs


def stack_batches(batches: Sequence[Any]) -> Any:
    """One batch whose arrays have a new leading dimension: the batches in order (``np.stack`` when every value of
    an array is a NumPy array, one host copy then one transfer; else ``jnp.stack``). The batches must have the same
    :func:`batch_signature`."""

    def stack(*arrays: Any) -> Any:
        if all(isinstance(array, (np.ndarray, np.generic)) for array in arrays):
            return np.stack(arrays)
        return jnp.stack(arrays)

    return jax.tree_util.tree_map(stack, *batches)


def unstack(stacked: Any, count: int) -> list:
    """Inside a trace: the ``count`` per-batch trees of ``stacked`` (every array indexed along its first
    dimension), so that the compiled call returns each batch's values as arrays of their own."""
    return [jax.tree_util.tree_map(lambda leaf, index=index: leaf[index], stacked) for index in range(count)]


class StackedSteps:
    """The compiled steps of the JAX ``DefaultTrainer`` over stacked batches, and calling them (module docstring).

    Args:
        train_step_function: The trainer's traced one-batch training step (:data:`TrainStepFunction`).
        evaluate_step_function: The trainer's traced evaluation step (:data:`EvaluateStepFunction`).
        place_batch: The strategy's placement of a batch; called with ``batch_axis=1`` on stacked batches.
        local_outputs: The strategy's localisation of a step's auxiliary results (:data:`LocalOutputs`), applied to
            each batch's, as the one-batch calls of the trainer do.
        local_num_samples: The strategy's localisation of each batch's ``num_samples`` (:data:`LocalNumSamples`),
            likewise; default the count as it is.
    """

    def __init__(
        self,
        train_step_function: TrainStepFunction,
        evaluate_step_function: EvaluateStepFunction,
        place_batch: PlaceBatch,
        local_outputs: LocalOutputs,
        local_num_samples: LocalNumSamples = _same_count,
    ):
        self.train_step_function = train_step_function
        self.evaluate_step_function = evaluate_step_function
        self.place_batch = place_batch
        self.local_outputs = local_outputs
        self.local_num_samples = local_num_samples
        self.train_steps = compile_step(
            self._train_steps_function, donate_argnums=(0, 1, 2), static_argnames=("skip_non_finite", "count")
        )
        self.evaluate_steps = compile_step(self._evaluate_steps_function, static_argnames=("inference_mode", "count"))

    # ----- traced -----
    def _train_steps_function(
        self,
        trainable: tuple,
        states: tuple,
        rest: list,
        batches: Any,
        settings: Any,
        skip_non_finite: bool,
        count: int,
    ) -> tuple:
        """``count`` training steps, one per stacked batch, in a ``lax.scan`` (see the module docstring).

        Returns:
            ``(trainable, states, rest, per_batch)``: the values after the last step, and per batch
            ``(outputs, skipped, learning_rate)`` as the one-batch step returns them.
        """

        def body(carry: tuple, batch: Any) -> tuple:
            trainable, states, rest, outputs, skipped, learning_rate = self.train_step_function(
                *carry, batch, settings, skip_non_finite
            )
            return (trainable, states, rest), (outputs, skipped, learning_rate)

        per_batch: Any
        (trainable, states, rest), per_batch = lax.scan(
            body, (tuple(trainable), tuple(states), list(rest)), batches, length=count
        )
        return trainable, states, rest, unstack(per_batch, count)

    def _evaluate_steps_function(
        self, trainable: tuple, rest: list, batches: Any, settings: Any, inference_mode: bool, count: int
    ) -> list:
        """The evaluation step of every stacked batch in a ``lax.scan`` (nothing carried); per batch its outputs."""

        def body(carry: None, batch: Any) -> tuple:
            return carry, self.evaluate_step_function(trainable, rest, batch, settings, inference_mode)

        per_batch: Any
        _, per_batch = lax.scan(body, None, batches, length=count)
        return unstack(per_batch, count)

    # ----- calls -----
    def train(
        self,
        live: LiveModel,
        optimizer_states: OptaxOptimizers,
        batches: Sequence[Any],
        settings: Any,
        skip_non_finite: bool,
    ) -> list[StepResult]:
        """One optimisation step per batch of ``batches``, in one compiled call; the new values written back into
        the live variables and the optimizer states.

        Args:
            live: The trainer's live model (its values are read, donated and replaced).
            optimizer_states: The trainer's optimizer states (donated and replaced).
            batches: Two or more traceable batches with the same :func:`batch_signature`.
            settings: The traceable training settings.
            skip_non_finite: Keep the old values of a batch whose loss is not finite (per batch, in the scan).

        Returns:
            One :class:`StepResult` per batch, in order: its loss, ``num_samples``, auxiliary results, whether its
            step was skipped (``False`` or a 0-d bool array) and its learning rate (a 0-d array or None); arrays stay
            on the device; the auxiliary results this process's part (``local_outputs``).

        Raises:
            ValueError: The strategy cannot split the stacked batches (see ``place_batch``), or the forward pass
                created or removed variables (on the first call of a batch signature, while tracing).
            TypeError / ValueError: What the model returned is not a loss, or a batch cannot be chunked (while
                tracing; the messages say why). Nothing is changed then.
        """
        trainable, states, rest, per_batch = self.train_steps(
            live.trainable_values(),
            optimizer_states.state_tuple(),
            live.rest_values(),
            self.place_batch(stack_batches(batches), batch_axis=1),
            settings,
            skip_non_finite=skip_non_finite,
            count=len(batches),
        )
        live.write(trainable, rest)
        optimizer_states.set_state_tuple(states)
        results = []
        for batch, (outputs, skipped, learning_rate) in zip(batches, per_batch):
            loss, num_samples, auxiliary_results = step_outputs(outputs, self.local_outputs)
            num_samples = self.local_num_samples(num_samples, batch)
            results.append(
                StepResult(loss, num_samples, auxiliary_results, False if skipped is None else skipped, learning_rate)
            )
        return results

    def evaluate(
        self,
        trainable: Sequence[Sequence[Any]],
        rest: Sequence[Any],
        batches: Sequence[Any],
        settings: Any,
        inference_mode: bool,
    ) -> list[ModelOutputs]:
        """The outputs of every batch of ``batches`` (two or more traceable batches with the same
        :func:`batch_signature`), evaluated in one compiled call with the values ``trainable`` (per optimizer, its
        parameters' values) and ``rest`` (the other variables' values; the live model's, or a snapshot's); nothing
        changes. Each batch's :class:`ModelOutputs`, in order, the auxiliary results this process's part.

        Raises:
            ValueError: The strategy cannot split the stacked batches (see ``place_batch``).
            TypeError / ValueError: What the model returned is not a loss (while tracing; the message says why).
        """
        per_batch = self.evaluate_steps(
            tuple(trainable),
            list(rest),
            self.place_batch(stack_batches(batches), batch_axis=1),
            settings,
            inference_mode=inference_mode,
            count=len(batches),
        )
        results = []
        for batch, outputs in zip(batches, per_batch):
            loss, num_samples, auxiliary_results = step_outputs(outputs, self.local_outputs)
            results.append(ModelOutputs(loss, self.local_num_samples(num_samples, batch), auxiliary_results))
        return results


__all__ = ["StackedSteps", "batch_signature", "same_shape_runs", "stack_batches", "step_outputs", "unstack"]
