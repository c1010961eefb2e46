"""Standard metric functions with ``jax.numpy`` ops (``mlp.metrics``); layout and checks in :mod:`mlpug.metrics`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mlpug.evaluation import MetricInputs
from mlpug.metrics import logits_and_labels, top_k_metric

__all__ = ["accuracy", "top_k_accuracy"]


def _class_indices(labels: Any) -> jax.Array:
    labels = jnp.asarray(labels)
    return jnp.argmax(labels, axis=1) if labels.ndim == 2 else labels.astype(jnp.int32)


def accuracy(inputs: MetricInputs) -> jax.Array:
    """Fraction of samples whose highest logit is the label's class: a 0-d float32 array.

    Raises:
        TypeError: ``inputs`` do not hold logits ``[B, C]`` and labels (see :mod:`mlpug.metrics`).
    """
    logits, labels = logits_and_labels(inputs, "accuracy")
    predictions = jnp.argmax(jnp.asarray(logits), axis=1)
    return jnp.mean((predictions == _class_indices(labels)).astype(jnp.float32))


def _fraction_in_top_k(logits: Any, labels: Any, k: int) -> jax.Array:
    _, top = jax.lax.top_k(jnp.asarray(logits), k)
    hits = jnp.any(top == _class_indices(labels)[:, None], axis=1)
    return jnp.mean(hits.astype(jnp.float32))


def top_k_accuracy(k: int) -> Callable[[MetricInputs], Any]:
    """A metric function: the fraction of samples whose label is among the ``k`` highest logits (exactly ``k``
    classes: ``jax.lax.top_k``).

    Raises:
        ValueError: ``k`` is not an int >= 1 (at once); ``k`` exceeds the number of classes (when called).
    """
    return top_k_metric(k, _fraction_in_top_k)
