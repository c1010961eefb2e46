"""The one-call API on JAX: ``mlp.Trainer(model, loss_func, optimizer).train(train_dataset, ...)``.

See :class:`mlpug.one_call.OneCallTrainer` for the arguments; here the backend's parts: the training model
(:class:`LossModel`, ``loss_func(outputs, targets)``, optax's order, e.g.
``optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``), a Flax NNX ``model`` and an optax
``optimizer``. Tuples of arrays (NumPy or JAX) are batched by :class:`mlpug.jax.data.ResumableArrayBatches` (NumPy
batches; the compiled step moves them to the device); any other iterable of ``(inputs, targets)`` batches is used as
it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mlpug.jax.callbacks.checkpoint_manager import CheckpointManager
from mlpug.jax.data import ResumableArrayBatches
from mlpug.jax.evaluation import MetricEvaluator
from mlpug.jax.trainers.trainer import DefaultTrainer
from mlpug.one_call import (
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
from mlpug.trainers.trainer import ModelOutputs

__all__ = ["LossModel", "Trainer"]


class LossModel(nnx.Module):
    """Turns an ``(inputs, targets)`` batch into ``{"loss": loss_func(model(inputs), targets), "auxiliary_results":
    model(inputs)}``: the training model of :class:`Trainer`.

    The ``DefaultTrainer`` runs it in ``train()`` mode for training and in ``eval()`` mode for evaluation in inference
    mode (``nnx.Dropout``, ``nnx.BatchNorm`` follow), so ``model`` is called as ``model(inputs)`` only.

    Args:
        model: A ``flax.nnx.Module`` mapping ``inputs`` to outputs (e.g. logits ``[B, C]``).
        loss_func: ``loss_func(outputs, targets)``: the batch's scalar mean loss, traceable with ``jax.jit`` (e.g.
            ``lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``).
    """

    def __init__(self, model: nnx.Module, loss_func: Callable[[Any, Any], Any]):
        self.model = model
        self.loss_func = loss_func

    def __call__(self, batch_data: Any, evaluate_settings: Any = None, inference_mode: Optional[bool] = None) -> dict:
        inputs, targets = split_batch(batch_data)
        outputs = self.model(inputs)
        try:
            loss = self.loss_func(outputs, targets)
        except Exception as error:
            raise_loss_func_error(error, outputs, targets, "loss_func(outputs, targets)")
        return {"loss": loss, "auxiliary_results": outputs}

    def check_targets(self, batch: Any, outputs: ModelOutputs) -> None:
        """The first-batch check of ``allow_broadcast=False`` (:func:`mlpug.one_call.check_targets_fit`) on the
        model outputs of ``batch`` (a forward pass in inference mode; ``loss_func`` is called outside the compiled
        step, on ``jax.Array`` s).

        Raises:
            ValueError: The outputs and targets broadcast against each other in ``loss_func``.
        """
        predictions, targets = outputs.auxiliary_results, split_batch(batch)[1]
        if not isinstance(predictions, jax.Array) or not hasattr(targets, "shape"):
            return
        targets = jnp.asarray(targets)
        made_up = (made_up_values(predictions), made_up_values(targets, descending=True))

        def loss(use_made_up: bool, change: ArgumentChange) -> float:
            outputs, values = made_up if use_made_up else (predictions, targets)
            if change == "targets":
                values = values.reshape(outputs.shape)
            elif change == "outputs":
                outputs = outputs.reshape(values.shape)
            elif change is not None:
                values = jnp.roll(values, 1, axis=change)
            return float(self.loss_func(outputs, values))

        check_targets_fit(list(predictions.shape), list(targets.shape), loss)


def made_up_values(like: jax.Array, descending: bool = False) -> jax.Array:
    """:func:`mlpug.one_call.made_up_values` of ``like``'s shape, in its dtype."""
    inexact = bool(jnp.issubdtype(like.dtype, jnp.inexact))
    return jnp.asarray(neutral_made_up_values(like.shape, inexact, descending), dtype=like.dtype)


class Trainer(OneCallTrainer):
    __doc__ = (OneCallTrainer.__doc__ or "") + (
        "\n    JAX: ``model`` is a ``flax.nnx.Module``, ``optimizer`` an ``optax.GradientTransformation`` (make it\n"
        "    with ``optax.inject_hyperparams`` to log and schedule its learning rate), ``loss_func(outputs,\n"
        "    targets)`` in optax's order, traceable with ``jax.jit``. Tuples of arrays are batched as NumPy batches\n"
        "    by ``mlp.data.ResumableArrayBatches``; any iterable of ``(inputs, targets)`` batches (NumPy or JAX\n"
        "    arrays, e.g. a ``grain`` pipeline) is used as it is. The step is compiled once per batch shape (the\n"
        "    short last batch compiles it once more). After ``train`` the ``model`` holds the trained weights.\n"
    )

    backend: ClassVar[Any] = backend_parts(
        default_trainer=DefaultTrainer,
        metric_evaluator=MetricEvaluator,
        checkpoint_manager=CheckpointManager,
        array_batches=ResumableArrayBatches,
    )

    def _training_model(self, model: Any, loss_func: Callable) -> Any:
        return LossModel(model, loss_func)
