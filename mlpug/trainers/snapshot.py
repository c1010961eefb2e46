"""``EvaluationSnapshot``: a frozen copy of a trainer's model, evaluated on another thread while training goes on.

Asynchronous dataset evaluation (``TestMetricsLogger(..., run_async=True)``, see
:mod:`mlpug.callbacks.async_evaluation`) never evaluates the live weights: at each trigger the training
thread copies them into a snapshot (:meth:`EvaluationSnapshot.capture`), and a worker thread evaluates the
snapshot (:meth:`EvaluationSnapshot.evaluate_loss`) while the next batches train. A backend trainer creates its
snapshots with ``evaluation_snapshot()`` and hands each what it needs at construction (its models and its forward
pass or evaluation step function), so a snapshot never reads the trainer's own members:

* PyTorch: a deep copy of the training model (made once per snapshot), whose parameters and buffers ``capture``
  overwrites in place (``Tensor.copy_``: one copy of the weights, no allocation).
* TensorFlow: the values of the training model's variables, read at ``capture`` (TensorFlow copies a variable's
  buffer before an update while a read of it is alive, so the read values stay frozen), evaluated with Keras'
  ``stateless_call`` (its variable scope is thread-local, so the training thread keeps using the live
  variables).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from mlpug.trainers.trainer import ModelOutputs


class EvaluationSnapshot(ABC):
    """A copy of the weights of a trainer's model that training does not change.

    Thread use: :meth:`capture` and :meth:`set_model_components_state` run on the training thread while no
    evaluation of this snapshot runs; :meth:`evaluate_loss` runs on the evaluation worker thread;
    :meth:`model_components_state` on the training thread after the evaluation finished.
    """

    @abstractmethod
    def capture(self) -> None:
        """Copy the trainer's current weights into this snapshot (training thread; no device wait needed)."""

    @abstractmethod
    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """Evaluate the snapshot on ``batch`` like ``BackendTrainer.evaluate_loss`` evaluates the live model: same
        settings, mixed precision and device placement, so the same weights give the same numbers."""

    def evaluate_losses(
        self, batches: Sequence[Any], evaluate_settings: Any = None, inference_mode: bool = True
    ) -> list[ModelOutputs]:
        """:meth:`evaluate_loss` for each of ``batches``, in order (as ``BackendTrainer.evaluate_losses``)."""
        return [self.evaluate_loss(batch, evaluate_settings, inference_mode) for batch in batches]

    @abstractmethod
    def model_components_state(self) -> dict:
        """The snapshot's weights per model component name, in the form of
        ``trainer.get_state()["model_components"]`` (what a model checkpoint holds)."""

    @abstractmethod
    def set_model_components_state(self, model_components: dict) -> None:
        """Load weights (as :meth:`model_components_state` returns them) into the snapshot, e.g. a pending
        evaluation saved in a training checkpoint and redone on resume."""

    def configure_thread(self, num_threads: Any) -> None:  # noqa: B027 (optional hook, default no-op)
        """Called on the worker thread before its first evaluation: limit the backend's intra-op threads of that
        thread to ``num_threads`` (an int >= 1; None leaves them). Default: nothing."""
