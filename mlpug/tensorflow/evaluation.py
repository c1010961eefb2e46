"""TensorFlow ``MetricEvaluator``: combines metric tensors of many batches with one vectorised operation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from mlpug.evaluation import MetricEvaluator as _NeutralMetricEvaluator
from mlpug.evaluation import MetricInputs, loss_metric

__all__ = ["MetricEvaluator", "MetricInputs", "loss_metric"]


def _as_float64_scalar(value: Any) -> tf.Tensor:
    return tf.reshape(tf.cast(value, tf.float64), [])


def _stack_as_float64(values: Sequence[Any]) -> tf.Tensor:
    """``values`` (scalars) as one float64 vector: one stack and one cast in the usual case (same dtype and
    shape), else value by value (mixed dtypes, or shapes ``[]`` and ``[1]``)."""
    try:
        return tf.cast(tf.stack(values), tf.float64)
    except (tf.errors.InvalidArgumentError, TypeError, ValueError):
        return tf.stack([_as_float64_scalar(v) for v in values])


class MetricEvaluator(_NeutralMetricEvaluator):
    __doc__ = _NeutralMetricEvaluator.__doc__

    def _combine_chunks(self, gathered_chunks: Sequence[dict]) -> dict:
        """One batch's ``(mean_value, weight)`` per metric from its chunks', as float64 tensors (no device sync).

        Chunk values and weights may mix dtypes (float32 / bfloat16 values, int32 tensor or int weights), so
        both are cast to float64 first; a total weight of zero gives the first chunk's value.
        """
        if len(gathered_chunks) == 1:
            return gathered_chunks[0]
        combined = {}
        for metric_name in gathered_chunks[0]:
            values = tf.stack([_as_float64_scalar(gathered[metric_name][0]) for gathered in gathered_chunks])
            weights = tf.stack([_as_float64_scalar(gathered[metric_name][1]) for gathered in gathered_chunks])
            weight_sum = tf.reduce_sum(weights)
            mean = tf.math.divide_no_nan(tf.reduce_sum(values * weights), weight_sum)
            combined[metric_name] = (tf.where(weight_sum > 0, mean, values[0]), weight_sum)
        return combined

    def _weighted_sums(self, values: Sequence[Any], weights: Sequence[Any], skip_non_finite: bool = False) -> tuple:
        """``(sum(value * weight), sum(weight))`` with one conversion to numpy for all batches.

        Values are scalar tensors (any float dtype, e.g. bfloat16 under mixed precision) or numbers;
        weights are ints or int/float scalar tensors. The sums are computed in float64.
        """
        if not any(tf.is_tensor(v) for v in values):
            return super()._weighted_sums(values, weights, skip_non_finite)
        stacked = _stack_as_float64(values)
        if all(isinstance(w, (int, float)) for w in weights):
            weight_tensor = tf.constant(weights, dtype=tf.float64)
        else:
            weight_tensor = _stack_as_float64(weights)
        if skip_non_finite:
            finite = tf.math.is_finite(stacked)
            stacked = tf.where(finite, stacked, tf.zeros_like(stacked))
            weight_tensor = weight_tensor * tf.cast(finite, weight_tensor.dtype)
        sums = tf.stack([tf.reduce_sum(stacked * weight_tensor), tf.reduce_sum(weight_tensor)]).numpy()
        return float(sums[0]), float(sums[1])
