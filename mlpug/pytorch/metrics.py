"""Standard metric functions with PyTorch ops (``mlp.metrics``); layout and checks in :mod:`mlpug.metrics`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mlpug.evaluation import MetricInputs
from mlpug.metrics import logits_and_labels, top_k_metric

__all__ = ["accuracy", "top_k_accuracy"]


def _class_indices(labels: torch.Tensor) -> torch.Tensor:
    return labels.argmax(dim=1) if labels.dim() == 2 else labels


def accuracy(inputs: MetricInputs) -> torch.Tensor:
    """Fraction of samples whose highest logit is the label's class: a 0-d float32 tensor on the logits' device.

    Raises:
        TypeError: ``inputs`` do not hold logits ``[B, C]`` and labels (see :mod:`mlpug.metrics`).
    """
    logits, labels = logits_and_labels(inputs, "accuracy")
    return (logits.argmax(dim=1) == _class_indices(labels).to(logits.device)).float().mean()


def _fraction_in_top_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    top = logits.topk(k, dim=1).indices
    return (top == _class_indices(labels).to(logits.device).unsqueeze(1)).any(dim=1).float().mean()


def top_k_accuracy(k: int) -> Callable[[MetricInputs], Any]:
    """A metric function: the fraction of samples whose label is among the ``k`` highest logits (exactly ``k``
    classes: ``torch.topk``).

    Raises:
        ValueError: ``k`` is not an int >= 1 (at once); ``k`` exceeds the number of classes (when called).
    """
    return top_k_metric(k, _fraction_in_top_k)
