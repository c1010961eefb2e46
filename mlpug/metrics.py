"""Standard metric functions under the same names on every backend (``mlp.metrics``).

A metric function takes a :class:`mlpug.evaluation.MetricInputs` and returns a per-batch mean (weighted by
``num_samples``). The standard ones read the usual classification layout:

* the **logits** ``[B, C]`` (or probabilities) are ``inputs.auxiliary_results``, or its ``"logits"`` entry when the
  training model returns a dict of auxiliary results;
* the **labels** are the last item of a ``(features, labels)`` batch, or ``batch["labels"]`` / ``batch["label"]``
  of a dict batch: class indices ``[B]`` or ``[B, 1]``, or one-hot / probability rows ``[B, C]`` (their argmax is
  the class).

Each backend computes them with its own ops (``mlpug.pytorch.metrics``, ``mlpug.tensorflow.metrics``) and returns a
0-d tensor, so that no value leaves the device before a consumer reads it. This module holds the backend-neutral
part: where logits and labels are found, and the checks, including the first-batch check of any metric function
(:func:`metric_functions_check`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Optional

from mlpug.evaluation import MetricEvaluator, MetricInputs, loss_metric
from mlpug.trainers.hook_dispatcher import add_note
from mlpug.trainers.trainer import FirstBatchCheck, ModelOutputs

_LAYOUT = (
    "auxiliary_results = logits [B, C] (or a dict with 'logits') and batch = (features, labels) (or a dict with "
    "'labels')"
)


def logits_and_labels(inputs: MetricInputs, metric: str) -> tuple[Any, Any]:
    """The logits ``[B, C]`` and labels (``[B]`` or ``[B, C]``) of ``inputs`` (see the module docstring).

    Raises:
        TypeError: No logits or labels where the layout says; the message names the metric and what it found.
    """
    logits = inputs.auxiliary_results
    if isinstance(logits, Mapping):
        logits = logits.get("logits")
    if logits is None or len(getattr(logits, "shape", ())) != 2:
        raise TypeError(
            f"{metric} needs {_LAYOUT}; auxiliary_results is {type(inputs.auxiliary_results).__qualname__}"
            f"{_shape(logits)}"
        )
    batch = inputs.batch
    if isinstance(batch, Mapping):
        labels = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[-1]
    else:
        labels = None
    if labels is None or len(getattr(labels, "shape", ())) not in (1, 2):
        raise TypeError(f"{metric} needs {_LAYOUT}; the batch is a {type(batch).__qualname__} without such labels")
    if len(labels.shape) == 2 and labels.shape[1] == 1:  # class indices as a column [B, 1] (common with Keras)
        labels = labels[:, 0]
    elif len(labels.shape) == 2 and labels.shape[1] != logits.shape[1]:
        raise TypeError(
            f"{metric}: labels of shape {list(labels.shape)} are neither class indices ([B] or [B, 1]) nor one-hot "
            f"rows of the {logits.shape[1]} classes of the logits {list(logits.shape)}"
        )
    return logits, labels


def _shape(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f" of shape {list(shape)}" if shape is not None else ""


def check_k(k: Any) -> int:
    """``k`` of top-k accuracy.

    Raises:
        ValueError: ``k`` is not an int >= 1.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return k


def top_k_metric(k: int, fraction_in_top_k: Callable[[Any, Any, int], Any]) -> Callable[[MetricInputs], Any]:
    """The metric function ``top_<k>_accuracy`` of a backend: finds logits and labels, checks ``k`` against the
    number of classes, and returns ``fraction_in_top_k(logits, labels, k)`` (the backend's ops).

    Raises:
        ValueError: ``k`` is not an int >= 1 (at once); ``k`` exceeds the number of classes (when called).
    """
    check_k(k)

    def top_k(inputs: MetricInputs) -> Any:
        logits, labels = logits_and_labels(inputs, f"top_{k}_accuracy")
        if k > logits.shape[1]:
            raise ValueError(f"top_k_accuracy: k={k} exceeds the {logits.shape[1]} classes of the logits")
        return fraction_in_top_k(logits, labels, k)

    top_k.__name__ = f"top_{k}_accuracy"
    return top_k


METRIC_FUNCTION_FORM = (
    "one argument, an mlp.evaluation.MetricInputs (batch, loss, num_samples, auxiliary_results), returning the "
    "batch's mean value (or (mean value, weight))"
)


def check_metric_signature(metric_name: str, func: Callable) -> None:
    """Raise when ``func`` cannot be called with one positional argument, as every metric function is.

    Functions whose signature Python cannot read (some builtins) pass; they fail when called.

    Raises:
        TypeError: Names the metric, its signature and the form it needs, e.g. for ``f(y_true, y_pred)``.
    """
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None)
    except TypeError:
        function = getattr(func, "__qualname__", type(func).__qualname__)
        raise TypeError(
            f"metric function {metric_name!r} is {function}{signature}, but metric functions take "
            f"{METRIC_FUNCTION_FORM}; a function of (targets, outputs) on (inputs, targets) batches is wrapped as "
            f"{{{metric_name!r}: lambda inputs: {function}(inputs.batch[1], inputs.auxiliary_results)}}"
        ) from None


def metric_functions_check(evaluator: MetricEvaluator) -> Optional[FirstBatchCheck]:
    """The first-batch check (:meth:`~mlpug.trainers.trainer.BackendTrainer.add_first_batch_check`) of ``evaluator``'s
    metric functions, or None when it has only the loss: every function is called once on the first training batch's
    outputs, before its optimizer step, so that a metric that cannot run fails before anything trains (otherwise it
    would fail after the first step). ``TrainingMetricsLogger`` adds it at every training start.

    The check raises :func:`check_metric_signature`'s ``TypeError`` for a function of another signature, or what a
    metric function raised, with notes naming the metric and the check.
    """
    functions = {name: func for name, func in evaluator.batch_metric_funcs.items() if func is not loss_metric}
    if not functions:
        return None

    def check(batch: Any, outputs: ModelOutputs) -> None:
        for name, func in functions.items():
            check_metric_signature(name, func)
        try:
            evaluator.gather(batch, outputs)
        except Exception as error:
            add_note(
                error,
                "mlpug: in the first-batch check of the metric functions, called once on the outputs of the first "
                f"training batch before any optimizer step; metric functions take {METRIC_FUNCTION_FORM}",
            )
            raise

    return check
