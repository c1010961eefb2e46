"""The one-call API on TensorFlow: ``mlp.Trainer(model, loss_func, optimizer).train(train_dataset, ...)``.

See :class:`mlpug.one_call.OneCallTrainer` for the arguments; here the backend's parts: the training model
(``loss_func(targets, outputs)``, Keras' order) and ``tf.data.Dataset`` s of samples batched here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Optional

import numpy as np
import tensorflow as tf

from mlpug.one_call import (
    DEFAULT_BATCH_SIZE,
    ArgumentChange,
    OneCallTrainer,
    backend_parts,
    check_targets_fit,
    raise_loss_func_error,
    split_batch,
)
from mlpug.one_call import (
    made_up_values as neutral_made_up_values,
)
from mlpug.tensorflow.callbacks.checkpoint_manager import CheckpointManager
from mlpug.tensorflow.data import ResumableArrayBatches, pipeline_stages
from mlpug.tensorflow.evaluation import MetricEvaluator
from mlpug.tensorflow.trainers.trainer import DefaultTrainer
from mlpug.trainers.trainer import ModelOutputs

__all__ = ["Trainer"]

#: Samples in the shuffle buffer of a ``tf.data.Dataset`` of samples (as in the tf.data guide); a smaller dataset is
#: shuffled as a whole. For another buffer, shuffle and batch the dataset yourself.
SHUFFLE_BUFFER_SIZE = 10_000


class LossModel(tf.keras.Model):
    """Turns an ``(inputs, targets)`` batch into ``{"loss": loss_func(targets, model(inputs)), "auxiliary_results":
    model(inputs)}``: the training model of :class:`Trainer`. ``model`` is called with ``training=not inference_mode``.

    The loss is what ``loss_func`` returns. Under a ``tf.distribute`` strategy Keras 3 scales the mean of a
    ``keras.losses.Loss`` object by ``1 / num_replicas_in_sync`` in a replica context, unless its per-sample values
    are 0-d (e.g. ``MeanSquaredError`` of outputs and targets ``[B]``); the trainer finds out which at its first
    training step and undoes it (see :mod:`mlpug.tensorflow.trainers.replica_loss`).

    Args:
        model: Maps ``inputs`` to outputs (e.g. logits ``[B, C]``).
        loss_func: ``loss_func(targets, outputs)``, a 0-d mean loss (a ``keras.losses`` object or function).
    """

    def __init__(self, model: tf.keras.Model, loss_func: Callable[[Any, Any], Any]):
        super().__init__()
        self.model = model
        self.loss_func = loss_func

    def call(self, batch_data: Any, evaluate_settings: Any = None, inference_mode: Optional[bool] = None) -> dict:
        inputs, targets = split_batch(batch_data)
        outputs = self.model(inputs, training=not inference_mode)
        try:
            loss = self.loss_func(targets, outputs)
        except Exception as error:
            raise_loss_func_error(error, outputs, targets, "loss_func(targets, outputs)")
        return {"loss": loss, "auxiliary_results": outputs}

    def check_targets(self, batch: Any, outputs: ModelOutputs) -> None:
        """The first-batch check of ``allow_broadcast=False`` (:func:`mlpug.one_call.check_targets_fit`) on
        the model outputs of ``batch`` (eager tensors: see ``DefaultTrainer._check_first_batch``).

        Raises:
            ValueError: The outputs and targets broadcast against each other in ``loss_func``.
        """
        predictions, targets = outputs.auxiliary_results, split_batch(batch)[1]
        if not tf.is_tensor(predictions) or not hasattr(targets, "shape"):
            return
        reshape = tf.reshape if tf.is_tensor(targets) else np.reshape  # the targets' own type, as loss_func got them
        made_up_targets = made_up_values(np.shape(targets), tf.as_dtype(targets.dtype), descending=True)
        made_up = (
            tf.constant(made_up_values(predictions.shape, predictions.dtype)),
            tf.constant(made_up_targets) if tf.is_tensor(targets) else made_up_targets,
        )

        outputs_shape = predictions.shape.as_list()
        targets_shape = [None if d is None else int(d) for d in targets.shape]

        def loss(use_made_up: bool, change: ArgumentChange) -> float:  # called only where both shapes are known
            outputs, values = made_up if use_made_up else (predictions, targets)
            if change == "targets":
                values = reshape(values, outputs_shape)
            elif change == "outputs":
                outputs = tf.reshape(outputs, targets_shape)
            elif change is not None:
                values = tf.roll(values, 1, change) if tf.is_tensor(values) else np.roll(values, 1, change)
            return float(self.loss_func(values, outputs))

        check_targets_fit(outputs_shape, targets_shape, loss)


def made_up_values(shape: Any, dtype: tf.DType, descending: bool = False) -> np.ndarray:
    """:func:`mlpug.one_call.made_up_values` of ``shape``, in ``dtype``."""
    inexact = dtype.is_floating or dtype.is_complex
    return neutral_made_up_values(tuple(shape), inexact, descending).astype(dtype.as_numpy_dtype)


def _has_batch_stage(dataset: tf.data.Dataset) -> bool:
    """True when the pipeline's output is batched: going from the output towards the sources, a ``batch`` stage
    (``batch``, ``padded_batch``, ``ragged_batch``, ...) comes before any ``unbatch``. Pipelines that batch in a
    Python generator (``from_generator``) are not recognised: give them without ``batch_size``."""
    for stage in pipeline_stages(dataset):
        name = type(stage).__name__
        if "Unbatch" in name:
            return False
        if "Batch" in name:
            return True
    return False


class Trainer(OneCallTrainer):
    __doc__ = (OneCallTrainer.__doc__ or "") + (
        "\n    TensorFlow: ``loss_func(targets, outputs)``; a ``tf.data.Dataset`` of samples (no ``batch`` stage at\n"
        "    its output) is batched here (training: ``shuffle(SHUFFLE_BUFFER_SIZE, seed=seed)`` first, reshuffled\n"
        "    every epoch); a batched one is used as it is. Give ``strategy=`` (and\n"
        "    build the model and optimizer in its scope) to train data-parallel.\n"
    )

    backend: ClassVar[Any] = backend_parts(
        default_trainer=DefaultTrainer,
        metric_evaluator=MetricEvaluator,
        checkpoint_manager=CheckpointManager,
        array_batches=ResumableArrayBatches,
    )

    def _training_model(self, model: Any, loss_func: Callable) -> Any:
        return LossModel(model, loss_func)

    def _batches(
        self, dataset: Any, argument: str, given_batch_size: Optional[int], batch_size: Optional[int], training: bool,
        shuffle: bool, seed: int,
    ) -> Any:  # fmt: skip
        if isinstance(dataset, tf.data.Dataset) and not _has_batch_stage(dataset):
            if training and shuffle:
                dataset = dataset.shuffle(SHUFFLE_BUFFER_SIZE, seed=seed, reshuffle_each_iteration=True)
            return dataset.batch(batch_size or DEFAULT_BATCH_SIZE)
        return super()._batches(dataset, argument, given_batch_size, batch_size, training, shuffle, seed)
