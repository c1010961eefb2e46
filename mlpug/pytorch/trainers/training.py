"""PyTorch ``DefaultTrainer``: one optimisation step, evaluation and state of modules and optimizers."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional

import torch

from mlpug.trainers.training import DefaultTrainer as _NeutralDefaultTrainer
from mlpug.trainers.training import ModelOutputs


def map_tensors(value: Any, func: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``func`` to every tensor in a nested structure of tuples, named tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return func(value)
    if isinstance(value, Mapping):
        return {key: map_tensors(item, func) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(item, func) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(item, func) for item in value)
    return value


class DefaultTrainer(_NeutralDefaultTrainer):
    """Trains a PyTorch training model: forward, backward and optimizer step for every batch.

    Args:
        optimizers: A ``torch.optim.Optimizer``, a list or a dict of them. Names (``"optimizer"``,
            ``"optimizer_<i>"`` or the dict keys) are the keys of their state in checkpoints.
        model_components: A ``torch.nn.Module``, a list or a dict of them: the modules whose state is saved
            (``"model"``, ``"model_<i>"`` or the dict keys).
        device: When given, every tensor of a batch is moved to this device before the forward pass.

    The training model, set with :meth:`set_training_model`, is a ``torch.nn.Module`` whose
    ``forward(batch_data, evaluate_settings, inference_mode=None)`` returns the loss (see
    :class:`mlpug.trainers.training.DefaultTrainer` for the accepted return forms).

    Raises:
        TypeError: An optimizer or model component has the wrong type.
    """

    optimizer_type = torch.optim.Optimizer
    model_component_type = torch.nn.Module

    def __init__(self, optimizers: Any, model_components: Any, device: Optional[str | torch.device] = None):
        super().__init__(optimizers, model_components)
        self.device = torch.device(device) if device is not None else None
        self._optimizer_list = list(self.optimizers.values())
        self._passes_inference_mode = True

    def set_training_model(self, training_model: torch.nn.Module) -> None:
        """Set the model that returns the loss for a batch.

        Raises:
            TypeError: ``training_model`` is not a ``torch.nn.Module`` or its ``forward`` does not take
                ``(batch_data, evaluate_settings[, inference_mode])``.
        """
        if not isinstance(training_model, torch.nn.Module):
            raise TypeError(
                "training_model must be a torch.nn.Module whose forward(batch_data, evaluate_settings, "
                f"inference_mode=None) returns the loss; got {type(training_model).__qualname__}"
            )
        parameters = inspect.signature(training_model.forward).parameters.values()
        if any(p.kind is p.VAR_POSITIONAL for p in parameters):
            self._passes_inference_mode = True
        else:
            positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if len(positional) < 2:
                raise TypeError(
                    f"{type(training_model).__qualname__}.forward must accept (batch_data, evaluate_settings, "
                    f"inference_mode=None); it accepts ({', '.join(p.name for p in positional)})"
                )
            self._passes_inference_mode = len(positional) >= 3
        self.training_model = training_model

    def _is_scalar_loss(self, loss: Any) -> bool:
        return isinstance(loss, torch.Tensor) and loss.numel() == 1

    def _forward(self, batch: Any, settings: Any, inference_mode: bool) -> ModelOutputs:
        if self.device is not None:
            batch = map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
        if self._passes_inference_mode:
            results = self.training_model(batch, settings, inference_mode)
        else:
            results = self.training_model(batch, settings)
        return self._normalise_outputs(results, batch)

    def train_on(self, batch: Any, training_settings: Any = None) -> ModelOutputs:
        """One optimisation step: zero gradients, forward, backward, step every optimizer.

        Returns:
            ModelOutputs with the loss and auxiliary results detached.
        """
        self.ensure_ready()
        model = self.training_model
        if not model.training:
            model.train()
        for optimizer in self._optimizer_list:
            optimizer.zero_grad(set_to_none=True)
        outputs = self._forward(batch, training_settings, inference_mode=False)
        outputs.loss.backward()
        for optimizer in self._optimizer_list:
            optimizer.step()
        return ModelOutputs(
            outputs.loss.detach(), outputs.num_samples, map_tensors(outputs.auxiliary_results, torch.Tensor.detach)
        )

    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """Evaluate the training model on ``batch`` in eval mode under ``torch.no_grad()``; the mode is restored."""
        self.ensure_ready()
        model = self.training_model
        was_training = model.training
        if was_training:
            model.eval()
        try:
            with torch.no_grad():
                return self._forward(batch, evaluate_settings, inference_mode=inference_mode)
        finally:
            if was_training:
                model.train()

    def get_state(self) -> dict:
        """``{"model_components": {name: state_dict}, "optimizers": {name: state_dict}}`` (live references)."""
        return {
            "model_components": {name: module.state_dict() for name, module in self.model_components.items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
        }

    def set_state(self, state: dict) -> None:
        """Load the state of every model component and optimizer.

        Raises:
            ValueError: The names in ``state`` do not match this trainer's components or optimizers.
        """
        for kind, objects in (("model_components", self.model_components), ("optimizers", self.optimizers)):
            given = state.get(kind, {})
            if set(given) != set(objects):
                raise ValueError(f"{kind} in state {sorted(given)} do not match the trainer's {sorted(objects)}")
            for name, obj in objects.items():
                obj.load_state_dict(given[name])

    def set_learning_rate(self, learning_rate: float, optimizer_name: Optional[str] = None) -> None:
        """Set ``lr`` of every parameter group of the named optimizer, or of all optimizers."""
        if optimizer_name is not None and optimizer_name not in self.optimizers:
            raise ValueError(f"optimizer_name {optimizer_name!r} unknown; optimizers: {sorted(self.optimizers)}")
        optimizers = [self.optimizers[optimizer_name]] if optimizer_name else self._optimizer_list
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate

    def get_learning_rate(self, optimizer_name: Optional[str] = None) -> Optional[float]:
        """``lr`` of the first parameter group of the named (default: first) optimizer, as a float."""
        optimizer = self.optimizers[optimizer_name] if optimizer_name else self._optimizer_list[0]
        lr = optimizer.param_groups[0].get("lr")
        return float(lr) if lr is not None else None
