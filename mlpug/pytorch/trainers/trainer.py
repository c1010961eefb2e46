"""PyTorch ``DefaultTrainer``: one optimisation step, evaluation and state of modules and optimizers.

The step is composed of the neutral step parts (see :mod:`mlpug.trainers.trainer`), in this one place::

    zero_grad(set_to_none=True) for every optimizer
    result = chunking.run(chunk_step, batch)              # BatchChunking (null) or ChunkedBatch: chunk by chunk
        chunk_step: with gradient_sync.chunk_context(chunk):      # GradientSync (null); no_sync under DDP
                        with precision.autocast():                # FullPrecision (null) or MixedPrecision
                            outputs = training_model(chunk.data, ...)
                        [first chunk after add_first_batch_check: the first-batch checks on outputs]
                        precision.scale_loss(chunking.weigh_loss(outputs.loss, chunk)).backward()
    gradient_sync.reduce(None)                             # gradients live on the parameters
    clip_gradients()                                       # clip_gradients_norm / _value (unscaled first)
    skipped = precision.step(optimizers)                   # GradScaler may skip on inf/nan gradients
    return StepResult(result.outputs..., skipped, learning rate)

Without chunking and mixed precision this is exactly ``zero_grad(set_to_none=True); loss.backward();
optimizer.step()``.

With ``compile_step=True`` the training forward (device move, autocast, the training model; its backward is
compiled with it), the gradient update (clipping and ``precision.step``; not when every optimizer is fused) and the
evaluation forward are the parts that ``torch.compile`` compiles (:mod:`mlpug.pytorch.trainers.compilation`); the
rest of the step is the same.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor

from mlpug.checkpointing.sharded import ShardedCheckpoints, is_sharded
from mlpug.chunking import BatchChunk, ChunkResult
from mlpug.data import DataSource
from mlpug.distributed import DistributedContext
from mlpug.logs import to_number
from mlpug.pytorch.chunking import batch_chunker
from mlpug.pytorch.random_state import TorchRandomState
from mlpug.pytorch.sharded_checkpoint import initialize_optimizer_states, load_sharded_trainer_state, shard_like_live
from mlpug.pytorch.strategies import StrategyArgument, resolve_strategy
from mlpug.pytorch.trainers.compilation import CompileStep, compile_forward, compile_update, validate_compile_step
from mlpug.pytorch.trainers.precision import precision_policy
from mlpug.pytorch.trainers.snapshot import TorchEvaluationSnapshot
from mlpug.random_state import RandomStateProvider
from mlpug.trainers.clipping import validate_clipping
from mlpug.trainers.gradient_sync import GradientSync
from mlpug.trainers.precision import AutocastDtype, PrecisionPolicy
from mlpug.trainers.trainer import DefaultTrainer as _NeutralDefaultTrainer
from mlpug.trainers.trainer import ModelOutputs, StepResult


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


def _detached(outputs: ModelOutputs) -> ModelOutputs:
    """``outputs`` with the loss and every tensor of the auxiliary results detached."""
    return ModelOutputs(
        outputs.loss.detach(), outputs.num_samples, map_tensors(outputs.auxiliary_results, torch.Tensor.detach)
    )


class DefaultTrainer(_NeutralDefaultTrainer):
    """Trains a PyTorch training model: forward, backward and optimizer step for every batch.

    Args:
        optimizers: A ``torch.optim.Optimizer``, a list or a dict of them. Names (``"optimizer"``,
            ``"optimizer_<i>"`` or the dict keys) are the keys of their state in checkpoints.
        model_components: A ``torch.nn.Module``, a list or a dict of them: the modules whose state is saved
            (``"model"``, ``"model_<i>"`` or the dict keys).
        device: When given, every tensor of a batch is moved to this device before the forward pass.
        batch_chunk_size: Gradient accumulation: when given (int >= 1), every batch is split into chunks of at
            most this many samples (the last may be smaller, see :mod:`mlpug.chunking`); each chunk's
            loss is weighted by ``chunk_samples / batch_samples`` before its backward pass and the optimizers
            step once per batch. Peak activation memory is that of one chunk. The weights assume the loss is
            a mean over the samples (rows) of the chunk.
        use_mixed_precision: Run the forward pass under ``torch.autocast`` on the device type of ``device``
            (or, without ``device``, of the model components' first parameter at construction).
        autocast_dtype: ``"bfloat16"`` (default; works on CPU) or ``"float16"``, which adds loss scaling with a
            ``torch.amp.GradScaler`` (CUDA, and CPU in torch >= 2.3); its state is under ``"grad_scaler"`` in
            :meth:`get_state`. Only with ``use_mixed_precision=True``.
        clip_gradients_norm: Clip the gradients of each optimizer's parameters to this global L2 norm (float > 0;
            ``torch.nn.utils.clip_grad_norm_``) between backward and the optimizer step: after the chunks are
            accumulated and DDP all-reduced them, float16 gradients unscaled first (``GradScaler.unscale_``). See
            :mod:`mlpug.trainers.clipping` and :meth:`clip_gradients`.
        clip_gradients_value: Clip every gradient element to ``[-v, v]`` instead (``clip_grad_value_``).
        compile_step: ``True`` or a dict of ``torch.compile`` keyword arguments (e.g. ``{"backend": "aot_eager"}``,
            ``{"mode": "max-autotune-no-cudagraphs"}``; not ``fullgraph``): compile the tensor work of the step
            and of :meth:`evaluate_loss` with ``torch.compile`` (:mod:`mlpug.pytorch.trainers.compilation`): the
            training forward (its backward is compiled with it), clipping and the optimizer step (left eager when
            every optimizer is fused: one kernel already), and the evaluation forward. The first dimension of
            every batch tensor is marked dynamic, so the smaller last batch (or chunk) does not recompile. The first
            steps take the compile time; results equal the eager ones up to float
            rounding (compiled kernels sum in another order). It composes with chunking, mixed precision, clipping,
            the non-finite skip, DDP and resume (the model components and optimizers are not wrapped: their state
            is the same). Default ``False``: nothing is compiled and the step is exactly as described above.
            Asynchronous evaluation (``TestMetricsLogger(run_async=True)``) evaluates its snapshot eagerly.
        strategy: How training is distributed: None (default: ``"ddp"`` under a data-parallel launch, else
            ``"single_process"``), one of those names, or a :class:`~mlpug.trainers.strategy.Strategy` object (e.g.
            a subclass of :class:`~mlpug.pytorch.strategies.ddp.DDPStrategy`, or one of your own).

    When the scaler skips an optimizer step (inf/nan gradients), the step's ``StepResult.optimizer_step_skipped``
    is True; the ``TrainingManager`` reports it in ``logs``.

    With chunking, :meth:`train_on` returns the sample-weighted batch loss (``sum_i weight_i * loss_i``, a
    detached tensor), ``num_samples`` summed over the chunks and ``auxiliary_results`` merged over the chunks
    by the rule of :mod:`mlpug.chunking` (the same on every backend).

    Distribution is the strategy's (``strategy``, :mod:`mlpug.trainers.strategy`): its distributed context, the
    training model it wraps in :meth:`set_training_model`, its :attr:`gradient_sync`, and the part of the training
    and evaluation datasets each rank gets (:meth:`training_data_source`, :meth:`evaluation_dataset`). Under a
    data-parallel launch (``torchrun``, or :func:`mlpug.pytorch.distributed.launch`; see
    :mod:`mlpug.pytorch.distributed`) the default is :class:`~mlpug.pytorch.strategies.ddp.DDPStrategy`: the
    trainer joins the process group at construction, wraps the training model in ``DistributedDataParallel``
    (parameters broadcast from rank 0), all-reduces gradients once per batch (in the last chunk's backward pass) and
    shards the datasets by rank. ``StepResult`` holds this rank's loss and outputs; the manager and the metric
    loggers reduce them over the ranks. Under ``non_finite_loss="skip_step"`` the trainer waits for the loss over
    all ranks before the optimizer step, so that every rank skips the same steps. Batch sizes are per rank (as in
    a ``DataLoader`` per process); evaluation runs the unwrapped model (no collective).

    The training model, set with :meth:`set_training_model`, is a ``torch.nn.Module`` whose
    ``forward(batch_data, evaluate_settings, inference_mode=None)`` returns the loss (see
    :class:`mlpug.trainers.trainer.DefaultTrainer` for the accepted return forms).

    Raises:
        TypeError: An optimizer or model component has the wrong type, or ``use_mixed_precision`` is no bool.
        ValueError: ``batch_chunk_size`` is not an int >= 1, or ``autocast_dtype`` is not an accepted name
            (or is given without ``use_mixed_precision=True``), or a clipping option is not a number > 0 (or both
            are given), or ``compile_step`` holds a key that ``torch.compile`` does not take (or ``fullgraph``).
        TypeError: ``compile_step`` is neither a bool nor a dict.
        RuntimeError / ValueError: A launch environment that is incomplete or invalid (``WORLD_SIZE`` set without
            ``RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``, or not an int); ``strategy="ddp"`` in a single process; an
            unknown ``strategy`` name (the valid ones are listed).
    """

    optimizer_type = torch.optim.Optimizer
    model_component_type = torch.nn.Module

    def __init__(
        self,
        optimizers: Any,
        model_components: Any,
        device: Optional[str | torch.device] = None,
        batch_chunk_size: Optional[int] = None,
        use_mixed_precision: bool = False,
        autocast_dtype: Optional[AutocastDtype] = None,
        clip_gradients_norm: Optional[float] = None,
        clip_gradients_value: Optional[float] = None,
        compile_step: CompileStep = False,
        strategy: StrategyArgument = None,
    ):
        super().__init__(optimizers, model_components)
        self.clip_gradients_norm, self.clip_gradients_value = validate_clipping(
            clip_gradients_norm, clip_gradients_value
        )
        self.compile_options = validate_compile_step(compile_step)
        self.strategy = resolve_strategy(strategy)
        self._distributed = self.strategy.distributed_context()
        self._evaluation_model: Any = None
        self._evaluation_components: dict[str, torch.nn.Module] = {}
        self._evaluation_is_current = True  # False after a step until prepare_evaluation (sharded state)
        self.device = torch.device(device) if device is not None else None
        self._passes_inference_mode = True
        self.chunking = batch_chunker(batch_chunk_size)
        self.precision: PrecisionPolicy = self.strategy.training_precision(
            precision_policy(use_mixed_precision, autocast_dtype, self._device_type())
        )
        self.optimizers = self.precision.prepare_optimizers(self.optimizers)
        self._optimizer_list = list(self.optimizers.values())
        self.gradient_sync = GradientSync()
        # What the step and evaluate_loss call: these methods, or (compile_step) their compiled versions.
        self._training_forward: Callable[..., Any] = self._run_model
        self._evaluation_forward: Callable[..., Any] = self._run_evaluation_model
        self._update: Callable[[], Any] = self._clip_and_step
        if self.compile_options is not None:
            self._training_forward = compile_forward(self._run_model, self.compile_options)
            self._evaluation_forward = compile_forward(self._run_evaluation_model, self.compile_options)
            self._update = self._choose_compiled_update

    def _device_type(self) -> str:
        """Device type for autocast: that of ``device``, else of the first model component parameter, else cpu."""
        if self.device is not None:
            return self.device.type
        for module in self.model_components.values():
            for parameter in module.parameters():
                return parameter.device.type
        return "cpu"

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
        device = self.device if self.device is not None else self._first_parameter_device()
        self.training_model = self.strategy.prepare_training_model(training_model, device)
        self.optimizers = self.strategy.prepare_optimizers(self.optimizers)
        self._optimizer_list = list(self.optimizers.values())
        self._evaluation_model, self._evaluation_components = self.strategy.evaluation_models(
            training_model, self.model_components
        )
        self._evaluation_is_current = True
        self.gradient_sync = self.strategy.gradient_sync()

    def _first_parameter_device(self) -> Optional[torch.device]:
        for module in self.model_components.values():
            for parameter in module.parameters():
                return parameter.device
        return None

    def distributed_context(self) -> DistributedContext:
        """The strategy's ranks and collectives (one process: the single-process context)."""
        return self._distributed

    def training_data_source(self, dataset: Any) -> DataSource:
        """This rank's part of ``dataset`` (the strategy's; DDP: see
        :func:`mlpug.pytorch.distributed.shard_training_dataset`), then as in one process."""
        return super().training_data_source(self.strategy.training_dataset(dataset))

    def evaluation_dataset(self, dataset: Any) -> Any:
        """This rank's part of ``dataset`` (the strategy's; DDP: its unpadded shard, see
        :func:`mlpug.pytorch.distributed.shard_evaluation_dataset`)."""
        return self.strategy.evaluation_dataset(dataset)

    def evaluation_snapshot(self) -> TorchEvaluationSnapshot:
        """A frozen copy of the training model for asynchronous evaluation (see
        :class:`~mlpug.pytorch.trainers.snapshot.TorchEvaluationSnapshot`)."""
        self.ensure_ready()
        return TorchEvaluationSnapshot(
            self._evaluation_model,
            self._evaluation_components,
            self._eager_forward,
            live_model=self.training_model if self.strategy.shards_state else None,
        )

    def prepare_evaluation(self) -> None:
        """The strategy's (FSDP: gathers the sharded weights into the evaluation copy; call on every rank)."""
        self.strategy.prepare_evaluation()
        self._evaluation_is_current = True

    def _is_scalar_loss(self, loss: Any) -> bool:
        return isinstance(loss, torch.Tensor) and loss.numel() == 1

    def random_state_providers(self) -> list[RandomStateProvider]:
        """Python, NumPy and torch (CPU and initialised CUDA devices) generators."""
        return [*super().random_state_providers(), TorchRandomState()]

    def _run_model(self, model: Any, batch: Any, settings: Any, inference_mode: bool) -> Any:
        """What the training model returns for ``batch`` (moved to ``device``, under the precision's autocast)."""
        if self.device is not None:
            batch = map_tensors(batch, lambda t: t.to(self.device, non_blocking=True))
        with self.precision.autocast():
            if self._passes_inference_mode:
                return model(batch, settings, inference_mode)
            return model(batch, settings)

    def _run_evaluation_model(self, model: Any, batch: Any, settings: Any, inference_mode: bool) -> Any:
        """:meth:`_run_model` under ``torch.no_grad()`` (a function of its own, so compiled apart from training)."""
        with torch.no_grad():
            return self._run_model(model, batch, settings, inference_mode)

    def _forward(
        self,
        batch: Any,
        settings: Any,
        inference_mode: bool,
        chunk: Optional[BatchChunk] = None,
        model: Any = None,
        run: Optional[Callable[..., Any]] = None,
    ) -> ModelOutputs:
        """The normalised outputs of ``run(model, batch, settings, inference_mode)`` (default :meth:`_run_model`,
        eager; the step and evaluation pass their compiled forwards)."""
        model = model if model is not None else self.training_model
        results = (run if run is not None else self._run_model)(model, batch, settings, inference_mode)
        return self._normalise_outputs(results, batch, chunk)

    def _eager_forward(self, model: torch.nn.Module, batch: Any, settings: Any, inference_mode: bool) -> ModelOutputs:
        """The normalised outputs of ``model`` for ``batch`` by :meth:`_run_model` (never compiled): the forward
        pass of the evaluation snapshot (:class:`~mlpug.pytorch.trainers.snapshot.EvaluationForward`)."""
        return self._forward(batch, settings, inference_mode, model=model)

    def train_on(self, batch: Any, training_settings: Any = None) -> StepResult:
        """One optimisation step: zero gradients, forward and backward per chunk, step every optimizer once.

        Args:
            batch: A tensor, or a tuple/list/dict of tensors (with ``batch_chunk_size``, all with the same
                first dimension, the samples).
            training_settings: Passed to the training model as ``evaluate_settings``.

        Returns:
            StepResult with the loss and auxiliary results detached (see the class docstring for chunking),
            whether the float16 grad scaler skipped the step, and the learning rate of the first optimizer.

        Raises:
            TypeError / ValueError: With ``batch_chunk_size``, the batch cannot be split into chunks, or the
                training model returns a ``num_samples`` other than the chunk's rows (chunks are weighted by rows).
        """
        self.ensure_ready()
        model = self.training_model
        if not model.training:
            model.train()
        self._evaluation_is_current = False
        for optimizer in self._optimizer_list:
            optimizer.zero_grad(set_to_none=True)
        result = self.chunking.run(partial(self._chunk_step, training_settings), batch)
        self.gradient_sync.reduce(result.gradients)
        outputs = result.outputs
        if self.skip_non_finite_steps and not self._is_finite(outputs.loss, outputs.num_samples):
            skipped: Any = True
        else:
            skipped = self._update()
        return StepResult(outputs.loss, outputs.num_samples, outputs.auxiliary_results, skipped, self._learning_rate())

    def _choose_compiled_update(self) -> Any:
        """``compile_step``, at the first update: compile it, unless every optimizer steps with its fused
        implementation (one kernel already: compiling it would only add Dynamo's per-call work); then update, and
        from now on call the choice directly."""
        fused = all(group.get("fused") for optimizer in self._optimizer_list for group in optimizer.param_groups)
        options = self.compile_options or {}
        self._update = self._clip_and_step if fused else compile_update(self._clip_and_step, options)
        return self._update()

    def _clip_and_step(self) -> Any:
        """The gradient update: :meth:`clip_gradients`, then every optimizer steps (``precision.step``); whether a
        step was skipped (float16 loss scaling)."""
        self.clip_gradients()  # only before a step: GradScaler.unscale_ must be followed by scaler.step
        return self.precision.step(self.optimizers)

    def clip_gradients(self) -> None:
        """Clip the accumulated gradients before the optimizer step (``clip_gradients_norm`` / ``_value``); a hook
        that subclasses may override (it runs on every rank after DDP's all-reduce, and is a no-op without a
        clipping option). Under float16 loss scaling every optimizer's gradients are unscaled first
        (``GradScaler.unscale_``; the scaler's step then does not unscale again). One norm per optimizer, over
        its parameters."""
        if self.clip_gradients_norm is None and self.clip_gradients_value is None:
            return
        scaler = getattr(self.precision, "grad_scaler", None)
        for optimizer in self._optimizer_list:
            if scaler is not None:
                scaler.unscale_(optimizer)
            parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if self.clip_gradients_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, self.clip_gradients_norm)
            else:
                torch.nn.utils.clip_grad_value_(parameters, float(self.clip_gradients_value or 0.0))

    def _is_finite(self, loss: torch.Tensor, num_samples: Any) -> bool:
        """Whether the batch loss is finite: on this rank (waits for the device), or with several ranks over all
        ranks (waits for an all-reduce too), so that every rank skips the same steps."""
        if self._distributed.world_size > 1:
            return math.isfinite(self._distributed.all_reduce_weighted([(loss, num_samples)])[0][0])
        return bool(torch.isfinite(loss).all())

    def _chunk_step(self, training_settings: Any, chunk: BatchChunk) -> ChunkResult:
        """Forward and backward pass of one chunk (the whole batch without chunking); outputs detached."""
        with self.gradient_sync.chunk_context(chunk):
            outputs = self._forward(chunk.data, training_settings, False, chunk, run=self._training_forward)
            if self._first_batch_checks:  # the first chunk trained after add_first_batch_check: before its backward
                self._check_first_batch(chunk.data, outputs)
            self.precision.scale_loss(self.chunking.weigh_loss(outputs.loss, chunk)).backward()
        return ChunkResult(  # written out: this runs at every step
            ModelOutputs(
                outputs.loss.detach(), outputs.num_samples, map_tensors(outputs.auxiliary_results, torch.Tensor.detach)
            )
        )

    def _check_first_batch(self, batch: Any, outputs: ModelOutputs) -> None:
        """The first-batch checks (:meth:`add_first_batch_check`) on the detached outputs of the step's own forward
        pass, without gradient recording."""
        with torch.no_grad():
            self._run_first_batch_checks(batch, _detached(outputs))

    def non_finite_indices(self, values: Sequence[Any]) -> list[int]:
        """Positions of the non-finite scalar ``values`` (tensors or numbers): one stacked check, one device wait."""
        if not values:
            return []
        first = next((value for value in values if isinstance(value, torch.Tensor)), None)
        device = first.device if first is not None else "cpu"
        stacked = torch.stack(
            [
                torch.as_tensor(value if isinstance(value, torch.Tensor) else to_number(value), device=device)
                .detach()
                .reshape(())
                .to(torch.float64)
                for value in values
            ]
        )
        return (~torch.isfinite(stacked)).nonzero().flatten().tolist()

    def non_finite_weights(self) -> list[str]:
        """``"<component>.<parameter>"`` of the trainable parameters (``requires_grad``) of the model components
        that hold NaN / inf: one ``isfinite(...).all()`` per parameter on its device, one transfer per device
        (data-parallel: this rank's replica, the same on every rank)."""
        named = [
            (f"{component}.{name}", parameter)
            for component, module in self.model_components.items()
            for name, parameter in module.named_parameters()
            if parameter.requires_grad and not isinstance(parameter, torch.nn.parameter.UninitializedParameter)
        ]
        flags: dict = {}  # device -> [(index, finite flag)]
        sharded = False
        with torch.no_grad():
            for index, (_, parameter) in enumerate(named):
                if isinstance(parameter, DTensor):  # this rank's shard; the ranks agree below
                    parameter, sharded = parameter.to_local(), True
                flags.setdefault(parameter.device, []).append((index, torch.isfinite(parameter).all()))
            finite = [True] * len(named)
            for entries in flags.values():
                for (index, _), is_finite in zip(entries, torch.stack([flag for _, flag in entries]).cpu().tolist()):
                    finite[index] = bool(is_finite)
        if sharded:  # one collective: a parameter is finite when its shards are finite on every rank
            bad_counts = self._distributed.all_reduce_sum([0.0 if is_finite else 1.0 for is_finite in finite])
            finite = [count == 0 for count in bad_counts]
        return [named[index][0] for index, is_finite in enumerate(finite) if not is_finite]

    def _learning_rate(self) -> Any:
        """``lr`` of the first optimizer's first parameter group: a float, or (a tensor learning rate, which
        schedulers update in place) a copy made now on its device, converted only when read."""
        lr = self._optimizer_list[0].param_groups[0].get("lr")
        return lr.detach().clone() if isinstance(lr, torch.Tensor) else lr

    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """Evaluate the training model on ``batch`` in eval mode under ``torch.no_grad()``; the mode is restored.

        With mixed precision the forward pass runs under the same autocast as in training. Batches are not
        chunked here; the ``MetricEvaluator`` has its own ``batch_chunk_size``.
        """
        self.ensure_ready()
        if not self._evaluation_is_current and self.strategy.shards_state:
            raise RuntimeError(
                f"evaluate_loss under strategy {self.strategy.name!r} evaluates a gathered copy of the model, which "
                "does not hold the weights of the steps since it was gathered: call trainer.prepare_evaluation() on "
                "every rank first (MetricEvaluator.evaluate_dataset does)"
            )
        model = self._evaluation_model  # data-parallel: the module inside DDP, whose forward has no collective
        was_training = model.training
        if was_training:
            model.eval()
        try:
            return self._forward(batch, evaluate_settings, inference_mode, model=model, run=self._evaluation_forward)
        finally:
            if was_training:
                model.train()

    def get_state(self) -> dict:
        """``{"model_components": {name: state_dict}, "optimizers": {name: state_dict}}`` (live references).

        With float16 mixed precision also ``"grad_scaler": GradScaler.state_dict()`` (scale and growth tracker).
        """
        return {
            "model_components": {name: module.state_dict() for name, module in self.model_components.items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            **self.precision.get_state(),
        }

    def set_state(self, state: dict) -> None:
        """Load the state of every model component and optimizer, and of the grad scaler when there is one.

        A ``"grad_scaler"`` state is ignored without float16 mixed precision; without one in ``state`` a
        float16 trainer keeps its current scaler.

        ``state`` may be sharded (read from a sharded training checkpoint, see
        :mod:`mlpug.pytorch.sharded_checkpoint`: its tensors are read into this trainer's, resharded to its ranks) or
        whole (under a sharding strategy every rank takes its shards of it); a collective then, on every rank.

        Raises:
            ValueError: The names in ``state`` do not match this trainer's components or optimizers.
            mlpug.checkpointing.CheckpointError: The shards cannot be read, or hold other tensors than the trainer.
        """
        sharded = is_sharded(state)
        self._check_state_names(state["plain"] if sharded else state)  # before anything is loaded
        self._evaluation_is_current = False  # the evaluation copy (sharded state) holds the weights before
        if sharded or self.strategy.shards_state:  # loaded into the live optimizer states: they must exist
            initialize_optimizer_states(self._optimizer_list)
        if sharded:
            state = load_sharded_trainer_state(state, self.get_state(), "the training checkpoint")
        elif self.strategy.shards_state:  # whole tensors (one process wrote them): this rank's shards of them
            state = shard_like_live(state, self.get_state())
        for kind, objects in (("model_components", self.model_components), ("optimizers", self.optimizers)):
            for name, obj in objects.items():
                obj.load_state_dict(state[kind][name])
        self.precision.set_state(state)

    def sharded_checkpoints(self) -> Optional[ShardedCheckpoints]:
        """The strategy's (FSDP: DCP); None when the state is not sharded."""
        return self.strategy.sharded_checkpoints()

    def set_learning_rate(self, learning_rate: float, optimizer_name: Optional[str] = None) -> None:
        """Set ``lr`` of every parameter group of the named optimizer, or of all optimizers."""
        for optimizer in self._selected_optimizers(optimizer_name):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate

    def get_learning_rate(self, optimizer_name: Optional[str] = None) -> Optional[float]:
        """``lr`` of the first parameter group of the named (default: first) optimizer, as a float."""
        optimizer = self.optimizers[optimizer_name] if optimizer_name else self._optimizer_list[0]
        lr = optimizer.param_groups[0].get("lr")
        return float(lr) if lr is not None else None
