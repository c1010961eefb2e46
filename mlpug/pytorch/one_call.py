"""The one-call API on PyTorch: ``mlp.Trainer(model, loss_func, optimizer).train(train_dataset, ...)``.

See :class:`mlpug.one_call.OneCallTrainer` for the arguments; here the backend's parts: the training model
(``loss_func(outputs, targets)``, torch's order), ``torch.utils.data.Dataset`` s batched by
:func:`mlpug.pytorch.data.resumable_data_loader` (a ``TensorDataset`` of two tensors sliced as arrays) and the
optimizer's fused implementation (:func:`use_fused_implementation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Optional

import torch
from torch.optim.optimizer import _get_fused_kernels_supported_devices

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
from mlpug.pytorch.callbacks.checkpoint_manager import CheckpointManager
from mlpug.pytorch.data import ResumableArrayBatches, resumable_data_loader
from mlpug.pytorch.evaluation import MetricEvaluator
from mlpug.pytorch.trainers.trainer import DefaultTrainer
from mlpug.trainers.trainer import ModelOutputs

__all__ = ["Trainer", "use_fused_implementation"]

_log = logging.getLogger("mlpug.pytorch.Trainer")


def use_fused_implementation(optimizer: torch.optim.Optimizer, model: Optional[torch.nn.Module] = None) -> bool:
    """Switch ``optimizer`` to torch's fused implementation (``fused=True``) where the user left it open and torch
    supports it; return whether it was switched.

    Switched only when all of these hold, so that nothing the user chose changes: the optimizer class has a fused
    implementation (``"fused"`` in its ``defaults``: ``Adam``, ``AdamW``, ``SGD``, ``Adagrad``), it has no state
    yet (it never stepped), in every parameter group ``fused`` and ``foreach`` are None (not chosen) and
    ``differentiable`` is False, every parameter is a floating point tensor on a device with fused kernels
    (``cpu``, ``cuda``, ...), and ``model`` (when given) has no module with ``sparse=True`` (an
    ``nn.Embedding`` / ``nn.EmbeddingBag`` with sparse gradients, which the fused kernels refuse). The fused
    implementation runs the same algorithm, over all parameters in one kernel per step; its float rounding differs
    (about 1e-7 relative per step), so weights differ from the default implementation's at that level.

    The switch does what ``fused=True`` at construction does: ``fused`` in every parameter group and in
    ``defaults``, and the optimizer marked as one that handles float16 loss scaling in its kernel
    (``_step_supports_amp_scaling``: ``GradScaler.step`` then hands it the scale and ``found_inf`` instead of
    unscaling and checking on the host), as torch's constructors set it (torch 2.13).

    Args:
        optimizer: A ``torch.optim.Optimizer``; changed in place.
        model: The model whose parameters it steps, checked for sparse-gradient modules; None: not checked.
    """
    if "fused" not in optimizer.defaults or optimizer.state:
        return False
    if model is not None and any(getattr(module, "sparse", False) is True for module in model.modules()):
        return False
    supported = set(_get_fused_kernels_supported_devices())
    for group in optimizer.param_groups:
        if group.get("fused") is not None or group.get("foreach") is not None or group.get("differentiable"):
            return False
        if not all(p.device.type in supported and torch.is_floating_point(p) for p in group["params"]):
            return False
    for group in optimizer.param_groups:
        group["fused"] = True
    optimizer.defaults["fused"] = True
    optimizer._step_supports_amp_scaling = True  # type: ignore[attr-defined]
    optimizer._need_device_dtype_check_for_fused = True  # type: ignore[attr-defined]
    return True


class LossModel(torch.nn.Module):
    """Turns an ``(inputs, targets)`` batch into ``{"loss": loss_func(model(inputs), targets), "auxiliary_results":
    model(inputs)}``: the training model of :class:`Trainer`.

    Args:
        model: Maps ``inputs`` to outputs (e.g. logits ``[B, C]``).
        loss_func: ``loss_func(outputs, targets)``, a 0-d mean loss.
    """

    def __init__(self, model: torch.nn.Module, loss_func: Callable[[Any, Any], Any]):
        super().__init__()
        self.model = model
        self.loss_func = loss_func

    def forward(self, batch_data: Any, evaluate_settings: Any = None, inference_mode: Optional[bool] = None) -> dict:
        inputs, targets = split_batch(batch_data)
        outputs = self.model(inputs)
        try:
            loss = self.loss_func(outputs, targets)
        except Exception as error:
            raise_loss_func_error(error, outputs, targets, "loss_func(outputs, targets)")
        return {"loss": loss, "auxiliary_results": outputs}

    def check_targets(self, batch: Any, outputs: ModelOutputs) -> None:
        """The first-batch check of ``allow_broadcast=False`` (:func:`mlpug.one_call.check_targets_fit`) on
        the detached model outputs of ``batch``, the targets moved to their device.

        Raises:
            ValueError: The outputs and targets broadcast against each other in ``loss_func``.
        """
        predictions, targets = outputs.auxiliary_results, split_batch(batch)[1]
        if not isinstance(predictions, torch.Tensor) or not hasattr(targets, "shape"):
            return
        targets = torch.as_tensor(targets, device=predictions.device)
        made_up = (made_up_values(predictions), made_up_values(targets, descending=True))

        def loss(use_made_up: bool, change: ArgumentChange) -> float:
            outputs, values = made_up if use_made_up else (predictions, targets)
            if change == "targets":
                values = values.reshape(outputs.shape)
            elif change == "outputs":
                outputs = outputs.reshape(values.shape)
            elif change is not None:
                values = torch.roll(values, 1, dims=change)
            with torch.no_grad():
                return float(self.loss_func(outputs, values))

        check_targets_fit(list(predictions.shape), list(targets.shape), loss)


def made_up_values(like: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """:func:`mlpug.one_call.made_up_values` of ``like``'s shape, in its dtype and on its device."""
    inexact = like.dtype.is_floating_point or like.dtype.is_complex
    values = neutral_made_up_values(tuple(like.shape), inexact, descending)
    return torch.as_tensor(values).to(device=like.device, dtype=like.dtype)


class Trainer(OneCallTrainer):
    __doc__ = (OneCallTrainer.__doc__ or "") + (
        "\n    PyTorch: ``loss_func(outputs, targets)``; a map-style ``torch.utils.data.Dataset`` is batched by\n"
        "    ``mlp.data.resumable_data_loader`` (validation: a ``DataLoader`` in order); a ``TensorDataset`` of two\n"
        "    tensors is sliced like a tuple of arrays (the same batches, without per-sample collation); an\n"
        "    ``IterableDataset`` must come in a ``DataLoader``. Batches go to the model's device (``device=``\n"
        "    overrides). Under ``torchrun`` (or ``mlp.distributed.launch``) every process runs the same script and\n"
        "    trains its shard with DistributedDataParallel.\n"
        "\n"
        "    PyTorch ``fused_optimizer`` (keyword, default True): the optimizer steps with torch's fused\n"
        "    implementation (``fused=True``: the same algorithm in one kernel per step; float rounding differs by\n"
        "    about 1e-7 per step) where it has one and ``fused`` was left unset (None); one info line says so. See\n"
        "    ``mlpug.pytorch.one_call.use_fused_implementation`` for when it applies; ``fused_optimizer=False`` (or\n"
        "    an optimizer made with ``fused=False``) keeps the optimizer as it is, as does a sharding strategy (FSDP:\n"
        "    the sharded parameters are DTensors, which not every fused kernel takes). Raises ``TypeError`` when\n"
        "    ``fused_optimizer`` is not a bool.\n"
    )

    backend: ClassVar[Any] = backend_parts(
        default_trainer=DefaultTrainer,
        metric_evaluator=MetricEvaluator,
        checkpoint_manager=CheckpointManager,
        array_batches=ResumableArrayBatches,
    )

    def __init__(
        self,
        model: Any,
        loss_func: Callable[[Any, Any], Any],
        optimizer: Any,
        metrics: Optional[Mapping[str, Callable]] = None,
        *,
        fused_optimizer: bool = True,
        **trainer_options: Any,
    ):
        if not isinstance(fused_optimizer, bool):
            raise TypeError(f"fused_optimizer must be True or False, got {fused_optimizer!r:.100}")
        super().__init__(model, loss_func, optimizer, metrics, **trainer_options)
        if (
            fused_optimizer and self.trainer.sharded_checkpoints() is None
        ):  # sharded: not every fused kernel takes DTensors
            for name, torch_optimizer in self.trainer.optimizers.items():
                if use_fused_implementation(torch_optimizer, model if isinstance(model, torch.nn.Module) else None):
                    _log.info(
                        f"{name} ({type(torch_optimizer).__qualname__}) steps with torch's fused implementation "
                        "(fused=True; same algorithm, float rounding differs); fused_optimizer=False keeps it as given"
                    )

    def _training_model(self, model: Any, loss_func: Callable) -> Any:
        return LossModel(model, loss_func)

    def _trainer_options(self, model: Any, options: dict) -> dict:
        """Batches follow the model: without ``device=``, the device of its first parameter when that is not the
        CPU (the model stays where you put it, e.g. ``model.cuda()``)."""
        if "device" not in options:
            parameter = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            if parameter is not None and parameter.device.type != "cpu":
                options = {**options, "device": parameter.device}
        return options

    def _batches(
        self, dataset: Any, argument: str, given_batch_size: Optional[int], batch_size: Optional[int], training: bool,
        shuffle: bool, seed: int,
    ) -> Any:  # fmt: skip
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError(
                f"{argument} is an IterableDataset ({type(dataset).__qualname__}): mlp.Trainer batches only map-style "
                "datasets (len() and indexing, in a resumable order); wrap it in torch.utils.data.DataLoader(dataset, "
                "batch_size=...) and pass the DataLoader"
            )
        if type(dataset) is torch.utils.data.TensorDataset and len(dataset.tensors) == 2:
            return super()._batches(  # the batches a DataLoader would collate, sliced at once
                tuple(dataset.tensors), argument, given_batch_size, batch_size, training, shuffle, seed
            )
        if isinstance(dataset, torch.utils.data.Dataset) and hasattr(dataset, "__len__"):
            size = batch_size or DEFAULT_BATCH_SIZE
            if training:
                return resumable_data_loader(dataset, size, shuffle=shuffle, seed=seed)
            return torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False)  # shardable over ranks
        return super()._batches(dataset, argument, given_batch_size, batch_size, training, shuffle, seed)
