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
        "    ``mlp.data.resumable_data_loader``. Under ``torchrun`` (or ``mlp.distributed.launch``) every process\n"
        "    runs the same script and trains its shard with DistributedDataParallel.\n"
    )

    backend: ClassVar[Any] = backend

    def _training_model(self, model: Any, loss_func: Callable) -> Any:
        return LossModel(model, loss_func)

    def _batches(
        self, dataset: Any, argument: str, batch_size: Optional[int], samples_batch_size: Optional[int], shuffle: bool,
        seed: int,
    ) -> Any:  # fmt: skip
        is_map_style = isinstance(dataset, torch.utils.data.Dataset) and hasattr(dataset, "__len__")
        if is_map_style and not isinstance(dataset, torch.utils.data.IterableDataset):
            return backend.data.resumable_data_loader(
                dataset, samples_batch_size or DEFAULT_BATCH_SIZE, shuffle=shuffle, seed=seed
            )
        return super()._batches(dataset, argument, batch_size, samples_batch_size, shuffle, seed)
