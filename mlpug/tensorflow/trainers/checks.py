"""Argument checks of the TensorFlow ``DefaultTrainer``: optimizers, the training model's ``call`` and state
arrays (each a clear ``TypeError`` / ``ValueError`` naming the bad value)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import tensorflow as tf


def type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def check_optimizers(optimizers: Any) -> None:
    items = optimizers.values() if isinstance(optimizers, Mapping) else optimizers
    items = items if isinstance(items, (list, tuple)) or isinstance(optimizers, Mapping) else [optimizers]
    for optimizer in items:
        if not isinstance(optimizer, tf.keras.optimizers.Optimizer):
            raise TypeError(
                "optimizers must be Keras 3 optimizers (tf.keras.optimizers.Optimizer, e.g. "
                "tf.keras.optimizers.Adam()), a list or a dict of them; "
                f"got a {type_name(optimizer)}: {optimizer!r:.200}"
            )


def is_built(layer: Any) -> bool:
    return bool(getattr(layer, "built", True))


def call_argument_names(training_model: Any) -> tuple[str, Optional[str]]:
    """The names of the ``evaluate_settings`` and (when it has one) ``inference_mode`` parameters of
    ``training_model.call(batch_data, evaluate_settings, inference_mode=None)``.

    Raises:
        TypeError: ``call`` has positional-only or ``*args`` parameters, or fewer than two named ones.
    """
    name = type(training_model).__qualname__
    parameters = [
        p
        for p in inspect.signature(training_model.call).parameters.values()
        if p.name != "training" and p.kind not in (p.VAR_KEYWORD,)
    ]
    expected = "call(self, batch_data, evaluate_settings, inference_mode=None)"
    if any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in parameters):
        raise TypeError(
            f"{name}.call must name its parameters, as in {expected} (Keras 3 accepts only tensors as positional "
            f"arguments, so mlpug passes evaluate_settings and inference_mode by name); it has "
            f"({', '.join(str(p) for p in parameters)})"
        )
    positional = [p for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
    if len(positional) < 2:
        raise TypeError(
            f"{name}.call must accept (batch_data, evaluate_settings, inference_mode=None), as in {expected}; "
            f"it accepts ({', '.join(p.name for p in positional)})"
        )
    return positional[1].name, positional[2].name if len(positional) >= 3 else None


def check_arrays(what: str, variables: Sequence[Any], values: Sequence[Any]) -> None:
    if len(values) != len(variables):
        raise ValueError(f"state of {what} has {len(values)} arrays, but it has {len(variables)} variables")
    for index, (variable, value) in enumerate(zip(variables, values)):
        if tuple(np.shape(value)) != tuple(variable.shape):
            raise ValueError(
                f"state of {what}: array {index} has shape {tuple(np.shape(value))}, but variable "
                f"{getattr(variable, 'path', index)!r} has shape {tuple(variable.shape)}"
            )
