"""Keras 3's replica scaling of a loss under a ``tf.distribute`` strategy: found and undone for the TensorFlow
``DefaultTrainer``, so that the loss its replicated step differentiates and logs is the replica's mean loss.

In a replica context (and in a strategy's scope) Keras 3 multiplies the mean that a ``keras.losses.Loss`` object
returns (reductions ``"sum_over_batch_size"``, ``"mean"``, ``"mean_with_sample_weight"``) by ``1 /
num_replicas_in_sync`` (``keras.src.losses.loss.scale_loss_for_distribution``): the convention of Keras' own
``fit``, whose optimizer sums the replicas' gradients; ``tf.nn.compute_average_loss`` divides by the replicas too.
mlpug's replicated step weighs every replica's *mean* loss by its share of the global batch's rows itself
(:mod:`mlpug.tensorflow.trainers.replicated`), so such a loss, left alone, would make the step and the logged loss
``1 / replicas`` of one device's.

Whether Keras scales depends on more than the loss object: it leaves a mean alone when the per-sample values are
0-d (``reduce_values`` returns them as they are; e.g. ``MeanSquaredError`` of outputs and targets ``[B]``, whose mean
over the last axis is already the batch's). What a training model's ``call`` computes is seen only when it runs, so
the trainer probes it before its first training step (:meth:`ReplicaLossScaling.settle`): the loss of the first
replica's share of the first batch (its first chunk with ``batch_chunk_size``), in inference mode, once in a replica
context (``strategy.run``, eager: one forward pass per local replica) and once outside any strategy (in a fresh
thread when the caller is inside a strategy's scope: the scope is per thread). These are forward passes like any
other: a model whose ``call`` changes state in inference mode (a stateful RNN, metric or other variables updated in
``call``, random ops) sees them. Then:

* the same value: the loss is the replica's mean as it is (factor 1; hand-written means, ``keras.ops.mean``, a
  Keras loss object of 0-d per-sample values; the one-call API's loss is the ``loss_func`` it was given, probed so);
* the ratio Keras applies (``1 / replicas`` cast to the loss's dtype): the step multiplies every replica's loss by
  the inverse (:meth:`ReplicaLossScaling.unscaled`) before it is weighted, differentiated and logged;
* another ratio (a Keras loss object plus a hand-written mean, a value that depends on the replicas): a
  ``ValueError`` that says what to return.

With several workers the verdicts are all-reduced (one collective), so every worker takes the same decision. A
loss that is 0 or not finite on every worker's probe decides nothing: that batch is trained with factor 1 (right
when the loss is a mean; a skipped or failed step when it is not finite), the next batch is probed, and when it
decides another factor the compiled steps are traced anew. After :data:`MAX_PROBED_BATCHES` batches that decided
nothing the probing stops with a warning, at factor 1 (each probe costs eager forward passes, a device read and,
with several workers, a collective).

Keras scales a loss object in a strategy's scope too (the cross-replica context), so an evaluation step traced
inside ``with strategy.scope():`` multiplies its loss by the same factor (:meth:`ReplicaLossScaling.unscaled_in_scope`);
evaluation outside the scope (the usual case, and asynchronous evaluation on its own thread) is left as it is.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional

import numpy as np
import tensorflow as tf

from mlpug.distributed import DistributedContext

_log = logging.getLogger("mlpug.tensorflow.DefaultTrainer")

Verdict = Literal["scaled", "unscaled", "other", "unknown"]
_COUNTED: tuple[Verdict, ...] = ("scaled", "unscaled", "other")

#: Training batches probed at most while the loss is 0 or not finite on every worker's probe; then factor 1 is kept.
MAX_PROBED_BATCHES = 10


def keras_replica_scale(replicas: int, dtype: Any) -> float:
    """The factor by which Keras 3 multiplies a mean loss of ``dtype`` for ``replicas`` replicas in sync (what
    ``tf.distribute.get_strategy().num_replicas_in_sync`` says where the loss is computed): ``1 / replicas``
    rounded to ``dtype``; 1.0 for one replica."""
    if replicas == 1:
        return 1.0
    return float(np.asarray(1.0 / replicas).astype(tf.as_dtype(dtype).as_numpy_dtype))


def loss_verdict(in_replica: float, outside: float, scale: float, dtype: Any) -> Verdict:
    """How the loss computed in a replica context (``in_replica``) relates to the same loss computed outside any
    strategy (``outside``): ``"unscaled"`` (equal), ``"scaled"`` (``in_replica = outside * scale``), ``"other"``,
    or ``"unknown"`` (``outside`` is 0 or either is not finite). Equal within ``max(1e-4, 4 eps)`` relative, eps of
    ``dtype`` (the two forward passes may round differently)."""
    if not (math.isfinite(in_replica) and math.isfinite(outside)) or outside == 0.0:
        return "unknown"
    tolerance = max(1e-4, 4 * float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).eps))
    ratio = in_replica / outside
    if abs(ratio - 1.0) <= tolerance:
        return "unscaled"
    if abs(ratio - scale) <= tolerance * scale:
        return "scaled"
    return "other"


@contextmanager
def _quiet_eager_strategy_warning() -> Iterator[None]:
    """Drop TensorFlow's "Using MirroredStrategy eagerly has significant overhead" for the one eager probe."""
    logger = logging.getLogger("tensorflow")

    def keep(record: logging.LogRecord) -> bool:
        return "eagerly has significant overhead" not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _outside_any_strategy(function: Callable[[], Any]) -> Any:
    """``function()`` where ``tf.distribute.get_strategy()`` is the default strategy: here, or, when the caller
    is inside a strategy's scope (a per-thread state), in a fresh thread."""
    if not tf.distribute.has_strategy():
        return function()
    results: list = []

    def run() -> None:
        try:
            results.append((True, function()))
        except BaseException as error:  # re-raised in the caller's thread
            results.append((False, error))

    thread = threading.Thread(target=run, name="mlpug-loss-probe")
    thread.start()
    thread.join()
    succeeded, value = results[0]
    if not succeeded:
        raise value
    return value


class ReplicaLossScaling:
    """Whether the training model's loss comes scaled by Keras for the replicas, and the factor that undoes it.

    Args:
        strategy: The trainer's ``tf.distribute`` strategy, or None (one device: nothing to undo).

    Attributes:
        factor: What the replicated step multiplies the training model's loss by (a Python float, a constant of
            the trace): 1.0, or the inverse of Keras' scale.
        settled: Whether ``factor`` is decided: at construction without a strategy or with one replica in sync,
            else by :meth:`settle` (at the latest after :data:`MAX_PROBED_BATCHES` probes).
        probed_batches: How many times :meth:`settle` probed.
    """

    def __init__(self, strategy: Any):
        self.strategy = strategy
        self.factor = 1.0
        self.settled = strategy is None or strategy.num_replicas_in_sync == 1
        self.probed_batches = 0
        self._warned_unsettled = False

    def unscaled(self, loss: Any) -> Any:
        """A replica's ``loss`` (scalar tensor) times :attr:`factor`, inside the step; float16 and bfloat16 losses
        are cast to float32 first. With factor 1 the loss itself (no op)."""
        if self.factor == 1.0:
            return loss
        if loss.dtype in (tf.float16, tf.bfloat16):
            loss = tf.cast(loss, tf.float32)
        return loss * tf.cast(self.factor, loss.dtype)

    def unscaled_in_scope(self, loss: Any) -> Any:
        """A loss computed in a strategy's scope outside a replica context (evaluation called inside ``with
        strategy.scope():``), where Keras scales a loss object as in a replica context: :meth:`unscaled` once
        :attr:`settled`; before that (no training step yet) the loss as it is, with a warning (once). Called while
        tracing (an evaluation step traced there keeps the factor of that moment)."""
        if self.settled:
            return self.unscaled(loss)
        if not self._warned_unsettled:
            self._warned_unsettled = True
            _log.warning(
                "Evaluating inside `with strategy.scope():` before the first training step: where Keras 3 scales a "
                "Keras loss object by 1 / replicas (as it does in a strategy's scope) the evaluation loss is 1 / "
                "replicas of the mean, and mlpug cannot tell yet. Evaluate outside the strategy's scope (create only "
                "the model and the optimizer in it)."
            )
        return loss

    def settle(self, loss_of: Callable[[], Any], distributed: DistributedContext) -> bool:
        """Probe the loss (see the module docstring) and decide :attr:`factor` unless the probe cannot tell; the
        :data:`MAX_PROBED_BATCHES` th probe that cannot tell settles at factor 1 with a warning.

        Every worker must call it at the same batch (its verdict is all-reduced over the workers: one collective).

        Args:
            loss_of: ``() -> the training model's scalar loss`` on the probe batch in inference mode (eager); it is
                called once in a replica context and once outside any strategy.
            distributed: The trainer's distributed context (the workers of a ``MultiWorkerMirroredStrategy``).

        Returns:
            Whether :attr:`factor` changed (steps traced before must be traced anew).

        Raises:
            ValueError: On every worker, when some worker's loss is neither its replica mean nor Keras' scaling of
                it, or the workers disagree; the message gives this worker's values and what to return.
        """
        strategy = self.strategy
        replicas = strategy.num_replicas_in_sync
        self.probed_batches += 1
        with _quiet_eager_strategy_warning():
            replica_losses = strategy.experimental_local_results(strategy.run(loss_of))
        in_replica = tf.reshape(replica_losses[0], [])
        outside = tf.reshape(_outside_any_strategy(loss_of), [])
        dtype = in_replica.dtype
        scale = keras_replica_scale(replicas, dtype)  # what Keras applies in the replica context
        values = float(tf.cast(in_replica, tf.float64)), float(tf.cast(outside, tf.float64))
        verdict = loss_verdict(*values, scale, dtype)
        counts = dict(zip(_COUNTED, distributed.all_reduce_sum([float(verdict == kind) for kind in _COUNTED])))
        if counts["other"] or (counts["scaled"] and counts["unscaled"]):
            raise ValueError(self._mixed_message(values, verdict, counts, replicas))
        if not (counts["scaled"] or counts["unscaled"]):
            if self.probed_batches < MAX_PROBED_BATCHES:
                _log.debug(
                    f"Replica loss probe: the loss is {values[1]} on probed batch {self.probed_batches} of every "
                    "worker, which does not tell whether Keras scales it for the replicas; probing the next batch"
                )
                return False
            self.settled = True
            _log.warning(
                f"The training model's loss was 0 or not finite on the first replica's share of {self.probed_batches} "
                f"probed training batches (on every worker; last: {values[1]}), so mlpug cannot tell "
                f"whether Keras 3 scales it by 1/{replicas} for the replicas; it stops probing and assumes it does "
                f"not. If the loss is a keras.losses.Loss object with a mean reduction whose per-sample values are "
                f"not 0-d, the steps and the logged loss are 1/{replicas} of one device's: return a mean without "
                "replica scaling (e.g. reduction=None and tf.reduce_mean of what the loss object returns). A "
                "hand-written mean is right as it is."
            )
            return False
        previous, self.settled = self.factor, True
        self.factor = 1.0 / scale if counts["scaled"] else 1.0
        if counts["scaled"]:
            _log.debug(
                f"The training model's loss is scaled by {scale} in a replica context (Keras' scaling of a loss "
                f"object for {replicas} replicas); the replicated step multiplies it by {self.factor}"
            )
        return self.factor != previous

    def _mixed_message(self, values: tuple[float, float], verdict: Verdict, counts: dict, replicas: int) -> str:
        in_replica, outside = values
        this_worker = {
            "scaled": f"scaled by 1/{replicas}",
            "unscaled": "the same",
            "other": "in another ratio",
            "unknown": "0 or not finite",
        }[verdict]
        strategy = self.strategy
        name = (
            "MultiWorkerMirroredStrategy"
            if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            else type(strategy).__qualname__
        )
        return (
            f"Under the {name} ({replicas} replicas in sync) the training model's loss on the first replica's share "
            f"of probed training batch {self.probed_batches} is {in_replica!r} in a replica context and {outside!r} "
            f"outside any strategy (this worker: {this_worker}; over the workers: {int(counts['unscaled'])} the "
            f"same, {int(counts['scaled'])} scaled by 1/{replicas}, {int(counts['other'])} in another ratio). Keras "
            f"3 scales the mean of a keras.losses.Loss object (and tf.nn.compute_average_loss) by 1/{replicas} in a "
            "replica context (unless its per-sample values are 0-d); mlpug undoes that when the whole loss is scaled "
            "so, since it weighs every replica's mean loss by the replica's share of the global batch itself, but a "
            "loss that mixes scaled and unscaled terms (e.g. a Keras loss object plus a tf.reduce_mean term) cannot "
            "be undone. Return the mean over the batch's samples without replica scaling: e.g. create the Keras loss "
            "object with reduction=None and take tf.reduce_mean of what it returns, and write every other term with "
            "tf.reduce_mean / keras.ops.mean."
        )


def probe_batch(batch: Any, local_replicas: int, batch_chunk_size: Optional[int]) -> Any:
    """The part of ``batch`` the first replica's first chunk gets: the rows ``[0, n // local_replicas)``, at most
    ``batch_chunk_size`` of them; ``batch`` itself with one local replica and no chunking (it may then hold
    values without a sample dimension)."""
    if local_replicas == 1 and batch_chunk_size is None:
        return batch
    batch = tf.nest.map_structure(tf.convert_to_tensor, batch)
    rows = int(tf.shape(tf.nest.flatten(batch)[0])[0])
    stop = max(rows // local_replicas, 1)
    if batch_chunk_size is not None:
        stop = min(stop, batch_chunk_size)
    return tf.nest.map_structure(lambda tensor: tensor[:stop], batch)
