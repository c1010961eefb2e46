"""PyTorch ``MetricEvaluator``: combines metric tensors of many batches with one vectorised operation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mlpug.evaluation import MetricEvaluator as _NeutralMetricEvaluator
from mlpug.evaluation import MetricInputs, loss_metric

__all__ = ["MetricEvaluator", "MetricInputs", "loss_metric"]


class MetricEvaluator(_NeutralMetricEvaluator):
    __doc__ = _NeutralMetricEvaluator.__doc__

    def _weighted_sums(self, values: Sequence[Any], weights: Sequence[Any], skip_non_finite: bool = False) -> tuple:
        """``(sum(value * weight), sum(weight))`` with one device synchronisation for all batches."""
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if not tensors:
            return super()._weighted_sums(values, weights, skip_non_finite)
        stacked = None
        if len(tensors) == len(values):
            try:
                stacked = torch.stack(list(values)).detach().double()  # one op for the usual case: 0-d tensors
            except RuntimeError:  # mixed shapes ([] and [1]) or devices
                pass
        if stacked is None:  # normalise each value; Python numbers come from a restored (resumed) window
            device = tensors[0].device
            stacked = torch.stack(
                [torch.as_tensor(v, dtype=torch.float64, device=device).detach().reshape(()) for v in values]
            )
        if all(isinstance(w, (int, float)) for w in weights):
            weight_tensor = torch.tensor(weights, dtype=torch.float64, device=stacked.device)
        else:
            weight_tensor = torch.stack(
                [torch.as_tensor(w, dtype=torch.float64, device=stacked.device).reshape(()) for w in weights]
            )
        if skip_non_finite:
            finite = torch.isfinite(stacked)
            stacked, weight_tensor = torch.where(finite, stacked, 0.0), weight_tensor * finite
        weighted_sum, weight_sum = torch.stack([(stacked * weight_tensor).sum(), weight_tensor.sum()]).tolist()
        return weighted_sum, weight_sum
