"""TensorFlow :class:`~mlpug.trainers.snapshot.EvaluationSnapshot`: the values of the training model's variables,
evaluated with Keras' ``stateless_call``.

``capture`` reads every variable (``tf.identity``): TensorFlow copies a variable's buffer before updating it
while a tensor read from it is alive, so the read values stay those of the capture, and nothing is copied until
the optimizer next updates a variable. ``evaluate_loss`` runs ``training_model.stateless_call(values, ...)``, whose
variable scope (``keras.StatelessScope``) is thread-local: the worker thread sees the snapshot, the training thread
keeps the live variables.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import tensorflow as tf

from mlpug.tensorflow.trainers.compilation import _frozen
from mlpug.trainers.snapshot import EvaluationSnapshot
from mlpug.trainers.trainer import ModelOutputs


class KerasEvaluationSnapshot(EvaluationSnapshot):
    """A frozen copy of the weights of a TensorFlow ``DefaultTrainer``'s training model (a built Keras layer).

    Compiled with ``tf.function`` (``reduce_retracing``; one function per value of the evaluate settings) unless
    the trainer is in eager mode.

    Args:
        trainer: A ``mlpug.tensorflow`` ``DefaultTrainer`` that is built (it has trained or evaluated a batch).
    """

    def __init__(self, trainer: Any):
        self._trainer = trainer
        model = trainer.training_model
        self._trainable = list(model.trainable_variables)
        self._non_trainable = list(model.non_trainable_variables)
        self._variables = [*self._trainable, *self._non_trainable]
        index = {id(variable): i for i, variable in enumerate(self._variables)}
        self._component_indices = {}
        for name, component in trainer.model_components.items():
            missing = [v.path for v in component.weights if id(v) not in index]
            if missing:
                raise ValueError(
                    f"run_async=True: model component {name!r} has weights the training model does not use "
                    f"({missing[:3]}); the snapshot holds the training model's variables"
                )
            self._component_indices[name] = [index[id(v)] for v in component.weights]
        self._values: list = []
        self._functions: dict = {}
        # stateless_call calls call() itself (not __call__, which drops a `training` that call() does not take)
        self._passes_training = "training" in inspect.signature(model.call).parameters

    def capture(self) -> None:
        self._values = [tf.identity(variable) for variable in self._variables]

    def _evaluate(self, values: list, batch: Any, settings: Any, inference_mode: bool) -> tuple:
        trainer = self._trainer
        kwargs = {trainer._settings_arg: settings}
        if trainer._inference_arg is not None:
            kwargs[trainer._inference_arg] = inference_mode
        if self._passes_training:
            kwargs["training"] = not inference_mode
        trainable, non_trainable = values[: len(self._trainable)], values[len(self._trainable) :]
        results, _ = trainer.training_model.stateless_call(trainable, non_trainable, batch, **kwargs)
        outputs = trainer._normalise_outputs(results, batch)
        return tf.reshape(outputs.loss, []), outputs.num_samples, outputs.auxiliary_results

    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        if self._trainer.eager_mode:
            return ModelOutputs(*self._evaluate(self._values, batch, evaluate_settings, bool(inference_mode)))
        key = (_frozen(evaluate_settings), bool(inference_mode))
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
        """Component weights from arrays; the training model's other variables are read from the live model."""
        values = [tf.identity(variable) for variable in self._variables]
        for name, indices in self._component_indices.items():
            for i, array in zip(indices, model_components[name]):
                values[i] = tf.constant(array, dtype=self._variables[i].dtype)
        self._values = values
