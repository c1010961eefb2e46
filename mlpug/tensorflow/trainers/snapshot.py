"""TensorFlow :class:`~mlpug.trainers.snapshot.EvaluationSnapshot`: the values of the training model's variables,
evaluated with Keras' ``stateless_call``.

``capture`` reads every variable (``tf.identity``): TensorFlow copies a variable's buffer before updating it
while a tensor read from it is alive, so the read values stay those of the capture, and nothing is copied until
the optimizer next updates a variable. ``evaluate_loss`` runs the trainer's forward pass in a
``tf.keras.StatelessScope`` that maps the variables to those values (what Keras' ``stateless_call`` does); the
scope is thread-local, so the worker thread sees the snapshot and the training thread the live variables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from mlpug.tensorflow.trainers.compilation import frozen_contents
from mlpug.trainers.snapshot import EvaluationSnapshot
from mlpug.trainers.trainer import ModelOutputs

EvaluateFunction = Callable[[Any, Any, bool], tuple]
"""``evaluate(batch, evaluate_settings, inference_mode)``: the trainer's evaluation step function, ``(loss,
num_samples, auxiliary_results)`` of the training model's forward pass (traceable with ``tf.function``)."""


class KerasEvaluationSnapshot(EvaluationSnapshot):
    """A frozen copy of the weights of a TensorFlow ``DefaultTrainer``'s model (built Keras layers).

    The snapshot holds the values of every variable of the model components and of the training model (each
    once). ``evaluate_loss`` runs the trainer's own evaluation step function inside ``tf.keras.StatelessScope``
    mapping those variables to the values, compiled with ``tf.function`` (``reduce_retracing``; one function per
    value of the evaluate settings) unless in eager mode. The trainer creates it
    (``DefaultTrainer.evaluation_snapshot()``) once its models are built.

    Args:
        model_components: The trainer's model components by name (built Keras layers).
        training_model: The trainer's training model (built), or None.
        evaluate: The trainer's evaluation step function (see :data:`EvaluateFunction`).
        eager_mode: Run ``evaluate`` eagerly (the trainer's ``eager_mode``) instead of compiled.
    """

    def __init__(
        self,
        model_components: Mapping[str, tf.keras.layers.Layer],
        training_model: Optional[tf.keras.layers.Layer],
        evaluate: EvaluateFunction,
        eager_mode: bool,
    ):
        self._evaluate_function = evaluate
        self._eager_mode = eager_mode
        variables: list = []
        index: dict = {}
        layers = [*model_components.values(), *([] if training_model is None else [training_model])]
        for layer in layers:
            for variable in layer.variables:
                if id(variable) not in index:
                    index[id(variable)] = len(variables)
                    variables.append(variable)
        self._variables = variables
        self._component_indices = {
            name: [index[id(v)] for v in component.weights] for name, component in model_components.items()
        }
        self._values: list = []
        self._functions: dict = {}

    def capture(self) -> None:
        self._values = [tf.identity(variable) for variable in self._variables]

    def _evaluate(self, values: list, batch: Any, settings: Any, inference_mode: bool) -> tuple:
        with tf.keras.StatelessScope(state_mapping=list(zip(self._variables, values))):
            return self._evaluate_function(batch, settings, inference_mode)

    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """``BackendTrainer.evaluate_loss`` of the snapshot's values: the trainer's forward pass, the same settings."""
        if self._eager_mode:
            return ModelOutputs(*self._evaluate(self._values, batch, evaluate_settings, bool(inference_mode)))
        key = (frozen_contents(evaluate_settings), bool(inference_mode))
        entry = self._functions.get(key)
        if entry is None:

            def evaluate(values: list, batch: Any, _settings: Any = evaluate_settings, _mode: bool = key[1]) -> tuple:
                return self._evaluate(values, batch, _settings, _mode)

            entry = self._functions[key] = (tf.function(evaluate, reduce_retracing=True), evaluate_settings)
        return ModelOutputs(*entry[0](self._values, batch))

    def model_components_state(self) -> dict:
        """Per component its weights as numpy arrays in ``get_weights()`` order (as ``trainer.get_state()``)."""
        return {
            name: [np.asarray(self._values[i]) for i in indices] for name, indices in self._component_indices.items()
        }

    def set_model_components_state(self, model_components: dict) -> None:
        """Component weights from arrays; the other variables (the training model's own) are read from the live
        model."""
        values = [tf.identity(variable) for variable in self._variables]
        for name, indices in self._component_indices.items():
            for i, array in zip(indices, model_components[name]):
                values[i] = tf.constant(array, dtype=self._variables[i].dtype)
        self._values = values
