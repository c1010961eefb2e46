"""``Strategy``: how a backend trainer distributes training, behind one protocol; ``SingleProcess``, its null object.

A strategy owns what differs between one process and many: the process group and its
:class:`~mlpug.distributed.DistributedContext` (rank, world size, collectives), wrapping the training model for its
engine, the gradient synchronisation of a step (:class:`~mlpug.trainers.gradient_sync.GradientSync`), and which part
of the data each rank trains and evaluates. A backend ``DefaultTrainer`` takes ``strategy=`` (a name or an object)
and asks its strategy at these points; it never tests which strategy it has. A user-written strategy subclasses
:class:`Strategy` (or a backend's) and overrides what it changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from mlpug.distributed import DistributedContext, SerialContext
from mlpug.trainers.gradient_sync import GradientSync


class Strategy(ABC):
    """How a trainer distributes training (see the module docstring).

    Attributes:
        name: The strategy's name, e.g. ``"single_process"`` or ``"ddp"`` (in messages).
    """

    name: str = "strategy"

    @abstractmethod
    def distributed_context(self) -> DistributedContext:
        """The ranks and collectives of this strategy (the same object every call)."""

    def prepare_training_model(self, training_model: Any, device: Any = None) -> Any:
        """The training model the trainer runs, wrapped for the engine when it needs it (called once per
        ``set_training_model``, on every rank); default: ``training_model`` itself.

        Args:
            training_model: The backend's training model (e.g. a ``torch.nn.Module`` returning the loss).
            device: The trainer's device, or None (the model's own).
        """
        return training_model

    def gradient_sync(self) -> GradientSync:
        """The gradient synchronisation of a step, for the model :meth:`prepare_training_model` returned last;
        default the null object (nothing to synchronise)."""
        return GradientSync()

    def training_dataset(self, dataset: Any) -> Any:
        """This rank's part of the training ``dataset`` (every sample on one rank per epoch); default all of it."""
        return dataset

    def evaluation_dataset(self, dataset: Any) -> Any:
        """This rank's part of an evaluation ``dataset`` (every sample evaluated once over all ranks); default all
        of it."""
        return dataset


class SingleProcess(Strategy):
    """One process: no process group, the model as it is, all the data, no collectives."""

    name = "single_process"

    def __init__(self) -> None:
        self._context = SerialContext()

    def distributed_context(self) -> DistributedContext:
        return self._context


def check_not_a_class(strategy: Any) -> None:
    """Raise when ``DefaultTrainer(strategy=...)`` was given a class where an object belongs.

    Raises:
        TypeError: ``strategy`` is a class (e.g. ``DDPStrategy`` for ``DDPStrategy()``); the message names both.
    """
    if isinstance(strategy, type):
        name = strategy.__qualname__
        raise TypeError(f"strategy is the class {name}; pass an object, e.g. {name}()")
