"""JAX ``DefaultTrainer``: one optimisation step compiled with ``jax.jit`` over Flax NNX modules and optax
optimizers, evaluation, and state.

The step is composed of the neutral step parts (see :mod:`mlpug.trainers.trainer`), in this one place, whose null
objects give the plain step; all of it runs inside one compiled function of flat lists of arrays::

    step(trainable, optimizer_states, rest, batch, settings)          # jax.jit, buffers of the first three donated
        result, rest = run_chunks(chunking, chunk_step, batch, rest)  # null: one pass; ChunkedBatch: lax.scan
            chunk_step: loss, grads = jax.value_and_grad(forward, has_aux=True)(trainable)
                forward: model = nnx.merge(graphdef, precision.cast_parameters(trainable) + rest)
                         outputs = model(precision.cast_batch(chunk), settings, False)      # train() mode
                         loss = precision.cast_loss(outputs.loss)                          # bfloat16: float32
                         target = chunking.weigh_loss(precision.scale_loss(loss), chunk)
                         rest = the model's other variables after the pass (nnx.Rngs counts, batch statistics)
        gradients = gradient_sync.reduce(result.gradients)             # once per batch, after the last chunk
        gradients = clip_gradients(gradients per optimizer)            # clip_gradients_norm / _value
        precision.step(optimizers, gradients)                          # optax update + apply_updates, per optimizer
        [skip_non_finite_steps: every new value = where(isfinite(loss), new, old)]
        return new values, loss, num_samples, auxiliary_results, skipped, learning_rate

With ``steps_per_execution`` K > 1, up to K batches of the same shapes are stacked and this same step is the body of
a ``lax.scan`` over them in one compiled call (:mod:`mlpug.jax.trainers.stacked`).

The trainer keeps no copy of the weights: the step reads the values of the live ``nnx.Variable`` s and writes the new
ones back into them (:class:`~mlpug.jax.trainers.live_model.LiveModel`), so the user's modules always hold the
trained weights. It owns the optimizer states (:class:`~mlpug.jax.trainers.optimizers.OptaxOptimizers`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlpug.chunking import BatchChunk, ChunkResult
from mlpug.data import DataSource
from mlpug.distributed import DistributedContext
from mlpug.jax.checkpointing import to_numpy
from mlpug.jax.chunking import batch_chunker, run_chunks
from mlpug.jax.random_state import NnxRngStreams
from mlpug.jax.strategies import JaxStrategy, resolve_strategy
from mlpug.jax.trainers.clipping import clip_gradient_lists
from mlpug.jax.trainers.compilation import as_traceable, compile_step, from_traceable
from mlpug.jax.trainers.component_state import component_state, component_updates
from mlpug.jax.trainers.full_precision import FullPrecision
from mlpug.jax.trainers.live_model import LiveModel, component_parameters, path_name, rng_variables
from mlpug.jax.trainers.mixed_precision import MixedPrecision
from mlpug.jax.trainers.optimizers import OptaxOptimizers, injected_learning_rate
from mlpug.jax.trainers.precision import PrecisionPolicy
from mlpug.jax.trainers.snapshot import JaxEvaluationSnapshot
from mlpug.jax.trainers.stacked import StackedSteps, same_shape_runs, step_outputs
from mlpug.jax.trainers.traced_optimizer import TracedOptimizer
from mlpug.logs import to_number
from mlpug.random_state import RandomStateProvider
from mlpug.trainers.arguments import check_positive_int
from mlpug.trainers.clipping import validate_clipping
from mlpug.trainers.precision import validate_mixed_precision
from mlpug.trainers.trainer import DefaultTrainer as NeutralDefaultTrainer
from mlpug.trainers.trainer import ModelOutputs, StepResult


def _like(new: Any, old: Any) -> Any:
    """``new`` in the dtype of ``old`` (a forward pass in bfloat16 may give a batch statistic another dtype; the
    compiled step keeps every variable's dtype)."""
    if isinstance(new, jax.Array) and isinstance(old, jax.Array) and new.dtype != old.dtype:
        return new.astype(old.dtype)
    return new


@jax.jit
def _all_finite(values: list) -> jax.Array:
    """Per array of ``values`` whether all its elements are finite: a bool array ``[len(values)]``. One compiled
    function (once per signature of the weights), not one eager op per weight, each compiled on its first use."""
    return jnp.stack([jnp.all(jnp.isfinite(value)) for value in values])


class DefaultTrainer(NeutralDefaultTrainer):
    """Trains Flax NNX modules with optax optimizers; the step is compiled with ``jax.jit`` (module docstring).

    Args:
        optimizers: An ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-3)``), a list or a dict of them. Names
            (``"optimizer"``, ``"optimizer_<i>"`` or the dict keys) are the keys of their state in checkpoints. One
            optimizer updates the ``nnx.Param`` s of all model components; several optimizers must be named like the
            model components, each updating the parameters of its component. To read and set the learning rate
            (``get_learning_rate`` / ``set_learning_rate``, learning rate schedulers, ``logs``), make the optimizer
            with ``optax.inject_hyperparams``, e.g. ``optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)``.
        model_components: A ``flax.nnx.Module``, a list or a dict of them: the parts whose weights are trained and
            saved (``"model"``, ``"model_<i>"`` or the dict keys). The training model must hold and call them.
        batch_chunk_size: Gradient accumulation: when given (int >= 1), every batch is split into chunks of at most
            this many samples (the last may be smaller) inside the compiled step, each chunk's loss weighted by
            ``chunk_samples / batch_samples``, the gradients summed, and the optimizers step once per batch: the
            equal chunks are one ``lax.scan`` (the forward and backward pass compiled once, whatever their number),
            the smaller last chunk a pass of its own (see :mod:`mlpug.jax.chunking`). Batches must be arrays or
            tuples/lists/dicts of them; the weights assume the loss is a mean over the samples of the chunk.
        use_mixed_precision: Run the forward pass in ``bfloat16`` (the parameters and the model's inputs cast inside
            the step; the parameters, their gradients, the optimizer states and the loss stay float32; see
            :mod:`mlpug.jax.trainers.mixed_precision`).
        autocast_dtype: ``"bfloat16"`` (the default with ``use_mixed_precision=True``); ``"float16"`` is refused (it
            needs loss scaling).
        autocast_inputs: With mixed precision, the key paths of the batch parts that are the model's inputs, cast to
            bfloat16 (``["[0]"]``, ``["['image']"]``; ``[]``: none); default: the batch's first part (``batch[0]``,
            the first value of a dict as written); targets and other parts keep their dtypes.
        clip_gradients_norm: Clip the gradients of each optimizer to this global L2 norm (float > 0;
            ``optax.clip_by_global_norm``) after accumulation and before they are applied; see
            :mod:`mlpug.trainers.clipping` and :meth:`clip_gradients`.
        clip_gradients_value: Clip every gradient element to ``[-v, v]`` instead.
        strategy: None, ``"single_process"`` (one device), ``"data_parallel"`` (every batch split over a
            ``jax.sharding.Mesh`` of all devices, the training state replicated; see
            :class:`~mlpug.jax.strategies.DataParallelStrategy`) or a ``JaxStrategy``; None is ``"data_parallel"``
            when several JAX processes run (``jax.distributed.initialize()``), else ``"single_process"``. The strategy
            places the state when it enters the trainer and every batch before its step (see
            :mod:`mlpug.jax.strategies`).
        steps_per_execution: Run up to this many optimisation steps (int >= 1, default 1) in one compiled call: the
            manager hands :meth:`train_on_batches` that many batches of an epoch (fewer at the epoch's end, and where
            a callback needs the model sooner, e.g. a batch-level checkpoint; see
            :meth:`mlpug.trainers.callback.Callback.batches_until_model_access`); consecutive batches of the same
            shapes and constants are stacked along a new first dimension and the one-batch step runs for each in a
            ``lax.scan`` (the parameters, optimizer states and other variables, ``nnx.Rngs`` counts included, are
            its carry), then the batch hooks run for every batch with that batch's loss, outputs, skipped flag and
            learning rate. Weights, optimizer states, random streams and per-batch results are those of one step
            per call (bit-identical on CPU, tested with dropout, accumulation, bfloat16, clipping and a skipped
            non-finite step). A call of K batches is one dispatch instead of K and costs one stacking copy of the
            batches (``np.stack`` for NumPy batches, then one transfer). A batch of other shapes (the short last
            batch) goes to a call of its own, a call of one batch is :meth:`train_on`; each call length and batch
            shape is compiled once (see :mod:`mlpug.jax.trainers.stacked`).
        evaluation_steps_per_execution: Batches that :meth:`evaluate_losses` (dataset evaluation through the
            ``MetricEvaluator``) stacks into one compiled call, the same way (int >= 1; a ``lax.scan`` of the
            evaluation step, the values those of one batch per call); default ``steps_per_execution``.

    The training model, set with :meth:`set_training_model`, is a ``flax.nnx.Module`` whose ``__call__(batch_data,
    evaluate_settings, inference_mode=None)`` returns the loss (see :class:`mlpug.trainers.trainer.DefaultTrainer`
    for the accepted return forms). Inside the step it is rebuilt from its graph definition in ``train()`` mode
    (in ``eval()`` mode for evaluation in inference mode), whatever mode the live modules are in, as PyTorch's
    trainer calls ``train()`` / ``eval()``; the live modules' own modes are not changed. The graph definition holds
    the modules' static attributes as they were at :meth:`set_training_model`: call it again after changing one (see
    :mod:`mlpug.jax.trainers.live_model`). Every variable that training may change must belong to a model component,
    so that checkpoints hold it (:meth:`set_training_model` refuses others, e.g. a BatchNorm of the training model).

    Batches and settings: arrays (NumPy or JAX) and the Python numbers (``int``, ``float``, ``bool``) of a batch are
    traced (a number as a 0-d array, weakly typed like the Python number), so batches that differ only in their
    values share one compiled step; the other values of a batch (strings, None) and every value of the settings that
    is not an array are constants of the trace, so another value, like another batch shape (the short last batch),
    compiles the step once more (see :mod:`mlpug.jax.trainers.compilation`). A value the model needs as a Python
    number (a shape, a loop count) belongs in the settings.

    Donation: the compiled step donates the buffers of the variables' arrays to their new values, so an array read
    from a variable (``variable[...]``) is deleted by the next step; :meth:`set_training_model` copies every
    variable's array once, so arrays held before (an ``nnx.clone`` of a model component, the arrays of
    ``nnx.to_pure_dict(nnx.state(component))``, an array given to ``nnx.Param(array)``) stay valid and unchanged.
    Copy a value to keep it across steps (``np.asarray(variable[...])``); :meth:`get_state` returns copies.

    ``trainer.get_state()`` holds NumPy copies (one host transfer); the step itself never leaves the device, and its
    results (loss, outputs, whether the step was skipped, the learning rate) stay ``jax.Array`` s until read.

    Raises:
        TypeError: An optimizer is not an ``optax.GradientTransformation``, a model component not an
            ``nnx.Module``, ``use_mixed_precision`` not a bool, ``autocast_inputs`` not a list of strings (``[0]``
            included: write ``["[0]"]``), or ``strategy`` not a strategy.
        ValueError: Several optimizers not named like model components, a ``batch_chunk_size`` that is not an int
            >= 1, a bad ``autocast_dtype`` (``"float16"`` included), ``autocast_inputs`` without mixed precision or
            holding a string that is not a key path, a bad clipping option, an unknown ``strategy``
            name, ``"single_process"`` while several JAX processes run, or a ``steps_per_execution`` or
            ``evaluation_steps_per_execution`` that is not an int >= 1.
    """

    optimizer_type = optax.GradientTransformation
    model_component_type = nnx.Module

    def __init__(
        self,
        optimizers: Any,
        model_components: Any,
        batch_chunk_size: Optional[int] = None,
        use_mixed_precision: bool = False,
        autocast_dtype: Optional[str] = None,
        autocast_inputs: Optional[Sequence[str]] = None,
        clip_gradients_norm: Optional[float] = None,
        clip_gradients_value: Optional[float] = None,
        strategy: Any = None,
        steps_per_execution: int = 1,
        evaluation_steps_per_execution: Optional[int] = None,
    ):
        if isinstance(optimizers, optax.GradientTransformation):  # a named tuple: one optimizer, not a list of them
            optimizers = {"optimizer": optimizers}
        super().__init__(optimizers, model_components)
        self.clip_gradients_norm, self.clip_gradients_value = validate_clipping(
            clip_gradients_norm, clip_gradients_value
        )
        self.strategy: JaxStrategy = resolve_strategy(strategy)
        self.steps_per_execution = check_positive_int(steps_per_execution, "steps_per_execution")
        self.evaluation_steps_per_execution = (
            self.steps_per_execution
            if evaluation_steps_per_execution is None
            else check_positive_int(evaluation_steps_per_execution, "evaluation_steps_per_execution")
        )
        self.chunking = batch_chunker(batch_chunk_size)
        dtype = validate_mixed_precision(use_mixed_precision, autocast_dtype)
        if dtype is None and autocast_inputs is not None:
            raise ValueError(f"autocast_inputs={autocast_inputs!r} has no effect without use_mixed_precision=True")
        self.precision: PrecisionPolicy = FullPrecision() if dtype is None else MixedPrecision(dtype, autocast_inputs)
        self.gradient_sync = self.strategy.gradient_sync()
        self._trainable, self._component_names = self._trainable_parameters()
        self.optimizer_states = OptaxOptimizers(  # made when first needed, from the values then
            self.optimizers,
            lambda: {name: [v.get_raw_value() for v in variables] for name, variables in self._trainable.items()},
        )
        self._live: Optional[LiveModel] = None
        self._passes_inference_mode = True
        self._train_step: Any = None  # the compiled step of the training model (set_training_model)
        self._evaluate_step: Any = None
        self._stacked: Optional[StackedSteps] = None  # the steps of stacked batches (set_training_model)

    def _trainable_parameters(self) -> tuple[dict[str, list[nnx.Variable]], dict[int, str]]:
        """Per optimizer name, the ``nnx.Param`` s it updates (see the class docstring); and per variable ``id`` its
        name ``"<component>.<path>"``.

        Raises:
            ValueError: Several optimizers that are not named like the model components.
        """
        names: dict[int, str] = {}
        per_component: dict[str, list[nnx.Variable]] = {}
        for component_name, component in self.model_components.items():
            per_component[component_name] = []
            for path, variable in component_parameters(component):
                if id(variable) not in names:  # a parameter shared by two components belongs to the first
                    names[id(variable)] = f"{component_name}.{path_name(path)}"
                    per_component[component_name].append(variable)
        if len(self.optimizers) == 1:
            (name,) = self.optimizers
            return {name: [variable for variables in per_component.values() for variable in variables]}, names
        if set(self.optimizers) != set(self.model_components):
            raise ValueError(
                f"with several optimizers, each updates the model component of its name, but the optimizers are "
                f"named {sorted(self.optimizers)} and the model components {sorted(self.model_components)}: pass both "
                "as dicts with the same keys"
            )
        return {name: per_component[name] for name in self.optimizers}, names

    # ----- set-up -----
    def set_training_model(self, training_model: nnx.Module) -> None:
        """Set the model that returns the loss for a batch, split it for the compiled steps and compile them anew
        (the first call of each traces it).

        Every variable of the training model gets a copy of its array (once, here): the compiled training step
        donates the variables' buffers, and arrays that the user still holds (an ``nnx.clone`` of a model component,
        the arrays of ``nnx.to_pure_dict(nnx.state(component))`` taken before, an array given to
        ``nnx.Param(array)``) must not be deleted by it.

        Args:
            training_model: The ``nnx.Module`` that holds and calls the model components and returns the loss (see
                the class docstring). Its forward pass must not create or remove variables (create them in
                ``__init__``); the first training step raises ``ValueError`` otherwise.

        Raises:
            TypeError: ``training_model`` is not an ``nnx.Module``, or its ``__call__`` does not take
                ``(batch_data, evaluate_settings[, inference_mode])``.
            ValueError: A model component is not part of the training model (its parameters would never be trained),
                or the training model holds variables outside the model components that training may change and
                checkpoints would not save (e.g. the ``nnx.BatchStat`` s of a BatchNorm of the training model; their
                paths are named: pass their module as a model component).
        """
        if not isinstance(training_model, nnx.Module):
            raise TypeError(
                "training_model must be a flax.nnx.Module whose __call__(batch_data, evaluate_settings, "
                f"inference_mode=None) returns the loss; got a {type(training_model).__module__}."
                f"{type(training_model).__qualname__}"
            )
        parameters = inspect.signature(training_model.__call__).parameters.values()
        if any(p.kind is p.VAR_POSITIONAL for p in parameters):
            self._passes_inference_mode = True
        else:
            positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if len(positional) < 2:
                raise TypeError(
                    f"{type(training_model).__qualname__}.__call__ must accept (batch_data, evaluate_settings, "
                    f"inference_mode=None); it accepts ({', '.join(p.name for p in positional)})"
                )
            self._passes_inference_mode = len(positional) >= 3
        prepared = self.strategy.prepare_training_model(training_model)
        self._live = LiveModel(prepared, self._trainable, self._component_names, self.model_components)
        self.training_model = prepared
        self.optimizer_states.place(self.strategy.place_state)  # still made again from weights loaded later
        self._train_step = compile_step(
            self._train_step_function, donate_argnums=(0, 1, 2), static_argnames=("skip_non_finite",)
        )
        self._evaluate_step = compile_step(self._evaluate_step_function, static_argnames=("inference_mode",))
        self._stacked = StackedSteps(
            self._train_step_function,
            self._evaluate_step_function,
            self.strategy.place_batch,
            self.strategy.local_outputs,
            local_num_samples=self.strategy.local_num_samples,
        )

    def random_state_providers(self) -> list[RandomStateProvider]:
        """Python, NumPy and the ``nnx.Rngs`` streams of the training model (see :mod:`mlpug.jax.random_state`)."""
        return [*super().random_state_providers(), NnxRngStreams(self._rng_variables)]

    def _rng_variables(self) -> list[tuple[str, nnx.Variable]]:
        """The ``nnx.RngState`` variables of the training model (of the model components before it is set)."""
        if self._live is not None:
            live = self._live
            return [
                (path_name(path), variable)
                for path, variable in zip(live.paths, live.variables)
                if isinstance(variable, nnx.RngState)
            ]
        found, seen = [], set()
        for name, component in self.model_components.items():
            for path, variable in rng_variables(component):
                if id(variable) not in seen:
                    seen.add(id(variable))
                    found.append((f"{name}.{path_name(path)}", variable))
        return found

    def distributed_context(self) -> DistributedContext:
        """The strategy's processes and collectives (one process, any number of devices: the serial context)."""
        return self.strategy.distributed_context()

    def training_data_source(self, dataset: Any) -> DataSource:
        """This process's part of ``dataset`` (the strategy's, see
        :meth:`~mlpug.jax.strategies.DataParallelStrategy.training_dataset`), then as in one process."""
        return super().training_data_source(self.strategy.training_dataset(dataset))

    def evaluation_dataset(self, dataset: Any) -> Any:
        """This process's part of an evaluation ``dataset`` (the strategy's)."""
        return self.strategy.evaluation_dataset(dataset)

    def _call_model(self, model: nnx.Module, batch: Any, settings: Any, inference_mode: bool) -> Any:
        """Call the training model (a model of :meth:`LiveModel.merge`, inside a trace) as its ``__call__`` takes it.

        Args:
            model: The training model rebuilt inside the step.
            batch: The batch (or batch chunk), cast by the precision policy.
            settings: The training or evaluation settings.
            inference_mode: Passed as the third argument when ``__call__`` takes one (see
                :meth:`set_training_model`), else left out.

        Returns:
            What the training model returned (a loss, a tuple or a dict; see ``_normalise_outputs``).
        """
        if self._passes_inference_mode:
            return model(batch, settings, inference_mode)
        return model(batch, settings)

    # ----- the step (traced) -----
    def _train_step_function(
        self, trainable: tuple, states: tuple, rest: list, batch: Any, settings: Any, skip_non_finite: bool
    ) -> tuple:
        """The compiled training step (see the module docstring); its arguments and results are flat.

        Args:
            trainable: Per optimizer, the values of the parameters it updates (lists of arrays; donated).
            states: Per optimizer, its optax state (donated).
            rest: The values of the training model's other variables (:meth:`LiveModel.rest_values`; donated).
            batch: The batch as :func:`~mlpug.jax.trainers.compilation.as_traceable` gave it.
            settings: The training settings, likewise.
            skip_non_finite: Keep the old values when the loss is not finite (a constant of the trace).

        Returns:
            ``(trainable, states, rest, outputs, skipped, learning_rate)``: the new values in the structures of the
            arguments; ``(loss, num_samples, auxiliary_results)`` as traceable values; a 0-d bool array whether the
            step was skipped (None without ``skip_non_finite``); the first optimizer's injected learning rate or None.

        Raises:
            ValueError: The forward pass created or removed variables of the training model (see
                :meth:`LiveModel.rest_of`).
            TypeError / ValueError: What the model returned is not a loss, or the batch cannot be chunked.
        """
        live, precision = self._live, self.precision
        assert live is not None
        batch, settings = from_traceable(batch), from_traceable(settings)
        structure = jax.tree_util.tree_structure(trainable)

        def chunk_step(chunk: BatchChunk, rest_before: list) -> tuple[ChunkResult, list]:
            """One chunk's forward and backward pass; ``rest_before``: the other variables the chunk starts from
            (the carry of :func:`~mlpug.jax.chunking.run_chunks`)."""

            def forward(values: tuple) -> tuple:
                model = live.merge([precision.cast_parameters(group) for group in values], rest_before, False)
                results = self._call_model(model, precision.cast_batch(chunk.data), settings, False)
                outputs = self._normalise_outputs(results, chunk.data, chunk)
                loss = precision.cast_loss(jnp.reshape(outputs.loss, ()))  # bfloat16: float32
                new_rest = [_like(new, old) for new, old in zip(live.rest_of(model), rest_before)]
                target = self.chunking.weigh_loss(precision.scale_loss(loss), chunk)
                traced = as_traceable((loss, outputs.num_samples, outputs.auxiliary_results), "the model's outputs")
                return target, (traced, new_rest)

            (_, (traced, new_rest)), gradients = jax.value_and_grad(forward, has_aux=True)(tuple(trainable))
            return ChunkResult(ModelOutputs(*from_traceable(traced)), jax.tree_util.tree_leaves(gradients)), new_rest

        result, current_rest = run_chunks(
            self.chunking, chunk_step, batch, list(rest), jax.tree_util.tree_leaves(tuple(trainable))
        )
        gradient_leaves = self.gradient_sync.reduce(result.gradients)
        assert gradient_leaves is not None
        gradients = dict(zip(self.optimizers, jax.tree_util.tree_unflatten(structure, gradient_leaves)))
        gradients = self.clip_gradients(gradients)
        optimizers = {
            name: TracedOptimizer(transformation, state, values)
            for (name, transformation), state, values in zip(self.optimizers.items(), states, trainable)
        }
        self.precision.step(optimizers, gradients)
        new_trainable = tuple(optimizer.parameters for optimizer in optimizers.values())
        new_states = tuple(optimizer.state for optimizer in optimizers.values())
        new_rest = current_rest
        loss = jnp.reshape(result.outputs.loss, ())
        skipped = None
        if skip_non_finite:  # decided in the graph: the old values are kept when the loss is not finite
            finite = jnp.isfinite(loss)

            def keep(new: Any, old: Any) -> Any:
                return jnp.where(finite, new, old)

            new_trainable = jax.tree_util.tree_map(keep, new_trainable, tuple(trainable))
            new_states = jax.tree_util.tree_map(keep, new_states, tuple(states))
            new_rest = jax.tree_util.tree_map(keep, list(new_rest), list(rest))
            skipped = jnp.logical_not(finite)
        outputs = as_traceable(
            (loss, result.outputs.num_samples, result.outputs.auxiliary_results), "the model's outputs"
        )
        return new_trainable, new_states, new_rest, outputs, skipped, injected_learning_rate(new_states[0])

    def _evaluate_step_function(
        self, trainable: tuple, rest: list, batch: Any, settings: Any, inference_mode: bool
    ) -> Any:
        """The compiled evaluation: one forward pass (``eval()`` mode for ``inference_mode``), nothing updated."""
        live, precision = self._live, self.precision
        assert live is not None
        batch, settings = from_traceable(batch), from_traceable(settings)
        model = live.merge([precision.cast_parameters(group) for group in trainable], rest, inference_mode)
        results = self._call_model(model, precision.cast_batch(batch), settings, inference_mode)
        outputs = self._normalise_outputs(results, batch)
        loss = precision.cast_loss(jnp.reshape(outputs.loss, ()))
        return as_traceable((loss, outputs.num_samples, outputs.auxiliary_results), "the model's outputs")

    def clip_gradients(self, gradients: dict[str, list]) -> dict[str, list]:
        """Clip each optimizer's gradients before they are applied (``clip_gradients_norm``:
        ``optax.clip_by_global_norm`` over that optimizer's gradients; ``clip_gradients_value``: every element to
        ``[-v, v]``; see :func:`mlpug.jax.trainers.clipping.clip_gradient_lists`); part of the compiled step, and a
        hook that subclasses may override. Without a clipping option the gradients as they are."""
        return clip_gradient_lists(gradients, self.clip_gradients_norm, self.clip_gradients_value)

    # ----- the BackendTrainer contract -----
    def train_on(self, batch: Any, training_settings: Any = None) -> StepResult:
        """One optimisation step on ``batch`` (arrays, or tuples/lists/dicts of them), compiled.

        Returns:
            StepResult: the loss (0-d ``jax.Array``), ``num_samples`` (an int, or an array when the model returns
            one), the auxiliary results (arrays; merged over chunks), whether the step was skipped (``False``, or a
            0-d bool array under ``skip_non_finite_steps``) and the first optimizer's learning rate of this step (a
            0-d array, or None when it was not made with ``optax.inject_hyperparams``).

        Raises:
            RuntimeError: No training model (see :meth:`set_training_model`).
            TypeError / ValueError: What the model returned is not a loss (see ``_normalise_outputs``), or the batch
                cannot be traced or chunked (the messages say why).
            ValueError: The strategy refuses the batch or the step's outputs (several JAX processes: a batch it
                cannot split over the mesh, a value without a sample axis, an auxiliary result reduced over the
                batch, a model's own ``num_samples``; see
                :meth:`~mlpug.jax.strategies.DataParallelStrategy.place_batch`,
                :meth:`~mlpug.jax.strategies.DataParallelStrategy.local_outputs`,
                :meth:`~mlpug.jax.strategies.DataParallelStrategy.local_num_samples`).
        """
        self.ensure_ready()
        live = self._live
        assert live is not None
        # where the step reads it (split over a mesh's devices ...); placed traceable, so its dicts keep their order
        placed = self.strategy.place_batch(as_traceable(batch, "the batch", trace_numbers=True))
        if self._first_batch_checks:  # on the outputs of one evaluation in inference mode, before the step
            self._run_first_batch_checks(batch, self.evaluate_loss(batch, training_settings, inference_mode=True))
        trainable, states, rest, outputs, skipped, learning_rate = self._train_step(
            live.trainable_values(),
            self.optimizer_states.state_tuple(),
            live.rest_values(),
            placed,
            as_traceable(training_settings, "the training settings"),
            skip_non_finite=bool(self.skip_non_finite_steps),
        )
        live.write(trainable, rest)
        self.optimizer_states.set_state_tuple(states)
        loss, num_samples, auxiliary_results = step_outputs(outputs, self.strategy.local_outputs)
        num_samples = self.strategy.local_num_samples(num_samples, batch)  # this process's count (several processes)
        return StepResult(loss, num_samples, auxiliary_results, False if skipped is None else skipped, learning_rate)

    def train_on_batches(self, batches: Sequence[Any], training_settings: Any = None) -> list[StepResult]:
        """One optimisation step per batch, up to ``steps_per_execution`` of them in one compiled call (see the class
        docstring): consecutive batches of the same shapes and constants are stacked and trained in a ``lax.scan``
        of the one-batch step; a batch of its own shape (the short last batch) goes to a call of its own
        (:meth:`train_on` when it is alone). With ``steps_per_execution=1`` or one batch: :meth:`train_on` per
        batch.

        Args:
            batches: The batches, in order (each as :meth:`train_on` takes it).
            training_settings: As for :meth:`train_on` (the same for every batch).

        Returns:
            One :class:`StepResult` per batch, in order, with the values :meth:`train_on` batch by batch gives
            (bit for bit on CPU): that batch's loss, ``num_samples``, auxiliary results, whether its step was
            skipped and its learning rate; arrays stay on the device.

        Raises:
            RuntimeError: No training model (see :meth:`set_training_model`).
            TypeError / ValueError: As :meth:`train_on` (the model's outputs, a batch that cannot be traced or
                chunked, or that the strategy cannot split).
        """
        if self.steps_per_execution == 1 or len(batches) < 2:
            return super().train_on_batches(batches, training_settings)
        self.ensure_ready()
        live, stacked = self._live, self._stacked
        assert live is not None and stacked is not None
        if self._first_batch_checks:  # as in train_on: before the first step, on its batch (this process's part)
            first = batches[0]
            self._run_first_batch_checks(first, self.evaluate_loss(first, training_settings, inference_mode=True))
        traceable = [as_traceable(batch, "the batch", trace_numbers=True) for batch in batches]
        settings = as_traceable(training_settings, "the training settings")
        results: list[StepResult] = []
        for run in same_shape_runs(traceable, self.steps_per_execution):
            if len(run) == 1:
                results.append(self.train_on(batches[run[0]], training_settings))
            else:
                run_batches = [traceable[index] for index in run]
                results.extend(
                    stacked.train(live, self.optimizer_states, run_batches, settings, bool(self.skip_non_finite_steps))
                )
        return results

    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """Evaluate the training model on ``batch`` without gradients and without changing any variable (compiled;
        ``eval()`` mode when ``inference_mode``).

        Args:
            batch: Arrays, Python numbers (traced) and other hashable values (constants), in tuples/lists/dicts; see
                the class docstring.
            evaluate_settings: Any hashable values and arrays; values that are not arrays are constants of the trace.
            inference_mode: Run the model in ``eval()`` mode (dropout off, running batch statistics) and pass
                ``inference_mode=True`` to it; False: ``train()`` mode (random draws, but no stream advances).

        Returns:
            ModelOutputs: the loss (0-d ``jax.Array``), ``num_samples`` and the auxiliary results (arrays stay on
            the device).

        Raises:
            RuntimeError: No training model (see :meth:`set_training_model`).
            TypeError / ValueError: What the model returned is not a loss, or the batch or settings hold a value that
                is neither an array nor hashable (the messages say why).
            ValueError: The strategy refuses the batch or the outputs (several JAX processes; as :meth:`train_on`).
        """
        self.ensure_ready()
        live = self._live
        assert live is not None
        return self._evaluate_values(
            live.trainable_values(), live.rest_values(), batch, evaluate_settings, bool(inference_mode)
        )

    def evaluate_losses(
        self, batches: Sequence[Any], evaluate_settings: Any = None, inference_mode: bool = True
    ) -> list[ModelOutputs]:
        """:meth:`evaluate_loss` of each batch, up to ``evaluation_steps_per_execution`` of them in one compiled call
        (stacked and evaluated in a ``lax.scan`` of the evaluation step, as :meth:`train_on_batches`); a batch of
        its own shape alone through :meth:`evaluate_loss`. The same values as :meth:`evaluate_loss` batch by batch.

        Raises:
            RuntimeError: No training model (see :meth:`set_training_model`).
            TypeError / ValueError: As :meth:`evaluate_loss`.
        """
        self.ensure_ready()
        live = self._live
        assert live is not None
        return self._evaluate_values_of_batches(
            live.trainable_values(), live.rest_values(), batches, evaluate_settings, bool(inference_mode)
        )

    def _evaluate_values(
        self, trainable: Sequence[Sequence[Any]], rest: Sequence[Any], batch: Any, settings: Any, inference_mode: bool
    ) -> ModelOutputs:
        """The compiled evaluation of the training model with the given values (the live ones, or a snapshot's;
        see :data:`mlpug.jax.trainers.snapshot.EvaluateValues`)."""
        outputs = self._evaluate_step(
            tuple(trainable),
            list(rest),
            self.strategy.place_batch(as_traceable(batch, "the batch", trace_numbers=True)),  # dicts in their order
            as_traceable(settings, "the evaluation settings"),
            inference_mode=inference_mode,
        )
        loss, num_samples, auxiliary_results = step_outputs(outputs, self.strategy.local_outputs)
        return ModelOutputs(loss, self.strategy.local_num_samples(num_samples, batch), auxiliary_results)

    def _evaluate_values_of_batches(
        self,
        trainable: Sequence[Sequence[Any]],
        rest: Sequence[Any],
        batches: Sequence[Any],
        settings: Any,
        inference_mode: bool,
    ) -> list[ModelOutputs]:
        """:meth:`_evaluate_values` of each batch with the given values, up to ``evaluation_steps_per_execution``
        batches of the same shapes stacked into one compiled call (see :meth:`evaluate_losses`; the values the live
        ones or a snapshot's, :data:`mlpug.jax.trainers.snapshot.EvaluateValuesOfBatches`)."""
        if self.evaluation_steps_per_execution == 1 or len(batches) < 2:
            return [self._evaluate_values(trainable, rest, batch, settings, inference_mode) for batch in batches]
        stacked = self._stacked
        assert stacked is not None
        traceable = [as_traceable(batch, "the batch", trace_numbers=True) for batch in batches]
        traceable_settings = as_traceable(settings, "the evaluation settings")
        outputs: list[ModelOutputs] = []
        for run in same_shape_runs(traceable, self.evaluation_steps_per_execution):
            if len(run) == 1:
                outputs.append(self._evaluate_values(trainable, rest, batches[run[0]], settings, inference_mode))
            else:
                run_batches = [traceable[index] for index in run]
                outputs.extend(stacked.evaluate(trainable, rest, run_batches, traceable_settings, inference_mode))
        return outputs

    def check_asynchronous_evaluation(self) -> None:
        """The strategy's :meth:`~mlpug.jax.strategies.JaxStrategy.check_asynchronous_evaluation` (asked by
        ``TestMetricsLogger(run_async=True)`` before training starts).

        Raises:
            RuntimeError: The strategy cannot evaluate on a worker thread (several JAX processes).
        """
        self.strategy.check_asynchronous_evaluation()

    def evaluation_snapshot(self) -> JaxEvaluationSnapshot:
        """A frozen copy of the training model's values for asynchronous evaluation (:class:`JaxEvaluationSnapshot`:
        the values are copied on the device at each capture, since the training step donates their buffers).

        Raises:
            RuntimeError: No training model (see :meth:`set_training_model`), or the strategy cannot evaluate on a
                worker thread (several JAX processes; see
                :meth:`~mlpug.jax.strategies.JaxStrategy.check_asynchronous_evaluation`).
        """
        self.ensure_ready()
        assert self._live is not None
        self.strategy.check_asynchronous_evaluation()  # several JAX processes: refused (it could hang)
        return JaxEvaluationSnapshot(
            self._live, self._evaluate_values, self.model_components, self._evaluate_values_of_batches
        )

    def non_finite_indices(self, values: Sequence[Any]) -> list[int]:
        """Positions of the non-finite scalar ``values`` (arrays or numbers), with one host transfer for all."""
        if not values:
            return []
        numbers = jax.device_get([value if isinstance(value, jax.Array) else to_number(value) for value in values])
        stacked = np.array([np.asarray(number, dtype=np.float64).reshape(()) for number in numbers])
        return np.flatnonzero(~np.isfinite(stacked)).tolist()

    def non_finite_weights(self) -> list[str]:
        """``"<component>.<path>"`` of the trainable parameters that hold NaN / inf, with one host transfer."""
        named = [
            (self._component_names[id(variable)], variable.get_raw_value())
            for variables in self._trainable.values()
            for variable in variables
        ]
        named = [(name, value) for name, value in named if jnp.issubdtype(value.dtype, jnp.inexact)]
        if not named:
            return []
        finite = jax.device_get(_all_finite([value for _, value in named]))
        return [name for (name, _), is_finite in zip(named, finite) if not is_finite]

    def _is_scalar_loss(self, loss: Any) -> bool:
        """Whether ``loss`` (what the model returned as its loss) is an array of one element.

        Args:
            loss: A JAX or NumPy array or scalar (a tracer inside the step), or anything else the model returned.

        Returns:
            True for an array of any shape with exactly one element (``()``, ``(1,)``, ``(1, 1)`` ...); False for
            other arrays (e.g. a loss per sample) and for values that are not arrays.
        """
        return isinstance(loss, (jax.Array, np.ndarray, np.generic)) and int(np.prod(np.shape(loss))) == 1

    # ----- state -----
    def get_state(self) -> dict:
        """The weights and optimizer states as NumPy copies (one host transfer).

        Returns:
            ``{"model_components": {name: nested dict of arrays}, "optimizers": {name: {key path: array}}}``: per
            component its variables but the ``nnx.Rngs`` streams (see
            :mod:`mlpug.jax.trainers.component_state`); per optimizer the leaves of its optax state by key path (see
            :mod:`mlpug.jax.trainers.optimizers`).
        """
        return to_numpy(
            {
                "model_components": {name: component_state(c) for name, c in self.model_components.items()},
                "optimizers": self.optimizer_states.flat_states(),
            }
        )

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned (also before :meth:`set_training_model`).

        Raises:
            ValueError: Names, paths, leaves or shapes in ``state`` do not match the trainer's; nothing is loaded
                then.
        """
        self._check_state_names(state)
        updates = [
            update
            for name, component in self.model_components.items()
            for update in component_updates(name, component, state["model_components"][name])
        ]
        self.optimizer_states.set_state(state["optimizers"])  # checked before it loads anything
        placed = self.strategy.place_state([value for _, value in updates])
        for (variable, _), value in zip(updates, placed):
            variable.set_raw_value(value)
        self.optimizer_states.set_state_tuple(self.strategy.place_state(self.optimizer_states.state_tuple()))

    # ----- learning rate -----
    def set_learning_rate(self, learning_rate: float, optimizer_name: Optional[str] = None) -> None:
        """Set the learning rate of the named optimizer, or of all optimizers (in their states).

        Raises:
            ValueError: Unknown ``optimizer_name``.
            TypeError: An optimizer that was not made with ``optax.inject_hyperparams``, or whose learning rate is a
                schedule; no learning rate is set then.
        """
        self._selected_optimizers(optimizer_name)
        names = list(self.optimizers) if optimizer_name is None else [optimizer_name]
        self.optimizer_states.set_learning_rate(names, learning_rate)

    def get_learning_rate(self, optimizer_name: Optional[str] = None) -> Optional[float]:
        """The learning rate of the named (default: first) optimizer now, or None when it was not made with
        ``optax.inject_hyperparams``.

        Raises:
            ValueError: Unknown ``optimizer_name``.
        """
        self._selected_optimizers(optimizer_name)
        return self.optimizer_states.get_learning_rate(optimizer_name or next(iter(self.optimizers)))
