"""The one-call API on PyTorch: ``mlp.Trainer(model, loss_func, optimizer).train(train_dataset, ...)``.

See :class:`mlpug.trainers.one_call.OneCallTrainer` for the arguments; here the backend's parts: the training model
(``loss_func(outputs, targets)``, torch's order) and ``torch.utils.data.Dataset`` s batched by
:func:`mlpug.pytorch.data.resumable_data_loader`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Optional

import torch

import mlpug.pytorch as backend
from mlpug.trainers.one_call import DEFAULT_BATCH_SIZE, OneCallTrainer, split_batch

__all__ = ["Trainer"]


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
        return {"loss": self.loss_func(outputs, targets), "auxiliary_results": outputs}


class Trainer(OneCallTrainer):
    __doc__ = (OneCallTrainer.__doc__ or "") + (
        "\n    PyTorch: ``loss_func(outputs, targets)``; a map-style ``torch.utils.data.Dataset`` is batched by\n"
        "    ``mlp.data.resumable_data_loader`` (validation: a ``DataLoader`` in order); an ``IterableDataset`` must\n"
        "    come in a ``DataLoader``. Batches go to the model's device (``device=`` overrides). Under ``torchrun``\n"
        "    (or ``mlp.distributed.launch``) every process\n"
        "    runs the same script and trains its shard with DistributedDataParallel.\n"
    )

    backend: ClassVar[Any] = backend

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
        if isinstance(dataset, torch.utils.data.Dataset) and hasattr(dataset, "__len__"):
            size = batch_size or DEFAULT_BATCH_SIZE
            if training:
                return backend.data.resumable_data_loader(dataset, size, shuffle=shuffle, seed=seed)
            return torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False)  # shardable over ranks
        return super()._batches(dataset, argument, given_batch_size, batch_size, training, shuffle, seed)
