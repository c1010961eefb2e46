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
from typing import Any, Optional

from mlpug.checkpointing.sharded import ShardedCheckpoints
from mlpug.distributed import DistributedContext, SerialContext
from mlpug.trainers.gradient_sync import GradientSync
from mlpug.trainers.precision import PrecisionPolicy


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

    @property
    def shards_state(self) -> bool:
        """Whether the model and optimizer state are sharded over the ranks (FSDP): reading the whole state is then
        a collective of every rank, and training checkpoints are written by every rank. Default False."""
        return False

    def sharded_checkpoints(self) -> Optional[ShardedCheckpoints]:
        """How training checkpoints are written when :attr:`shards_state` (every rank its shards, see
        :mod:`mlpug.checkpointing.sharded`); default None: the state is whole on every rank, one file."""
        return None

    def training_precision(self, policy: PrecisionPolicy) -> PrecisionPolicy:
        """The precision policy the trainer applies itself, given the one its arguments ask for (called once, at the
        trainer's construction); a strategy whose engine applies mixed precision takes it over here and returns a
        full-precision policy. Default: ``policy`` itself.

        Raises:
            ValueError: The strategy cannot train in that precision (the message says what would).
        """
        return policy

    def prepare_optimizers(self, optimizers: dict[str, Any]) -> dict[str, Any]:
        """The optimizers for the model :meth:`prepare_training_model` returned (called right after it, on every
        rank); a strategy that replaced the parameters re-points the optimizers at the new ones. Default: as they are.

        Raises:
            ValueError: An optimizer cannot be re-pointed (e.g. it has state of the replaced parameters).
        """
        return optimizers

    def evaluation_models(self, training_model: Any, model_components: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The model that evaluation runs and its model components, given the training model before
        :meth:`prepare_training_model` wrapped it. Default: both as given (under DDP the module inside the wrapper:
        its forward pass has no collective)."""
        return training_model, model_components

    def prepare_evaluation(self) -> None:
        """Bring :meth:`evaluation_models` up to date with the trained weights; called on every rank at the same
        point, before an evaluation of the live weights. Default: nothing (they are the live weights)."""
        return None

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
