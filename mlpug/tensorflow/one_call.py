"""The one-call API on TensorFlow: ``mlp.Trainer(model, loss_func, optimizer).train(train_dataset, ...)``.

See :class:`mlpug.trainers.one_call.OneCallTrainer` for the arguments; here the backend's parts: the training model
(``loss_func(targets, outputs)``, Keras' order) and ``tf.data.Dataset`` s of samples batched here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Optional

import tensorflow as tf

import mlpug.tensorflow as backend
from mlpug.tensorflow.data import pipeline_stages
from mlpug.trainers.one_call import DEFAULT_BATCH_SIZE, OneCallTrainer, split_batch

__all__ = ["Trainer"]

#: Samples in the shuffle buffer of a ``tf.data.Dataset`` of samples (as in the tf.data guide); a smaller dataset is
#: shuffled as a whole. For another buffer, shuffle and batch the dataset yourself.
SHUFFLE_BUFFER_SIZE = 10_000


class LossModel(tf.keras.Model):
    """Turns an ``(inputs, targets)`` batch into ``{"loss": loss_func(targets, model(inputs)), "auxiliary_results":
    model(inputs)}``: the training model of :class:`Trainer`. ``model`` is called with ``training=not inference_mode``.

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
        return {"loss": self.loss_func(targets, outputs), "auxiliary_results": outputs}


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
        "    every epoch); a batched one is used as it is. Give ``distribution_strategy=`` (and\n"
        "    build the model and optimizer in its scope) to train data-parallel.\n"
    )

    backend: ClassVar[Any] = backend

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
