"""``FSDPStrategy``: sharded data-parallel training with FSDP2 (``torch.distributed.fsdp.fully_shard``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mlpug.checkpointing.sharded import ShardedCheckpoints
from mlpug.distributed import DistributedContext
from mlpug.pytorch.distributed import (
    TorchDistributedContext,
    join_launch,
    shard_evaluation_dataset,
    shard_training_dataset,
    warn_if_random_states_differ,
)
from mlpug.pytorch.sharded_checkpoint import DCPShardedCheckpoints
from mlpug.pytorch.strategies.fsdp_gradient_sync import FSDPGradientSync
from mlpug.trainers.gradient_sync import GradientSync
from mlpug.trainers.precision import PrecisionPolicy
from mlpug.trainers.strategy import Strategy

ShardModules = Union[None, Sequence[type], Callable[[torch.nn.Module], bool]]
"""Which submodules of the training model are FSDP units of their own (see :class:`FSDPStrategy`)."""

DEFAULT_MIN_NUM_PARAMS = 10_000_000
"""The default size policy: a submodule whose parameters (outside its own units) number at least this many is a
unit of its own."""


class FSDPStrategy(Strategy):
    """Fully sharded data parallel (FSDP2): every rank holds a shard of every parameter, gradient and optimizer
    state; a unit's parameters are all-gathered for its forward and backward pass and its gradients reduce-scattered
    once per batch (in the last chunk's backward pass). Each rank trains and evaluates its shard of the data, as under
    :class:`~mlpug.pytorch.strategies.ddp.DDPStrategy`.

    Units: ``fully_shard`` is applied to the submodules the ``shard_modules`` policy names (children before parents),
    then to the training model (the root unit holds every parameter not in a unit of its own):

    * ``None`` (default): the size policy: a submodule whose parameters, not counting those of its units, number at
      least ``min_num_params`` is a unit;
    * a sequence of module classes (e.g. the transformer block class): every submodule of one of these classes;
    * a function ``module -> bool``: every submodule for which it returns True.

    Parameters are replaced by sharded ``DTensor`` parameters: the optimizers given to the ``DefaultTrainer`` are
    re-pointed at them (their parameter groups and hyper-parameters are kept; they must not have stepped yet).
    ``DefaultTrainer(use_mixed_precision=True)`` (bfloat16) becomes FSDP's ``MixedPrecisionPolicy(param_dtype=
    torch.bfloat16, reduce_dtype=torch.float32)``: parameters are gathered and computed in bfloat16, gradients
    reduced and stored in float32; no autocast. Buffers (e.g. BatchNorm statistics) are not sharded: before every
    training forward pass they are set to rank 0's (as DDP's ``broadcast_buffers`` does).

    Evaluation (synchronous and asynchronous) runs an unsharded copy of the whole model, which every rank keeps from
    ``set_training_model`` on (on the model's device) and into which :meth:`prepare_evaluation` gathers the weights;
    it evaluates in float32 (the mixed-precision policy is the sharded model's). Training checkpoints are sharded
    (:mod:`mlpug.pytorch.sharded_checkpoint`); model checkpoints hold the gathered weights.

    The process group is joined at construction as for DDP (:func:`~mlpug.pytorch.distributed.init_distributed`).

    Args:
        shard_modules: The unit policy (see above).
        min_num_params: The size policy's threshold (int >= 1); only with ``shard_modules=None``.
        reshard_after_forward: Free the gathered parameters after each unit's forward pass (and gather them again in
            backward): less memory, one more all-gather per unit (``fully_shard``'s argument).
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: Seconds a collective waits for the other ranks (default ``MLPUG_DISTRIBUTED_TIMEOUT_S`` or 300).

    Raises:
        TypeError: ``shard_modules`` is neither None, a sequence of classes nor a function.
        ValueError: ``min_num_params`` is not an int >= 1.
        ValueError: No data-parallel launch (``WORLD_SIZE`` unset or 1): FSDP needs several processes.
        RuntimeError: An incomplete launch environment (see ``DDPStrategy``).
    """

    name = "fsdp"

    def __init__(
        self,
        shard_modules: ShardModules = None,
        min_num_params: int = DEFAULT_MIN_NUM_PARAMS,
        reshard_after_forward: bool = True,
        backend: Optional[str] = None,
        timeout_s: Optional[float] = None,
    ):
        self._is_unit = _unit_policy(shard_modules, min_num_params)
        self.reshard_after_forward = reshard_after_forward
        self._context: TorchDistributedContext = join_launch("fsdp", backend, timeout_s)
        self._gradient_sync: GradientSync = GradientSync()
        self._mixed_precision = MixedPrecisionPolicy()
        self._unsharded_model: Optional[torch.nn.Module] = None
        self._copies: dict[int, Any] = {}  # id(live object) -> its unsharded copy (copy.deepcopy's memo)
        self._copy_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (unsharded copy, live sharded)
        self._parameter_map: dict[int, torch.nn.Parameter] = {}
        self._sharded_checkpoints: Optional[DCPShardedCheckpoints] = None

    def distributed_context(self) -> DistributedContext:
        return self._context

    @property
    def shards_state(self) -> bool:
        """True: the model and optimizer state are sharded over the ranks."""
        return True

    def sharded_checkpoints(self) -> ShardedCheckpoints:
        """:class:`~mlpug.pytorch.sharded_checkpoint.DCPShardedCheckpoints` (one per strategy)."""
        if self._sharded_checkpoints is None:
            self._sharded_checkpoints = DCPShardedCheckpoints(self._context)
        return self._sharded_checkpoints

    def training_precision(self, policy: PrecisionPolicy) -> PrecisionPolicy:
        """bfloat16 autocast becomes FSDP's ``MixedPrecisionPolicy`` (see the class docstring); returns the policy the
        trainer applies itself (full precision then).

        Raises:
            ValueError: float16 (its loss scaling is not supported under FSDP here; use bfloat16).
        """
        dtype = getattr(policy, "autocast_dtype", None)
        if dtype is None:
            return policy
        if dtype != "bfloat16":
            raise ValueError(
                f"autocast_dtype {dtype!r} with strategy 'fsdp': float16 loss scaling is not supported under FSDP "
                "here; use autocast_dtype='bfloat16' (FSDP's MixedPrecisionPolicy)"
            )
        self._mixed_precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        from mlpug.pytorch.trainers.precision import FullPrecision  # (mlpug.pytorch.trainers imports strategies)

        return FullPrecision()

    def prepare_training_model(self, training_model: Any, device: Any = None) -> Any:
        """``fully_shard`` the units of ``training_model`` (see the class docstring), in place; keeps an unsharded
        copy of it for evaluation (:meth:`unsharded_model`). Parameters are broadcast from rank 0 first, so every
        rank starts from the same weights (warns when the ranks' random states differ)."""
        if device is not None and device.type == "cuda":
            training_model.to(device)
        _broadcast_from_rank_0(training_model, self._context)
        self._copies = {}
        self._unsharded_model = copy.deepcopy(training_model, self._copies)
        self._unsharded_model.requires_grad_(False)
        names = {id(parameter): name for name, parameter in training_model.named_parameters()}
        options: dict = {"reshard_after_forward": self.reshard_after_forward, "mp_policy": self._mixed_precision}
        for module in _units(training_model, self._is_unit):
            fully_shard(module, **options)
        fully_shard(training_model, **options)
        sharded = dict(training_model.named_parameters())
        self._parameter_map = {key: sharded[name] for key, name in names.items()}
        unsharded = dict(self._unsharded_model.named_parameters())
        self._copy_pairs = [(unsharded[name], parameter) for name, parameter in sharded.items()]
        unsharded_buffers = dict(self._unsharded_model.named_buffers())
        self._copy_pairs += [(unsharded_buffers[name], buffer) for name, buffer in training_model.named_buffers()]
        self._gradient_sync = FSDPGradientSync(training_model)
        buffers = list(training_model.buffers())
        if buffers:  # as DDP does (broadcast_buffers): rank 0's buffers (e.g. BatchNorm statistics) before a forward
            training_model.register_forward_pre_hook(lambda module, inputs: _broadcast_buffers(module, buffers))
        warn_if_random_states_differ(self._context)
        return training_model

    def prepare_optimizers(self, optimizers: dict[str, Any]) -> dict[str, Any]:
        """Point every optimizer's parameter groups at the sharded parameters that replaced theirs.

        Raises:
            ValueError: An optimizer has state already (it stepped, or a state was loaded before
                ``set_training_model``): its state belongs to the replaced parameters.
        """
        for name, optimizer in optimizers.items():
            if optimizer.state:
                raise ValueError(
                    f"optimizer {name!r} has state already; under strategy 'fsdp' the parameters are replaced by "
                    "sharded ones in set_training_model, so create the optimizer fresh and load states after it (e.g. "
                    "with TrainingManager(resume_from=...))"
                )
            for group in optimizer.param_groups:
                group["params"] = [self._parameter_map.get(id(parameter), parameter) for parameter in group["params"]]
        return optimizers

    def evaluation_models(self, training_model: Any, model_components: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The unsharded copy of the training model made in :meth:`prepare_training_model`, and its copies of the
        model components (the weights of the last :meth:`prepare_evaluation`).

        Raises:
            RuntimeError: Before :meth:`prepare_training_model`.
            ValueError: A model component is not a module of the training model (it would not be sharded).
        """
        if self._unsharded_model is None:
            raise RuntimeError("FSDPStrategy.evaluation_models() before prepare_training_model()")
        components = {}
        for name, module in model_components.items():
            if id(module) not in self._copies:
                raise ValueError(
                    f"model component {name!r} ({type(module).__qualname__}) is not a module of the training model; "
                    "under strategy 'fsdp' every model component must be part of the training model"
                )
            components[name] = self._copies[id(module)]
        return self._unsharded_model, components

    def prepare_evaluation(self) -> None:
        """Gather the sharded parameters (and copy the buffers) into the unsharded evaluation copy: one all-gather
        per parameter, on every rank (call it at the same point on every rank)."""
        with torch.no_grad():
            for target, source in self._copy_pairs:
                target.copy_(source.full_tensor() if isinstance(source, DTensor) else source)

    def gradient_sync(self) -> GradientSync:
        """FSDP's: no reduce-scatter for every chunk of a batch but the last."""
        return self._gradient_sync

    def training_dataset(self, dataset: Any) -> Any:
        """This rank's shard (see :func:`mlpug.pytorch.distributed.shard_training_dataset`)."""
        return shard_training_dataset(dataset, self._context)

    def evaluation_dataset(self, dataset: Any) -> Any:
        """This rank's unpadded shard (see :func:`mlpug.pytorch.distributed.shard_evaluation_dataset`)."""
        return shard_evaluation_dataset(dataset, self._context)


def _unit_policy(shard_modules: ShardModules, min_num_params: int) -> Callable[[torch.nn.Module, int], bool]:
    """``is_unit(module, parameters outside its units)`` for the ``shard_modules`` policy."""
    if isinstance(min_num_params, bool) or not isinstance(min_num_params, int) or min_num_params < 1:
        raise ValueError(f"min_num_params must be an int >= 1, got {min_num_params!r:.100}")
    if shard_modules is None:
        return lambda module, num_params: num_params >= min_num_params
    if isinstance(shard_modules, (list, tuple)) and all(isinstance(item, type) for item in shard_modules):
        classes = tuple(shard_modules)
        return lambda module, num_params: isinstance(module, classes)
    if callable(shard_modules) and not isinstance(shard_modules, type):
        function = shard_modules
        return lambda module, num_params: bool(function(module))
    raise TypeError(
        "shard_modules must be None (the size policy), a list of module classes (e.g. [TransformerBlock]) or a "
        f"function module -> bool, got {shard_modules!r:.100}"
    )


def _units(root: torch.nn.Module, is_unit: Callable[[torch.nn.Module, int], bool]) -> list[torch.nn.Module]:
    """The submodules of ``root`` (not ``root`` itself) that ``is_unit`` names, children before their parents."""
    units: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> int:  # the parameters of module not inside a unit
        inside = sum(visit(child) for child in module.children())
        own = sum(parameter.numel() for parameter in module.parameters(recurse=False))
        if module is not root and is_unit(module, inside + own):
            units.append(module)
            return 0
        return inside + own

    visit(root)
    return units


def _broadcast_buffers(module: torch.nn.Module, buffers: list[torch.Tensor]) -> None:
    """Rank 0's ``buffers`` on every rank, before a training forward pass of ``module`` (a collective per buffer)."""
    import torch.distributed as dist

    if module.training:
        with torch.no_grad():
            for buffer in buffers:
                dist.broadcast(buffer, src=0)


def _broadcast_from_rank_0(model: torch.nn.Module, context: TorchDistributedContext) -> None:
    """Every parameter and buffer of ``model`` set to rank 0's values (as DDP does at its construction)."""
    import torch.distributed as dist

    if context.world_size == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
