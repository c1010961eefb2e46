"""The parts of the TensorFlow step that a ``tf.distribute`` strategy and gradient clipping add (a mixin of the
TensorFlow ``DefaultTrainer``, which holds the state they use: ``strategy``, ``chunking``, ``precision``,
``optimizers``, the clipping options, ``skip_non_finite_steps`` and ``replica_loss``).

Under a strategy the step is (see :mod:`mlpug.tensorflow.distributed`)::

    until decided: _settle_replica_loss(batch)                           # Keras' 1 / replicas of a loss object?
    shares = split_for_replicas(strategy, batch)
    per replica: rows, loss, ..., gradients = _replica_gradients(share)   # loss (Keras' scaling undone: times
                 replica_loss.factor) weighted by rows / global rows
                 (clipping: gradients all-reduced, clipped, passed on as 1 / replicas)
    skipped = strategy.run(_replica_apply, gradients)                     # Keras all-reduces the sum
              (skip_step: only when the global loss is finite, decided in the cross-replica context)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from mlpug.tensorflow.distributed import merge_local_results, num_local_replicas, split_for_replicas
from mlpug.tensorflow.trainers.replica_loss import ReplicaLossScaling, probe_batch


class ReplicatedStep:
    """Gradient clipping and the step under a strategy, for the TensorFlow ``DefaultTrainer``."""

    # provided by the DefaultTrainer
    strategy: Any
    chunking: Any
    precision: Any
    gradient_sync: Any
    optimizers: dict
    clip_gradients_norm: Any
    clip_gradients_value: Any
    skip_non_finite_steps: bool
    replica_loss: ReplicaLossScaling
    _replica_loss_pending: bool
    _distributed: Any  # the DistributedContext of the workers
    _chunk_step: Any  # (chunk, training_settings, share) -> ChunkResult
    _pairs_per_optimizer: Any  # (gradients) -> {optimizer name: [(gradient, variable), ...]}
    _forward: Any  # (batch, settings, inference_mode) -> ModelOutputs
    _make_train_steps: Any  # () -> None: the training steps made anew (traced again)

    def _settle_replica_loss(self, batch: Any, training_settings: Any) -> None:
        """Before a training step under a strategy, until decided (the first batch whose loss is neither 0 nor
        non-finite on some worker, at most ``MAX_PROBED_BATCHES`` batches): whether the training model's loss comes
        scaled by Keras for the replicas (:meth:`ReplicaLossScaling.settle`, on the first replica's share of
        ``batch``, on every worker; one collective with several workers); the training steps are made anew when
        the factor changes after one was traced.

        Raises:
            ValueError: The loss is neither the replica's mean nor Keras' scaling of it (see
                :mod:`mlpug.tensorflow.trainers.replica_loss`).
        """
        probe = probe_batch(batch, num_local_replicas(self.strategy), self.chunking.batch_chunk_size)

        def loss_of() -> Any:
            return self._forward(probe, training_settings, inference_mode=True).loss

        if self.replica_loss.settle(loss_of, self._distributed):
            self._make_train_steps()
        self._replica_loss_pending = not self.replica_loss.settled

    def clip_gradients(self, pairs: dict[str, list]) -> dict[str, list]:
        """Clip each optimizer's ``(gradient, variable)`` pairs (``clip_gradients_norm``: ``tf.clip_by_global_norm``
        over that optimizer's gradients; ``clip_gradients_value``: ``tf.clip_by_value``) before they are applied;
        part of the traced step, and a hook that subclasses may override. Gradients of a ``LossScaleOptimizer``
        are divided by its scale before clipping and multiplied by it afterwards (it unscales them itself), so the
        limits are in the units of the true gradients; inf/nan gradients stay non-finite, and the step is skipped.
        Without a clipping option the pairs as they are."""
        if self.clip_gradients_norm is None and self.clip_gradients_value is None:
            return pairs
        clipped = {}
        for name, optimizer_pairs in pairs.items():
            optimizer = self.optimizers[name]
            scale = (
                tf.cast(optimizer.dynamic_scale, tf.float32)
                if isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer)
                else None
            )
            indices = [i for i, (gradient, _) in enumerate(optimizer_pairs) if gradient is not None]
            gradients = [tf.convert_to_tensor(optimizer_pairs[i][0]) for i in indices]
            if scale is not None:
                gradients = [gradient / scale for gradient in gradients]
            if self.clip_gradients_norm is not None:
                gradients, _ = tf.clip_by_global_norm(gradients, self.clip_gradients_norm)
            else:  # clip_by_value would turn inf into +-v: non-finite gradients stay as they are (a skipped step)
                value = float(self.clip_gradients_value or 0.0)
                finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(gradient)) for gradient in gradients])
                gradients = [
                    tf.where(finite, tf.clip_by_value(gradient, -value, value), gradient) for gradient in gradients
                ]
            if scale is not None:
                gradients = [gradient * scale for gradient in gradients]
            new_pairs = list(optimizer_pairs)
            for i, gradient in zip(indices, gradients):
                new_pairs[i] = (gradient, optimizer_pairs[i][1])
            clipped[name] = new_pairs
        return clipped

    def _replicated_train_step(self, batch: Any, training_settings: Any) -> tuple:
        """The step under a strategy: every replica's weighted gradients (``strategy.run``), then, unless the
        global loss is not finite and such steps are skipped (a decision every replica takes alike), the optimizer
        step in every replica, whose ``apply_gradients`` all-reduces the gradient sums (Keras)."""
        strategy = self.strategy
        shares = split_for_replicas(strategy, batch)
        rows, loss, num_samples, auxiliary_results, gradients, weighted_loss = strategy.run(
            self._replica_gradients, args=(shares, training_settings)
        )

        def step() -> Any:
            skipped = strategy.experimental_local_results(strategy.run(self._replica_apply, args=(gradients,)))
            return tf.reduce_any(tf.stack(list(skipped)))

        if self.skip_non_finite_steps:  # the global batch's loss, the same decision on every replica
            global_loss = strategy.reduce(tf.distribute.ReduceOp.SUM, weighted_loss, axis=None)
            skipped = tf.cond(tf.math.is_finite(global_loss), step, lambda: tf.constant(True))
        else:
            skipped = step()
        loss, num_samples, auxiliary_results = merge_local_results(strategy, rows, loss, num_samples, auxiliary_results)
        reported = self.precision.uses_loss_scaling or self.skip_non_finite_steps
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
        if self.clip_gradients_norm is not None or self.clip_gradients_value is not None:
            gradients = self._clip_replica_gradients(gradients)
        outputs = result.outputs
        loss = tf.reshape(outputs.loss, [])
        weighted_loss = tf.math.multiply_no_nan(tf.cast(loss, tf.float32), share)  # an empty share: NaN mean, weight 0
        return rows, loss, outputs.num_samples, outputs.auxiliary_results, gradients, weighted_loss

    def _clip_replica_gradients(self, gradients: Sequence[Any]) -> list:
        """Clipping under a strategy: a replica holds only its part of the step's gradient (the Keras optimizer
        sums the parts in ``apply_gradients``), so the parts are all-reduced here first (one more all-reduce of
        the gradients per step), clipped as on one device (:meth:`clip_gradients`), and each replica passes
        ``1 / num_replicas`` of the clipped gradient on, whose sum is the clipped gradient (exact for a power of
        two replicas, else to float32 rounding)."""
        context = tf.distribute.get_replica_context()
        present = [index for index, gradient in enumerate(gradients) if gradient is not None]
        summed = context.all_reduce("sum", [tf.convert_to_tensor(gradients[i]) for i in present])
        full = list(gradients)
        for index, gradient in zip(present, summed):
            full[index] = gradient
        pairs = self.clip_gradients(self._pairs_per_optimizer(full))
        replicas = tf.cast(self.strategy.num_replicas_in_sync, tf.float32)
        return [
            None if gradient is None else gradient / replicas
            for optimizer in pairs.values()
            for gradient, _ in optimizer
        ]

    def _replica_apply(self, gradients: Sequence[Any]) -> Any:
        """One replica's optimizer steps; whether they were skipped (float16 loss scaling) as a boolean tensor."""
        skipped = self.precision.step(self.optimizers, self._pairs_per_optimizer(gradients))
        return tf.constant(False) if skipped is False else skipped
