"""A pure-Python backend for testing the neutral core: no torch, no tensorflow.

The "model" is a linear function ``y = w * x + b`` trained with plain SGD on a squared error loss.
Batches are lists of ``(x, y)`` float pairs; losses are ``FakeScalar`` values (a tiny tensor stand-in
that counts how often it is converted to a Python number, to prove the loop does no per-step sync).
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

from mlpug.trainers.snapshot import EvaluationSnapshot
from mlpug.trainers.trainer import DefaultTrainer, ModelOutputs, StepResult


class FakeScalar:
    """A 0-d 'tensor': arithmetic-free, converted to a number only through ``item()``."""

    conversions = 0

    def __init__(self, value: float):
        self.value = float(value)
        self.shape = ()

    def item(self) -> float:
        FakeScalar.conversions += 1
        return self.value


class LinearModel:
    def __init__(self, w: float = 0.0, b: float = 0.0):
        self.w, self.b = w, b


class SGD:
    def __init__(self, learning_rate: float = 0.01):
        self.learning_rate = learning_rate


class TrainModel:
    """Training model: squared error of ``w * x + b`` against ``y``, averaged over the batch."""

    def __init__(self, model: LinearModel, fail_at_call: Optional[int] = None):
        self.model = model
        self.calls = 0
        self.fail_at_call = fail_at_call

    def __call__(self, batch, evaluate_settings, inference_mode=None):
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise FloatingPointError("injected failure in the training step")
        m = self.model
        errors = [(m.w * x + m.b - y) for x, y in batch]
        loss = sum(e * e for e in errors) / len(batch)
        grad_w = sum(2 * e * x for e, (x, _) in zip(errors, batch)) / len(batch)
        grad_b = sum(2 * e for e in errors) / len(batch)
        return {"loss": FakeScalar(loss), "auxiliary_results": {"grads": (grad_w, grad_b), "errors": errors}}


class FakeTrainer(DefaultTrainer):
    optimizer_type = SGD
    model_component_type = LinearModel
    snapshot_delay_s = 0.0  # FakeSnapshot: seconds per evaluated batch

    def evaluation_snapshot(self) -> "FakeSnapshot":
        return FakeSnapshot(self)

    def set_training_model(self, training_model: Any) -> None:
        if not callable(training_model):
            raise TypeError("training_model must be callable")
        self.training_model = training_model

    def _is_scalar_loss(self, loss: Any) -> bool:
        return isinstance(loss, FakeScalar)

    def train_on(self, batch, training_settings=None) -> StepResult:
        self.ensure_ready()
        outputs = self._normalise_outputs(self.training_model(batch, training_settings, False), batch)
        if self._first_batch_checks:  # before the update, as a real backend before backward
            self._run_first_batch_checks(batch, outputs)
        grad_w, grad_b = outputs.auxiliary_results["grads"]
        optimizer = next(iter(self.optimizers.values()))
        model = next(iter(self.model_components.values()))
        model.w -= optimizer.learning_rate * grad_w
        model.b -= optimizer.learning_rate * grad_b
        return StepResult(*outputs, learning_rate=optimizer.learning_rate)

    def non_finite_indices(self, values) -> list:
        """Vectorised like a real backend's: one conversion (one "device wait") for all values."""
        FakeScalar.conversions += 1
        return [i for i, value in enumerate(values) if not math.isfinite(getattr(value, "value", value))]

    weight_checks = 0  # calls of non_finite_weights (each one "device wait"), counted over all instances

    def non_finite_weights(self) -> list:
        """``"<component>.w"`` / ``"<component>.b"`` of the weights that are NaN or infinite (one "device wait")."""
        FakeTrainer.weight_checks += 1
        return [
            f"{name}.{weight}"
            for name, model in self.model_components.items()
            for weight in ("w", "b")
            if not math.isfinite(getattr(model, weight))
        ]

    def evaluate_loss(self, batch, evaluate_settings=None, inference_mode=True) -> ModelOutputs:
        self.ensure_ready()
        return self._normalise_outputs(self.training_model(batch, evaluate_settings, inference_mode), batch)

    def get_state(self) -> dict:
        return {
            "model_components": {n: {"w": m.w, "b": m.b} for n, m in self.model_components.items()},
            "optimizers": {n: {"learning_rate": o.learning_rate} for n, o in self.optimizers.items()},
        }

    def set_state(self, state: dict) -> None:
        for n, m in self.model_components.items():
            m.w, m.b = state["model_components"][n]["w"], state["model_components"][n]["b"]
        for n, o in self.optimizers.items():
            o.learning_rate = state["optimizers"][n]["learning_rate"]

    def set_learning_rate(self, learning_rate: float, optimizer_name: Optional[str] = None) -> None:
        for name, optimizer in self.optimizers.items():
            if optimizer_name in (None, name):
                optimizer.learning_rate = learning_rate

    def get_learning_rate(self, optimizer_name: Optional[str] = None) -> Optional[float]:
        return self.optimizers[optimizer_name or next(iter(self.optimizers))].learning_rate


def make_batches(num_batches: int, batch_size: int = 4, w: float = 2.0, b: float = -1.0) -> list:
    """Deterministic batches of ``(x, y)`` with ``y = w * x + b``."""
    batches = []
    for i in range(num_batches):
        xs = [((i * batch_size + j) % 7) / 7.0 - 0.5 for j in range(batch_size)]
        batches.append([(x, w * x + b) for x in xs])
    return batches


def make_trainer(fail_at_call: Optional[int] = None):
    model = LinearModel()
    trainer = FakeTrainer(optimizers=SGD(0.1), model_components=model)
    trainer.set_training_model(TrainModel(model, fail_at_call))
    return trainer, model


class FakeSnapshot(EvaluationSnapshot):
    """A copy of the fake trainer's linear models, evaluated with its own ``TrainModel``."""

    def __init__(self, trainer: "FakeTrainer"):
        self.trainer = trainer
        self.models = {name: LinearModel() for name in trainer.model_components}
        self.train_model = TrainModel(next(iter(self.models.values())))
        self.delay_s = trainer.snapshot_delay_s  # seconds per evaluated batch (to test late results)

    def capture(self) -> None:
        for name, model in self.trainer.model_components.items():
            self.models[name].w, self.models[name].b = model.w, model.b

    def evaluate_loss(self, batch, evaluate_settings=None, inference_mode=True) -> ModelOutputs:
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.trainer._normalise_outputs(self.train_model(batch, evaluate_settings, inference_mode), batch)

    def model_components_state(self) -> dict:
        return {name: {"w": m.w, "b": m.b} for name, m in self.models.items()}

    def set_model_components_state(self, model_components: dict) -> None:
        for name, model in self.models.items():
            model.w, model.b = model_components[name]["w"], model_components[name]["b"]
