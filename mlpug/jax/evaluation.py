"""JAX ``MetricEvaluator``: combines the metric values of many batches with one host transfer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mlpug.evaluation import MetricEvaluator as _NeutralMetricEvaluator
from mlpug.evaluation import MetricInputs, loss_metric

__all__ = ["MetricEvaluator", "MetricInputs", "loss_metric"]


class MetricEvaluator(_NeutralMetricEvaluator):
    __doc__ = _NeutralMetricEvaluator.__doc__

    def _weighted_sums(self, values: Sequence[Any], weights: Sequence[Any], skip_non_finite: bool = False) -> tuple:
        """``(sum(value * weight), sum(weight))`` in float64, with one host transfer for all batches.

        Values are scalar arrays (any float dtype, e.g. bfloat16 under mixed precision) or numbers; weights are ints
        or scalar arrays.
        """
        if not any(isinstance(value, jax.Array) for value in values):
            return super()._weighted_sums(values, weights, skip_non_finite)
        host_values, host_weights = jax.device_get((list(values), list(weights)))
        stacked = np.array([np.asarray(value, dtype=np.float64).reshape(()) for value in host_values])
        weight_array = np.array([np.asarray(weight, dtype=np.float64).reshape(()) for weight in host_weights])
        if skip_non_finite:
            finite = np.isfinite(stacked)
            stacked, weight_array = np.where(finite, stacked, 0.0), weight_array * finite
        return float((stacked * weight_array).sum()), float(weight_array.sum())
