"""JAX ``MetricEvaluator``: combines the metric values of many batches with one host transfer, each batch's value
transferred once (:class:`~mlpug.jax.host_numbers.HostNumbers`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mlpug.evaluation import MetricEvaluator as _NeutralMetricEvaluator
from mlpug.evaluation import MetricInputs, loss_metric
from mlpug.jax.host_numbers import HostNumbers

__all__ = ["MetricEvaluator", "MetricInputs", "loss_metric"]


class MetricEvaluator(_NeutralMetricEvaluator):
    __doc__ = _NeutralMetricEvaluator.__doc__

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._host_numbers = HostNumbers()

    def _weighted_sums(self, values: Sequence[Any], weights: Sequence[Any], skip_non_finite: bool = False) -> tuple:
        """``(sum(value * weight), sum(weight))`` in float64, with one host transfer for the arrays not read before
        (a sliding window read every few batches transfers only its new batches' values).

        Values are scalar arrays (any float dtype, e.g. bfloat16 under mixed precision) or numbers; weights are ints
        or scalar arrays.
        """
        if not any(isinstance(value, jax.Array) for value in values):
            return super()._weighted_sums(values, weights, skip_non_finite)
        stacked = self._host_numbers.read(list(values) + list(weights))
        stacked, weight_array = stacked[: len(values)], stacked[len(values) :]
        if skip_non_finite:
            finite = np.isfinite(stacked)
            stacked, weight_array = np.where(finite, stacked, 0.0), weight_array * finite
        return float((stacked * weight_array).sum()), float(weight_array.sum())
