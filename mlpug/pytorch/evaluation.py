"""PyTorch ``MetricEvaluator``: combines metric tensors of many batches with one vectorised operation."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mlpug.evaluation import MetricEvaluator as _NeutralMetricEvaluator
from mlpug.evaluation import MetricInputs, loss_metric

__all__ = ["MetricEvaluator", "MetricInputs", "loss_metric"]


class MetricEvaluator(_NeutralMetricEvaluator):
    __doc__ = _NeutralMetricEvaluator.__doc__

    def _weighted_sums(self, values: Sequence[Any], weights: Sequence[Any]) -> tuple:
        """``(sum(value * weight), sum(weight))`` with one device synchronisation for all batches."""
        if not all(isinstance(v, torch.Tensor) for v in values):
            return super()._weighted_sums(values, weights)
        try:
            stacked = torch.stack(values).detach().double()  # one op for the usual case: 0-d tensors
        except RuntimeError:  # mixed shapes ([] and [1]) or devices: normalise each value
            stacked = torch.stack([v.detach().reshape(()).double().to(values[0].device) for v in values])
        if all(isinstance(w, (int, float)) for w in weights):
            weight_tensor = torch.tensor(weights, dtype=torch.float64, device=stacked.device)
        else:
            weight_tensor = torch.stack(
                [torch.as_tensor(w, dtype=torch.float64, device=stacked.device).reshape(()) for w in weights]
            )
        weighted_sum, weight_sum = torch.stack([(stacked * weight_tensor).sum(), weight_tensor.sum()]).tolist()
        return weighted_sum, weight_sum
