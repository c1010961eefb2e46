"""The TensorFlow training step under a ``tf.distribute`` strategy, and the probe of Keras' replica scaling of the
loss that comes before it (:class:`ReplicatedStep`, held by the TensorFlow ``DefaultTrainer``).

Under a strategy the step is (see :mod:`mlpug.tensorflow.distributed`)::

    until decided: settle_replica_loss(batch)                            # Keras' 1 / replicas of a loss object?
    shares = split_for_replicas(strategy, batch)
    per replica: rows, loss, ..., gradients = _replica_gradients(share)   # loss (Keras' scaling undone: times
                 replica_loss.factor) weighted by rows / global rows
                 (clipping: gradients all-reduced, clipped, passed on as 1 / replicas)
    skipped = strategy.run(_replica_apply, gradients)                     # Keras all-reduces the sum
              (skip_step: only when the global loss is finite, decided in the cross-replica context)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from mlpug.chunking import BatchChunk, BatchChunking, ChunkResult
from mlpug.distributed import DistributedContext
from mlpug.tensorflow.distributed import merge_local_results, num_local_replicas, split_for_replicas
from mlpug.tensorflow.trainers.replica_loss import ReplicaLossScaling, probe_batch
from mlpug.trainers.gradient_sync import GradientSync
from mlpug.trainers.precision import PrecisionPolicy

ReplicaChunkStep = Callable[[BatchChunk, Any, Any], ChunkResult]
"""``chunk_step(chunk, training_settings, share)``: the forward and backward pass of one chunk in a replica, its loss
weighted by the replica's ``share`` of the global batch's rows (a float32 scalar tensor)."""

GradientPairs = Callable[[Sequence[Any]], dict[str, list]]
"""``gradient_pairs(gradients)``: the flat gradient list as ``(gradient, variable)`` pairs per optimizer name."""

ClipGradients = Callable[[dict[str, list]], dict[str, list]]
"""``clip_gradients(pairs)``: the ``(gradient, variable)`` pairs per optimizer name, the gradients clipped."""

ProbeLoss = Callable[[Any, Any], Any]
"""``probe_loss(batch, training_settings)``: the training model's scalar loss of ``batch`` in inference mode."""


class ReplicatedStep:
    """The training step of the TensorFlow ``DefaultTrainer`` under a strategy, and the replica loss probe.

    The step parts it composes are the trainer's (the same objects); what is particular to the trainer's own step
    comes as functions.

    Args:
        strategy: A ``tf.distribute.MirroredStrategy`` or ``MultiWorkerMirroredStrategy``.
        chunking: The trainer's chunking policy (gradient accumulation).
        precision: The trainer's precision policy (``step`` applies the gradients).
        gradient_sync: The trainer's gradient synchronisation of the chunks.
        optimizers: The optimizers by name (as the precision policy prepared them).
        replica_loss: Whether and by what the training model's loss is scaled for the replicas (settled by
            :meth:`settle_replica_loss`; its factor is a constant of the traced step).
        distributed: The workers of the strategy as ranks (the probe's verdicts are all-reduced over them).
        chunk_step: See :data:`ReplicaChunkStep`.
        gradient_pairs: See :data:`GradientPairs`.
        clip_gradients: See :data:`ClipGradients`; called only when ``clips`` is True.
        clips: Whether a clipping option is given (``clip_gradients_norm`` or ``clip_gradients_value``).
        probe_loss: See :data:`ProbeLoss`.
    """

    def __init__(
        self,
        strategy: tf.distribute.Strategy,
        chunking: BatchChunking,
        precision: PrecisionPolicy,
        gradient_sync: GradientSync,
        optimizers: Mapping[str, tf.keras.optimizers.Optimizer],
        replica_loss: ReplicaLossScaling,
        distributed: DistributedContext,
        chunk_step: ReplicaChunkStep,
        gradient_pairs: GradientPairs,
        clip_gradients: ClipGradients,
        clips: bool,
        probe_loss: ProbeLoss,
    ):
        self.strategy = strategy
        self.chunking = chunking
        self.precision = precision
        self.gradient_sync = gradient_sync
        self.optimizers = optimizers
        self.replica_loss = replica_loss
        self.distributed = distributed
        self._chunk_step = chunk_step
        self._gradient_pairs = gradient_pairs
        self._clip_gradients = clip_gradients
        self._clips = clips
        self._probe_loss = probe_loss

    def settle_replica_loss(self, batch: Any, training_settings: Any) -> bool:
        """Before a training step, until ``replica_loss.settled`` (the first batch whose loss is neither 0 nor
        non-finite on some worker, at most ``MAX_PROBED_BATCHES`` batches): whether the training model's loss comes
        scaled by Keras for the replicas (:meth:`ReplicaLossScaling.settle`, on the first replica's share of
        ``batch``, on every worker; one collective with several workers).

        Returns:
            Whether ``replica_loss.factor`` changed: the training steps traced before must be made anew.

        Raises:
            ValueError: The loss is neither the replica's mean nor Keras' scaling of it (see
                :mod:`mlpug.tensorflow.trainers.replica_loss`).
        """
        probe = probe_batch(batch, num_local_replicas(self.strategy), self.chunking.batch_chunk_size)
        return self.replica_loss.settle(lambda: self._probe_loss(probe, training_settings), self.distributed)

    def train_step(self, batch: Any, training_settings: Any, skip_non_finite_steps: bool) -> tuple:
        """The step under the strategy (traced with the trainer's step): every replica's weighted gradients
        (``strategy.run``), then, unless the global loss is not finite and ``skip_non_finite_steps`` (a decision
        every replica takes alike), the optimizer step in every replica, whose ``apply_gradients`` all-reduces the
        gradient sums (Keras).

        Returns:
            ``(loss, num_samples, auxiliary_results, skipped)`` of the global batch (the replicas' outputs merged);
            ``skipped`` is a boolean tensor under float16 loss scaling or ``skip_non_finite_steps``, else None.
        """
        strategy = self.strategy
        shares = split_for_replicas(strategy, batch)
        rows, loss, num_samples, auxiliary_results, gradients, weighted_loss = strategy.run(
            self._replica_gradients, args=(shares, training_settings)
        )

        def step() -> Any:
            skipped = strategy.experimental_local_results(strategy.run(self._replica_apply, args=(gradients,)))
            return tf.reduce_any(tf.stack(list(skipped)))

        if skip_non_finite_steps:  # the global batch's loss, the same decision on every replica
            global_loss = strategy.reduce(tf.distribute.ReduceOp.SUM, weighted_loss, axis=None)
            skipped = tf.cond(tf.math.is_finite(global_loss), step, lambda: tf.constant(True))
        else:
            skipped = step()
        loss, num_samples, auxiliary_results = merge_local_results(strategy, rows, loss, num_samples, auxiliary_results)
        reported = self.precision.uses_loss_scaling or skip_non_finite_steps
        return tf.reshape(loss, []), num_samples, auxiliary_results, skipped if reported else None

    def _replica_gradients(self, batch: Any, training_settings: Any) -> tuple:
        """One replica's forward and backward passes; its loss weighted by its share of the global batch's rows."""
        rows = tf.cast(tf.shape(tf.nest.flatten(batch)[0])[0], tf.float32)
        if self.chunking.batch_chunk_size is not None and num_local_replicas(self.strategy) > 1:
            tf.debugging.assert_positive(
                rows, message="with batch_chunk_size under a MirroredStrategy, every batch needs at least as many "
                "samples as replicas (use drop_last=True, or a batch size that leaves no tiny last batch)",
            )  # fmt: skip
        share = tf.math.divide_no_nan(rows, tf.distribute.get_replica_context().all_reduce("sum", rows))
        result = self.chunking.run(lambda chunk: self._chunk_step(chunk, training_settings, share), batch)
        gradients = self.gradient_sync.reduce(result.gradients)
        assert gradients is not None
        if self._clips:
            gradients = self._clip_replica_gradients(gradients)
        outputs = result.outputs
        loss = tf.reshape(outputs.loss, [])
        weighted_loss = tf.math.multiply_no_nan(tf.cast(loss, tf.float32), share)  # an empty share: NaN mean, weight 0
        return rows, loss, outputs.num_samples, outputs.auxiliary_results, gradients, weighted_loss

    def _clip_replica_gradients(self, gradients: Sequence[Any]) -> list:
        """Clipping under a strategy: a replica holds only its part of the step's gradient (the Keras optimizer
        sums the parts in ``apply_gradients``), so the parts are all-reduced here first (one more all-reduce of
        the gradients per step), clipped as on one device (``clip_gradients``), and each replica passes
        ``1 / num_replicas`` of the clipped gradient on, whose sum is the clipped gradient (exact for a power of
        two replicas, else to float32 rounding)."""
        context = tf.distribute.get_replica_context()
        present = [index for index, gradient in enumerate(gradients) if gradient is not None]
        summed = context.all_reduce("sum", [tf.convert_to_tensor(gradients[i]) for i in present])
        full = list(gradients)
        for index, gradient in zip(present, summed):
            full[index] = gradient
        pairs = self._clip_gradients(self._gradient_pairs(full))
        replicas = tf.cast(self.strategy.num_replicas_in_sync, tf.float32)
        return [
            None if gradient is None else gradient / replicas
            for optimizer in pairs.values()
            for gradient, _ in optimizer
        ]

    def _replica_apply(self, gradients: Sequence[Any]) -> Any:
        """One replica's optimizer steps; whether they were skipped (float16 loss scaling) as a boolean tensor."""
        skipped = self.precision.step(self.optimizers, self._gradient_pairs(gradients))
        return tf.constant(False) if skipped is False else skipped
