"""PyTorch :class:`~mlpug.trainers.snapshot.EvaluationSnapshot`: a deep copy of the training model whose
parameters and buffers are overwritten in place (``Tensor.copy_``) at every capture."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor

from mlpug.trainers.snapshot import EvaluationSnapshot
from mlpug.trainers.trainer import ModelOutputs

EvaluationForward = Callable[[torch.nn.Module, Any, Any, bool], ModelOutputs]
"""``forward(model, batch, evaluate_settings, inference_mode)``: the trainer's eager forward pass of ``model`` (on its
device, under its autocast), its outputs normalised."""


def _tensors(module: torch.nn.Module) -> list:
    return list(itertools.chain(module.parameters(), module.buffers()))


class TorchEvaluationSnapshot(EvaluationSnapshot):
    """A frozen copy of a PyTorch ``DefaultTrainer``'s training model (the module inside DDP).

    The copy is made once, with ``copy.deepcopy`` of the training model and the model components together (so
    components inside the training model are the copy's own); it is in eval mode and has no gradients. Its
    tensors are on the same devices as the live ones.

    The trainer creates it (``DefaultTrainer.evaluation_snapshot()``).

    Args:
        training_model: The trainer's training model (data-parallel: the module inside DDP).
        model_components: The trainer's model components by name.
        forward: The trainer's forward pass (see :data:`EvaluationForward`).
        live_model: When given, the model whose parameters and buffers :meth:`capture` copies, by name (FSDP: the
            sharded training model, whose parameters are gathered, a collective; ``training_model`` is then its
            unsharded copy); default ``training_model`` and ``model_components`` themselves.

    Raises:
        TypeError: The training model cannot be deep-copied (the message says what to change).
    """

    def __init__(
        self,
        training_model: torch.nn.Module,
        model_components: Mapping[str, torch.nn.Module],
        forward: EvaluationForward,
        live_model: Optional[torch.nn.Module] = None,
    ):
        self._forward = forward
        memo: dict = {}
        try:
            self._model = copy.deepcopy(training_model, memo)
            self._components = copy.deepcopy(dict(model_components), memo)
        except Exception as error:
            raise TypeError(
                f"run_async=True evaluates a copy of the training model, but copy.deepcopy of "
                f"{type(training_model).__qualname__} failed ({type(error).__name__}: {error}); keep objects that "
                "cannot be copied (open files, locks, data loaders) out of the training model"
            ) from error
        self._model.eval()
        self._model.requires_grad_(False)
        for component in self._components.values():
            component.requires_grad_(False)
        if live_model is not None:  # the copy's tensors by name from the live (sharded) model's
            live = dict(itertools.chain(live_model.named_parameters(), live_model.named_buffers()))
            named = itertools.chain(self._model.named_parameters(), self._model.named_buffers())
            pairs = [(target, live[name]) for name, target in named]
        else:
            pairs, seen = [], set()
            lives = [training_model, *model_components.values()]
            copies = [self._model, *self._components.values()]
            for live_module, copied_module in zip(lives, copies):
                for source, target in zip(_tensors(live_module), _tensors(copied_module)):
                    if id(source) not in seen:
                        seen.add(id(source))
                        pairs.append((target, source))
        self._targets = [target for target, _ in pairs]
        self._sources = [source for _, source in pairs]
        self._sharded = any(isinstance(source, DTensor) for source in self._sources)

    def capture(self) -> None:
        """Copy every parameter and buffer of the live model into the copy (queued on the device; no wait)."""
        with torch.no_grad():
            if self._sharded:  # a collective: every rank captures at the same point
                sources = [source.full_tensor() if isinstance(source, DTensor) else source for source in self._sources]
                torch._foreach_copy_(self._targets, sources)
            else:
                torch._foreach_copy_(self._targets, self._sources)

    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """``BackendTrainer.evaluate_loss`` on the copy: ``torch.no_grad()``, the trainer's device and autocast."""
        with torch.no_grad():
            return self._forward(self._model, batch, evaluate_settings, inference_mode)

    def model_components_state(self) -> dict:
        return {name: module.state_dict() for name, module in self._components.items()}

    def set_model_components_state(self, model_components: dict) -> None:
        for name, module in self._components.items():
            module.load_state_dict(model_components[name])

    def configure_thread(self, num_threads: Any) -> None:
        """``torch.set_num_threads(num_threads)`` on the worker thread (OpenMP keeps a thread count per thread,
        so the training thread keeps its own)."""
        if num_threads is not None:
            torch.set_num_threads(num_threads)
