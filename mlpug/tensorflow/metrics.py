"""Standard metric functions with TensorFlow ops (``mlp.metrics``); layout and checks in :mod:`mlpug.metrics`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from mlpug.evaluation import MetricInputs
from mlpug.metrics import logits_and_labels, top_k_metric

__all__ = ["accuracy", "top_k_accuracy"]


def _class_indices(labels: Any) -> tf.Tensor:
    labels = tf.convert_to_tensor(labels)
    return tf.argmax(labels, axis=1) if labels.shape.rank == 2 else tf.cast(labels, tf.int64)


def accuracy(inputs: MetricInputs) -> tf.Tensor:
    """Fraction of samples whose highest logit is the label's class: a 0-d float32 tensor.

    Raises:
        TypeError: ``inputs`` do not hold logits ``[B, C]`` and labels (see :mod:`mlpug.metrics`).
    """
    logits, labels = logits_and_labels(inputs, "accuracy")
    predictions = tf.argmax(logits, axis=1)
    return tf.reduce_mean(tf.cast(tf.equal(predictions, _class_indices(labels)), tf.float32))


def _fraction_in_top_k(logits: Any, labels: Any, k: int) -> tf.Tensor:
    hits = tf.math.in_top_k(tf.cast(_class_indices(labels), tf.int32), tf.cast(logits, tf.float32), k)
    return tf.reduce_mean(tf.cast(hits, tf.float32))


def top_k_accuracy(k: int) -> Callable[[MetricInputs], Any]:
    """A metric function: the fraction of samples whose label is among the ``k`` highest logits
    (``tf.math.in_top_k``: classes tied at the k-th place all count).

    Raises:
        ValueError: ``k`` is not an int >= 1 (at once); ``k`` exceeds the number of classes (when called).
    """
    return top_k_metric(k, _fraction_in_top_k)
