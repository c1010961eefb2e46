"""TensorFlow ``DefaultTrainer``: one optimisation step (eager or ``tf.function``), evaluation, and state.

The step is composed of the neutral step parts (see :mod:`mlpug.trainers.trainer`), in this one place, whose
null objects give the plain step (the same code eager and compiled)::

    result = chunking.run(chunk_step, batch)        # BatchChunking (null) or ChunkedBatch (tf.while_loop)
        chunk_step: with gradient_sync.chunk_context(chunk), tf.GradientTape():              # per chunk
                        loss = training_model(chunk.data, ...)                            # Keras dtype policy
                        target = precision.scale_loss(chunking.weigh_loss(loss, chunk))   # float16: loss scale
                    gradients = tape.gradient(target, variables)
    gradients = gradient_sync.reduce(result.gradients)                 # once per batch, after the last chunk
    pairs = clip_gradients(gradients per optimizer)                    # clip_gradients_norm / _value (unscaled)
    skipped = precision.step(optimizers, gradients per optimizer)      # apply_gradients; inf/nan under scaling

Model and optimizer state travel as numpy arrays in plain containers, through public Keras APIs only; the
states of the Keras seed generators (dropout masks) travel with them (see
:mod:`mlpug.tensorflow.trainers.seed_generators`).

The trainer holds these parts, each built from what it needs (the step parts above, the signatures, functions of
the trainer's own step), not from the trainer:

* :class:`~mlpug.tensorflow.trainers.replicated.ReplicatedStep`: the step under a ``tf.distribute`` strategy and
  the probe of Keras' replica scaling of the loss before it;
* :class:`~mlpug.tensorflow.trainers.state.KerasTrainerState`: ``get_state`` / ``set_state`` of the models,
  optimizers and seed generators, and a state kept until the models are built;
* :class:`~mlpug.tensorflow.trainers.stacked.StackedSteps`: several batches per compiled call
  (``steps_per_execution``, ``evaluation_steps_per_execution``);
* :class:`~mlpug.tensorflow.trainers.snapshot.KerasEvaluationSnapshot`: a frozen copy of the weights for
  asynchronous evaluation (:meth:`DefaultTrainer.evaluation_snapshot`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from mlpug.chunking import BatchChunk, ChunkResult
from mlpug.data import DataSource
from mlpug.distributed import DistributedContext
from mlpug.logs import Deferred, to_number
from mlpug.random_state import RandomStateProvider
from mlpug.tensorflow.chunking import batch_chunker
from mlpug.tensorflow.data import training_data_source
from mlpug.tensorflow.distributed import check_strategy_options, check_variables_in_scope
from mlpug.tensorflow.random_state import TensorFlowRandomState
from mlpug.tensorflow.strategies import TFDistributeStrategy, resolve_strategy
from mlpug.tensorflow.trainers.checks import call_argument_names, check_optimizers, is_built, type_name
from mlpug.tensorflow.trainers.clipping import clip_gradient_pairs
from mlpug.tensorflow.trainers.compilation import CompiledStep, EagerStep, check_batch_signature, validate_signature
from mlpug.tensorflow.trainers.precision import precision_policy
from mlpug.tensorflow.trainers.replica_loss import ReplicaLossScaling
from mlpug.tensorflow.trainers.replicated import ReplicatedStep
from mlpug.tensorflow.trainers.snapshot import KerasEvaluationSnapshot
from mlpug.tensorflow.trainers.stacked import StackedSteps
from mlpug.tensorflow.trainers.state import KerasTrainerState
from mlpug.tensorflow.trainers.variables import (
    TrainableVariables,
    check_trainable_variables_spec,
    resolve_trainable_variables,
)
from mlpug.trainers.arguments import check_positive_int
from mlpug.trainers.clipping import validate_clipping
from mlpug.trainers.gradient_sync import GradientSync
from mlpug.trainers.precision import PrecisionPolicy
from mlpug.trainers.trainer import DefaultTrainer as NeutralDefaultTrainer
from mlpug.trainers.trainer import ModelOutputs, StepResult

_log = logging.getLogger("mlpug.tensorflow.DefaultTrainer")

_warned_deprecated_arguments: set[str] = set()  # the deprecated argument names warned about (once per process)


def _renamed_argument(new_name: str, new_value: Any, old_name: str, old_value: Any, meaning: str) -> tuple[str, Any]:
    """``(name, value)`` of an argument that ``DefaultTrainer`` takes under ``new_name`` and under its deprecated
    ``old_name``: the one given (``old_name`` warns with a ``DeprecationWarning``, once per process; ``meaning`` says
    what the new name takes), or ``(new_name, None)``.

    Raises:
        TypeError: Both names are given.
    """
    if old_value is None:
        return new_name, new_value
    if new_value is not None:
        raise TypeError(
            f"give {new_name} only; {old_name} is its deprecated name (got {new_value!r:.100} and {old_value!r:.100})"
        )
    if old_name not in _warned_deprecated_arguments:
        _warned_deprecated_arguments.add(old_name)
        warnings.warn(
            f"DefaultTrainer({old_name}=...) is deprecated; use {new_name}= ({meaning})",
            DeprecationWarning,
            stacklevel=4,
        )
    return old_name, old_value


def _evaluation_steps_argument(
    evaluation_steps_per_execution: Optional[int], evaluation_batches_per_call: Optional[int], steps_per_execution: int
) -> int:
    """The checked ``evaluation_steps_per_execution`` of the TensorFlow ``DefaultTrainer``: the value given under
    its name or under its deprecated alias ``evaluation_batches_per_call`` (see :func:`_renamed_argument`), else
    ``steps_per_execution``.

    Raises:
        TypeError: Both names are given.
        ValueError: The value is not an int >= 1 (the message uses the name it was given under).
    """
    name, value = _renamed_argument(
        "evaluation_steps_per_execution",
        evaluation_steps_per_execution,
        "evaluation_batches_per_call",
        evaluation_batches_per_call,
        "the same meaning: batches per compiled evaluation call",
    )
    return steps_per_execution if value is None else check_positive_int(value, name)


def _strategy_argument(strategy: Any, distribution_strategy: Any) -> TFDistributeStrategy:
    """The :class:`~mlpug.tensorflow.strategies.TFDistributeStrategy` of the TensorFlow ``DefaultTrainer``:
    ``strategy``, or the ``tf.distribute`` strategy given under the deprecated name ``distribution_strategy`` (see
    :func:`_renamed_argument`).

    Raises:
        TypeError: Both names are given.
    """
    _, value = _renamed_argument(
        "strategy", strategy, "distribution_strategy", distribution_strategy, "it takes the same tf.distribute strategy"
    )
    return resolve_strategy(value)


class DefaultTrainer(NeutralDefaultTrainer):
    """Trains a Keras training model with ``tf.GradientTape``, eagerly or compiled with ``tf.function``.

    Args:
        optimizers: A Keras 3 optimizer (``tf.keras.optimizers.Optimizer``), a list or a dict of them. Names
            (``"optimizer"``, ``"optimizer_<i>"`` or the dict keys) are the keys of their state in checkpoints.
        model_components: A Keras layer/model, a list or a dict of them: the parts whose weights are saved
            (``"model"``, ``"model_<i>"`` or the dict keys).
        eager_mode: True runs the step eagerly (easy to debug, slower); False (default) compiles the training
            and evaluation steps with ``tf.function``.
        batch_data_signature: Nested ``tf.TensorSpec`` s of a batch, e.g.
            ``(tf.TensorSpec((None, 28, 28), tf.float64), tf.TensorSpec((None,), tf.uint8))``: the compiled
            steps are traced once for it, and a batch that does not match raises a clear ``ValueError``. Without
            it, the steps are traced with ``reduce_retracing`` (one extra trace for a differently sized batch,
            reported in a debug log line).
        training_settings_signature: Nested ``tf.TensorSpec`` s of the training settings; without it the
            training settings are a Python constant of the trace.
        distribution_strategy: The deprecated name of ``strategy`` (a ``DeprecationWarning``, once per process).
        strategy: How training is distributed (:mod:`mlpug.trainers.strategy`; resolved by
            :func:`mlpug.tensorflow.strategies.resolve_strategy`): None or ``"single_process"`` (default, one
            device), a ``tf.distribute.MirroredStrategy`` (several devices of one process) or
            ``MultiWorkerMirroredStrategy`` (several processes, ``TF_CONFIG``) whose scope the model components and
            optimizers were created in, or a :class:`~mlpug.tensorflow.strategies.TFDistributeStrategy` (over one of
            them; a subclass of your own). :attr:`strategy` is then that ``TFDistributeStrategy`` (its
            ``tf_strategy`` the ``tf.distribute`` one). The batch size stays per
            process: a mirrored step splits each batch over the local replicas, and several workers train on their
            shards of the data. Each replica's gradients are weighted by its share of the global batch's samples (rows),
            so the step is the step of one device on the global batch. See :mod:`mlpug.tensorflow.distributed`. The
            training model's loss must be the mean over the replica's samples; Keras 3's scaling of a Keras loss object
            by ``1 / num_replicas_in_sync`` is found before the first training step and undone (see
            :mod:`mlpug.tensorflow.trainers.replica_loss`). TensorFlow's default strategy
            (``tf.distribute.get_strategy()`` outside a scope) is the same as None; a ``MultiWorkerMirroredStrategy()``
            without ``TF_CONFIG`` is one worker.
        trainable_variables: Which variables each optimizer updates. Default: the trainable variables of all
            model components (one optimizer), or, with several optimizers named like model components, those
            of the component with the optimizer's name. Otherwise a dict optimizer name -> list of variables,
            a Keras layer (its trainable variables) or a callable returning a list; or a callable returning
            such a dict (or a list, for one optimizer). Callables are called once the model is built.
        batch_chunk_size: Gradient accumulation: when given (int >= 1), every batch is split into chunks of at
            most this many samples (the last may be smaller), each chunk's loss is weighted by
            ``chunk_samples / batch_samples`` before its backward pass, the gradients are summed and the
            optimizers step once per batch; in compiled and eager mode alike (see
            :mod:`mlpug.tensorflow.chunking`). Peak activation memory is that of one chunk. Batches
            must be tensors/arrays or tuples/lists/dicts of them; the weights assume the loss is a mean over the
            samples of the chunk.
        use_mixed_precision: Train with the Keras mixed precision policy ``mixed_<autocast_dtype>`` (set on the
            float32 layers of the model components and the training model; variables stay float32). With
            float16, each optimizer is wrapped in a ``tf.keras.optimizers.LossScaleOptimizer`` (its loss scale
            is part of the optimizer state) and ``StepResult.optimizer_step_skipped`` tells whether it skipped the
            step.
        autocast_dtype: ``"bfloat16"`` (default; CPUs and recent GPUs) or ``"float16"`` (GPUs). Only with
            ``use_mixed_precision=True``.
        clip_gradients_norm: Clip the gradients of each optimizer to this global L2 norm (float > 0;
            ``tf.clip_by_global_norm``) after accumulation and before they are applied, in the compiled step; with
            float16 loss scaling in the units of the unscaled gradients. See :mod:`mlpug.trainers.clipping` and
            :meth:`clip_gradients`. Under a ``distribution_strategy`` the replicas' partial gradients are all-reduced
            first, clipped, and passed on as ``1 / replicas`` each (one more all-reduce per step).
        clip_gradients_value: Clip every gradient element to ``[-v, v]`` instead (``tf.clip_by_value``).
        steps_per_execution: Run up to this many optimisation steps (int >= 1, default 1) in one call of the
            compiled step: the manager hands :meth:`train_on_batches` that many batches of an epoch (fewer at the
            epoch's end, and where a callback needs the model sooner, e.g. a batch-level checkpoint; see
            :meth:`mlpug.trainers.callback.Callback.batches_until_model_access`); they are stacked
            and trained one after the other in a ``tf.while_loop`` inside one ``tf.function``, then the batch hooks
            run for every batch with that batch's loss and outputs. The weights and per-batch losses are those of
            one step per call (bit-identical on CPU, tested). A call of K batches is one dispatch of the compiled
            step instead of K, and costs one stacking copy of the batches. Consecutive batches of other
            shapes (the short last batch) are stacked apart, through the same trace: without a
            ``batch_data_signature`` the first call is traced with the number of batches and the samples per
            batch left open (``None``), so the model must accept a ``None`` batch dimension, as with a signature
            of ``shape=(None, ...)``. A call of one batch (the short last batch alone, or every call
            where a callback needs the model after every batch) runs :meth:`train_on`, a trace of its own. Random
            draws: Keras layers (``Dropout``, ...: ``SeedGenerator`` variables) draw exactly as with one step per
            call; TensorFlow's legacy stateful random ops in the model's own code (``tf.random.uniform``,
            ``tf.nn.dropout``) draw anew for every batch, but not the values of one step per call (another graph
            gives them other op seeds). Eager mode runs one step per call.
        evaluation_steps_per_execution: Batches that :meth:`evaluate_losses` (dataset evaluation through the
            ``MetricEvaluator``) stacks into one compiled call, the same way (int >= 1); default
            ``steps_per_execution``.
        evaluation_batches_per_call: Deprecated name of ``evaluation_steps_per_execution`` (a
            ``DeprecationWarning``, once per process).

    The training model, set with :meth:`set_training_model`, is a ``tf.keras.Model`` (or layer) whose
    ``call(batch_data, evaluate_settings, inference_mode=None)`` returns the loss (see
    :class:`mlpug.trainers.trainer.DefaultTrainer` for the accepted return forms). It is called as
    ``model(batch, evaluate_settings=..., inference_mode=..., training=not inference_mode)`` (Keras 3
    only accepts tensors as positional arguments), so that Keras layers such as ``Dropout`` see ``training``.

    Unbuilt models are built before the first step by one eager forward pass (inference mode) on the first
    batch, and unbuilt optimizers with ``optimizer.build(variables)``, so that no variable is created inside a
    compiled step.

    First-batch checks (:meth:`add_first_batch_check`: the one-call API's, ``TrainingMetricsLogger``'s) run on the
    outputs of one more eager forward pass of the next batch in inference mode, before its (compiled) step: the
    step's own tensors are symbolic. Without pending checks there is no such pass. Under a strategy of several
    replicas the replica loss probe adds eager inference-mode forward passes of the first replica's share of the first
    batch (and of later ones while its loss is 0 or not finite, at most ``MAX_PROBED_BATCHES``; see
    :mod:`mlpug.tensorflow.trainers.replica_loss`). These passes call the model like any other: Keras layers draw
    no dropout in inference mode and create no variable once built, but a model whose ``call`` changes state in
    inference mode (a stateful RNN, metric or other variables updated in ``call``, random ops) sees them.

    Raises:
        TypeError: An optimizer is not a Keras 3 optimizer, a model component is not a Keras layer, a signature
            is not made of ``tf.TensorSpec`` s, ``eager_mode`` is not a bool or ``trainable_variables`` has the
            wrong form.
        ValueError: Several optimizers without a way to tell their variables apart, a ``batch_chunk_size``,
            ``steps_per_execution`` or ``evaluation_steps_per_execution`` that is not an int >= 1, or a bad
            ``autocast_dtype``.
        TypeError: Both ``evaluation_steps_per_execution`` and its deprecated name ``evaluation_batches_per_call``;
            both ``strategy`` and its deprecated name ``distribution_strategy``; a ``strategy`` that is an mlpug
            ``Strategy`` other than a ``TFDistributeStrategy``, or not a strategy.
        ValueError: A ``strategy`` name other than ``"single_process"``.
        NotImplementedError: A ``tf.distribute`` strategy other than the two mirrored ones; under a strategy, float16
            loss scaling or an optimizer that clips gradients (see
            :func:`mlpug.tensorflow.distributed.check_strategy_options`).
        ValueError: A variable of a built model component or optimizer was created outside the strategy's scope
            (checked at construction, and after building).
        RuntimeError: ``TF_CONFIG`` describes a cluster of several tasks but ``strategy`` is not a
            ``MultiWorkerMirroredStrategy`` (see :func:`mlpug.tensorflow.distributed.check_cluster`).
    """

    optimizer_type = tf.keras.optimizers.Optimizer
    model_component_type = tf.keras.layers.Layer

    def __init__(
        self,
        optimizers: Any,
        model_components: Any,
        eager_mode: bool = False,
        batch_data_signature: Any = None,
        training_settings_signature: Any = None,
        distribution_strategy: Any = None,
        trainable_variables: Optional[TrainableVariables] = None,
        batch_chunk_size: Optional[int] = None,
        use_mixed_precision: bool = False,
        autocast_dtype: Optional[str] = None,
        clip_gradients_norm: Optional[float] = None,
        clip_gradients_value: Optional[float] = None,
        steps_per_execution: int = 1,
        evaluation_steps_per_execution: Optional[int] = None,
        evaluation_batches_per_call: Optional[int] = None,
        strategy: Any = None,
    ):
        self.steps_per_execution = check_positive_int(steps_per_execution, "steps_per_execution")
        self.evaluation_steps_per_execution = _evaluation_steps_argument(
            evaluation_steps_per_execution, evaluation_batches_per_call, self.steps_per_execution
        )
        self.clip_gradients_norm, self.clip_gradients_value = validate_clipping(
            clip_gradients_norm, clip_gradients_value
        )
        self.strategy: TFDistributeStrategy = _strategy_argument(strategy, distribution_strategy)
        distribution_strategy = self._tf_strategy = self.strategy.tf_strategy
        check_optimizers(optimizers)
        super().__init__(optimizers, model_components)
        self.chunking = batch_chunker(batch_chunk_size)
        self.precision: PrecisionPolicy = precision_policy(use_mixed_precision, autocast_dtype)
        self.gradient_sync = GradientSync()
        check_strategy_options(distribution_strategy, self.optimizers, self.precision.uses_loss_scaling)
        with self._scope():  # a LossScaleOptimizer's variables are mirrored too
            self.optimizers = self.precision.prepare_optimizers(self.optimizers)
        self.precision.prepare_model(self.model_components.values())
        if not isinstance(eager_mode, bool):
            raise TypeError(f"eager_mode must be a bool, got {eager_mode!r:.100}")
        self._distributed = self.strategy.distributed_context()
        self._check_variables_in_scope()
        validate_signature(batch_data_signature, "batch_data_signature")
        validate_signature(training_settings_signature, "training_settings_signature")
        if training_settings_signature is not None and batch_data_signature is None:
            raise ValueError("training_settings_signature needs batch_data_signature as well; give both or neither")
        check_trainable_variables_spec(trainable_variables, self.optimizers, self.model_components)

        self.eager_mode = eager_mode
        self.batch_data_signature = batch_data_signature
        self.training_settings_signature = training_settings_signature
        self.trainable_variables_spec = trainable_variables
        self._optimizer_list = list(self.optimizers.values())
        self._settings_arg = "evaluate_settings"
        self._inference_arg: Optional[str] = "inference_mode"
        self._variables: dict = {}  # optimizer name -> list of variables (resolved when built)
        self._flat_variables: list = []
        self._prepared = False
        self._logged_learning_rate: Optional[float] = None
        self._state = KerasTrainerState(self.model_components, self.optimizers)
        # Keras' 1 / replicas of a loss, undone; probed before the first training step until settled
        self.replica_loss = ReplicaLossScaling(distribution_strategy)
        self._replicated: Optional[ReplicatedStep] = None  # the step under a strategy
        if distribution_strategy is not None:
            self._replicated = ReplicatedStep(
                distribution_strategy,
                self.chunking,
                self.precision,
                self.gradient_sync,
                self.optimizers,
                self.replica_loss,
                self._distributed,
                chunk_step=self._chunk_step,
                gradient_pairs=self._pairs_per_optimizer,
                clip_gradients=self.clip_gradients,
                clips=self.clip_gradients_norm is not None or self.clip_gradients_value is not None,
                probe_loss=lambda batch, settings: self._forward(batch, settings, inference_mode=True).loss,
            )
        self._stacked = StackedSteps(
            batch_data_signature,
            training_settings_signature,
            self.steps_per_execution,
            self.evaluation_steps_per_execution,
        )
        self._train_step: EagerStep | CompiledStep
        self._train_steps: Optional[CompiledStep] = None  # the stacked training step (steps_per_execution > 1)
        self._make_train_steps()
        self._evaluate_steps: dict = {}  # (inference_mode, stacked) -> EagerStep | CompiledStep

    def _make_train_steps(self) -> None:
        """The training step (eager or compiled) and, with ``steps_per_execution > 1``, the stacked one; made anew
        (traced again) when a constant of their traces changes (``replica_loss.factor``)."""
        if self.eager_mode:
            self._train_step = EagerStep(self._train_step_function, "train step")
        else:
            self._train_step = CompiledStep(
                self._train_step_function, "train step", self.batch_data_signature, self.training_settings_signature
            )
        if not self.eager_mode and self.steps_per_execution > 1:
            self._train_steps = self._stacked.training_step(self._train_step_function)

    # ----- set-up -----
    def _scope(self) -> AbstractContextManager:
        """The strategy's scope (variables created in it are mirrored), or a do-nothing context."""
        return self.strategy.scope()

    def _check_variables_in_scope(self) -> None:
        if self._tf_strategy is None:
            return
        owners = {f"model component {name!r}": component for name, component in self.model_components.items()}
        owners.update({f"optimizer {name!r}": optimizer for name, optimizer in self.optimizers.items()})
        if self.training_model is not None:
            owners["the training model"] = self.training_model
        check_variables_in_scope(self._tf_strategy, owners)

    def distributed_context(self) -> DistributedContext:
        """The workers of a ``MultiWorkerMirroredStrategy`` as ranks (see
        :class:`mlpug.tensorflow.distributed.StrategyContext`); one rank otherwise."""
        return self._distributed

    def evaluation_dataset(self, dataset: Any) -> Any:
        """Several workers: this worker's unpadded shard (see
        :func:`mlpug.tensorflow.distributed.shard_evaluation_dataset`)."""
        return self.strategy.evaluation_dataset(dataset)

    def set_training_model(self, training_model: tf.keras.layers.Layer) -> None:
        """Set the model that returns the loss for a batch.

        Raises:
            TypeError: ``training_model`` is not a Keras layer/model, or its ``call`` does not take
                ``(batch_data, evaluate_settings[, inference_mode])`` as named parameters.
        """
        if not isinstance(training_model, tf.keras.layers.Layer):
            raise TypeError(
                "training_model must be a tf.keras.Model whose call(batch_data, evaluate_settings, "
                f"inference_mode=None) returns the loss; got a {type_name(training_model)}"
            )
        self._settings_arg, self._inference_arg = call_argument_names(training_model)
        self.precision.prepare_model([training_model])
        self.training_model = self.strategy.prepare_training_model(training_model)

    def _build(self, batch: Any = None, settings: Any = None) -> bool:
        """Build model components, resolve the variables and build the optimizers; apply a pending state.

        Args:
            batch: A batch for an eager forward pass in inference mode, used when a model component is not
                built yet; without it, a batch of zeros made from ``batch_data_signature`` is used when given.

        Returns:
            True when everything is built (and the trainer can take and give state), False when it cannot be
            built yet (unbuilt components, no batch and no signature).
        """
        if self._prepared:
            return True
        if not all(is_built(component) for component in self.model_components.values()):
            if batch is None and self.batch_data_signature is not None:
                batch = tf.nest.map_structure(
                    lambda spec: tf.zeros([d if d is not None else 1 for d in spec.shape], spec.dtype),
                    self.batch_data_signature,
                )
            if batch is None or self.training_model is None:
                return False
            _log.debug("Building the model components with an eager forward pass (inference mode)")
            with self._scope():
                self._forward(batch, settings, inference_mode=True)
        self._variables = resolve_trainable_variables(
            self.trainable_variables_spec, self.optimizers, self.model_components
        )
        self._flat_variables = [v for variables in self._variables.values() for v in variables]
        with self._scope():
            for name, optimizer in self.optimizers.items():
                if not optimizer.built:
                    optimizer.build(self._variables[name])
        self._check_variables_in_scope()
        self._prepared = True
        self._state.load_pending(self.training_model)
        return True

    def training_data_source(self, dataset: Any) -> DataSource:
        """See :func:`mlpug.tensorflow.data.training_data_source` (infinite and reshuffled ``tf.data``); several
        workers: of this worker's shard (:func:`mlpug.tensorflow.distributed.shard_training_dataset`)."""
        return training_data_source(self.strategy.training_dataset(dataset))

    def random_state_providers(self) -> list[RandomStateProvider]:
        """Python, NumPy and TensorFlow's global generator (the Keras seed generators are in the trainer state)."""
        return [*super().random_state_providers(), TensorFlowRandomState()]

    # ----- the step -----
    def _forward(
        self, batch: Any, settings: Any, inference_mode: bool, chunk: Optional[BatchChunk] = None
    ) -> ModelOutputs:
        kwargs = {self._settings_arg: settings}
        if self._inference_arg is not None:
            kwargs[self._inference_arg] = inference_mode
        results = self.training_model(batch, training=not inference_mode, **kwargs)
        return self._normalise_outputs(results, batch, chunk)

    def evaluation_snapshot(self) -> KerasEvaluationSnapshot:
        """A frozen copy of the weights for asynchronous evaluation (:class:`KerasEvaluationSnapshot`).

        Raises:
            RuntimeError: The model is not built yet (no batch seen and no ``batch_data_signature``)."""
        self.ensure_ready()
        if not self._build():
            raise RuntimeError("asynchronous evaluation needs a built model: train a batch first, or pass "
                               "DefaultTrainer(batch_data_signature=...)")  # fmt: skip
        return KerasEvaluationSnapshot(
            self.model_components, self.training_model, self._evaluate_step_function, self.eager_mode
        )

    def _is_scalar_loss(self, loss: Any) -> bool:
        return tf.is_tensor(loss) and loss.shape.num_elements() == 1

    def _leading_dimension(self, array: Any) -> Any:
        """The first dimension: an int when static, else ``tf.shape(array)[0]`` (inside a compiled step)."""
        size = array.shape[0]
        return size if size is not None else tf.shape(array)[0]

    def _train_step_function(self, batch: Any, training_settings: Any) -> tuple:
        """Forward, backward and optimizer step (see the module docstring); traced unless in eager mode."""
        if self._replicated is not None:
            return self._replicated.train_step(batch, training_settings, self.skip_non_finite_steps)
        result = self.chunking.run(lambda chunk: self._chunk_step(chunk, training_settings), batch)
        gradients = self.gradient_sync.reduce(result.gradients)
        assert gradients is not None
        pairs, outputs = self.clip_gradients(self._pairs_per_optimizer(gradients)), result.outputs
        if self.skip_non_finite_steps:  # decided in the graph: no host wait in a compiled step

            def step() -> Any:
                skipped = self.precision.step(self.optimizers, pairs)
                return tf.constant(False) if skipped is False else skipped

            finite = tf.reduce_all(tf.math.is_finite(outputs.loss))
            skipped = tf.cond(finite, step, lambda: tf.constant(True))
        else:
            skipped = self.precision.step(self.optimizers, pairs)
        return (
            tf.reshape(outputs.loss, []),
            outputs.num_samples,
            outputs.auxiliary_results,
            (None if skipped is False else skipped),
        )

    def _chunk_step(self, chunk: BatchChunk, training_settings: Any, share: Any = None) -> ChunkResult:
        """Forward and backward pass of one chunk (the whole batch without chunking), its loss weighed (under a
        strategy also by the replica's ``share`` of the global batch, in float32)."""
        optimizers = self._optimizer_list
        scaling = self.precision.uses_loss_scaling
        with (
            self.gradient_sync.chunk_context(chunk),
            tf.GradientTape(persistent=scaling and len(optimizers) > 1) as tape,
        ):
            outputs = self._forward(chunk.data, training_settings, False, chunk)
            loss = tf.reshape(outputs.loss, [])
            if share is not None:  # a replica's mean loss, also when Keras scaled it by 1 / replicas
                loss = self.replica_loss.unscaled(loss)
            target = self.chunking.weigh_loss(loss, chunk)
            if share is not None:
                target = tf.math.multiply_no_nan(tf.cast(target, tf.float32), share)
            targets = [self.precision.scale_loss(target, optimizer) for optimizer in optimizers] if scaling else None
        if targets is None:
            gradients = tape.gradient(target, self._flat_variables)
        else:  # every optimizer has its own loss scale
            gradients = []
            for target, variables in zip(targets, self._variables.values()):
                gradients.extend(tape.gradient(target, variables))
        return ChunkResult(ModelOutputs(loss, outputs.num_samples, outputs.auxiliary_results), gradients)

    def non_finite_indices(self, values: Sequence[Any]) -> list[int]:
        """Positions of the non-finite scalar ``values`` (tensors or numbers): one stacked check, one conversion."""
        if not values:
            return []
        numbers = [value if tf.is_tensor(value) else to_number(value) for value in values]  # reduced values: floats
        try:  # the usual case, scalars of one dtype: three eager ops for all of them (not three per value)
            stacked = tf.cast(tf.reshape(tf.stack(numbers), [len(numbers)]), tf.float64)
        except (tf.errors.InvalidArgumentError, TypeError, ValueError):  # mixed dtypes or shapes ([] and [1])
            stacked = tf.stack([tf.cast(tf.reshape(value, []), tf.float64) for value in numbers])
        return np.flatnonzero(~tf.math.is_finite(stacked).numpy()).tolist()

    def non_finite_weights(self) -> list[str]:
        """``"<component>.<variable path>"`` of the trainable variables that hold NaN / inf: those of the model
        components, then any other variable the optimizers update; one stacked check, one conversion. Under a
        strategy a mirrored variable is read as its local copy, which every replica holds alike. A model not built
        yet has none."""
        named, seen = [], set()
        for component_name, component in self.model_components.items():
            for variable in component.trainable_variables:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    named.append((f"{component_name}.{getattr(variable, 'path', None) or variable.name}", variable))
        named.extend((getattr(v, "path", None) or v.name, v) for v in self._flat_variables if id(v) not in seen)
        named = [(name, variable) for name, variable in named if tf.as_dtype(variable.dtype).is_floating]
        if not named:
            return []
        finite = tf.stack([tf.reduce_all(tf.math.is_finite(variable)) for _, variable in named]).numpy()
        return [name for (name, _), is_finite in zip(named, finite) if not is_finite]

    def clip_gradients(self, pairs: dict[str, list]) -> dict[str, list]:
        """Clip each optimizer's ``(gradient, variable)`` pairs before they are applied (``clip_gradients_norm``:
        ``tf.clip_by_global_norm`` over that optimizer's gradients; ``clip_gradients_value``: ``tf.clip_by_value``;
        see :func:`mlpug.tensorflow.trainers.clipping.clip_gradient_pairs`); part of the traced step, and a hook that
        subclasses may override. Under a strategy it is called with the all-reduced gradients, and only with a
        clipping option. Without a clipping option the pairs as they are."""
        return clip_gradient_pairs(pairs, self.optimizers, self.clip_gradients_norm, self.clip_gradients_value)

    def _pairs_per_optimizer(self, gradients: Sequence[Any]) -> dict[str, list]:
        """The flat gradient list as ``(gradient, variable)`` pairs per optimizer name, for ``precision.step``."""
        pairs, start = {}, 0
        for name, variables in self._variables.items():
            pairs[name] = list(zip(gradients[start : start + len(variables)], variables))
            start += len(variables)
        return pairs

    def _evaluate_step_function(self, batch: Any, evaluate_settings: Any, inference_mode: bool) -> tuple:
        outputs = self._forward(batch, evaluate_settings, inference_mode=inference_mode)
        loss = tf.reshape(outputs.loss, [])
        if self._tf_strategy is not None and tf.distribute.has_strategy():  # called in a strategy's scope (trace time)
            loss = self.replica_loss.unscaled_in_scope(loss)
        return loss, outputs.num_samples, outputs.auxiliary_results

    def train_on(self, batch: Any, training_settings: Any = None) -> StepResult:
        """One optimisation step on ``batch`` (a tensor, numpy array, or tuple/list/dict of them).

        Returns:
            StepResult: the loss (scalar tensor), ``num_samples`` (int or scalar int tensor), the auxiliary
            results (tensors) as the training model returned them (merged over chunks), whether the step was
            skipped (``False``, or the step's boolean tensor under float16 loss scaling: converted only when
            read) and the learning rate for ``logs`` (see :meth:`_learning_rate_for_logs`).

        Raises:
            ValueError: The batch does not match ``batch_data_signature`` (checked on the first batch, and
                whenever the compiled step rejects a batch); under a strategy, before the first step on every
                worker: the loss mixes terms that Keras scales by ``1 / replicas`` with terms it does not (see
                :mod:`mlpug.tensorflow.trainers.replica_loss`).
        """
        self._prepare_step(batch, training_settings)
        loss, num_samples, auxiliary_results, skipped = self._train_step(batch, training_settings)
        return StepResult(
            loss, num_samples, auxiliary_results, False if skipped is None else skipped, self._learning_rate_for_logs()
        )

    def train_on_batches(self, batches: Sequence[Any], training_settings: Any = None) -> list[StepResult]:
        """One optimisation step per batch, several in one compiled call (``steps_per_execution``, see the class
        docstring): consecutive batches of the same shapes are stacked and trained in a ``tf.while_loop``; a batch
        of its own shape (the short last batch) is stacked alone, through the same trace (its sample dimension is
        open). Eager mode, or one batch: :meth:`train_on` per batch.

        Returns:
            One :class:`StepResult` per batch, in order, as :meth:`train_on` returns them.

        Raises:
            ValueError: A batch does not match ``batch_data_signature`` (the message names it), or the loss mixes
                terms that Keras scales for the replicas with others (see :meth:`train_on`).
        """
        if self._train_steps is None or len(batches) == 1:
            return super().train_on_batches(batches, training_settings)
        self._prepare_step(batches[0], training_settings)
        return self._stacked.train(self._train_steps, batches, training_settings, self._learning_rate_for_logs)

    def _prepare_step(self, batch: Any, training_settings: Any) -> None:
        """Before a training step of ``batch`` (the first of a call): build the models from it when not built yet
        (its signature checked first), probe the replica scaling of the loss until settled (the training steps are
        made anew when its factor changes), run the pending first-batch checks on it."""
        self.ensure_ready()
        if not self._prepared:
            check_batch_signature(batch, self.batch_data_signature)
            self._build(batch, training_settings)
        if self._replicated is not None and not self.replica_loss.settled:
            if self._replicated.settle_replica_loss(batch, training_settings):
                self._make_train_steps()
        if self._first_batch_checks:
            self._check_first_batch(batch, training_settings)

    def _check_first_batch(self, batch: Any, training_settings: Any) -> None:
        """The first-batch checks (:meth:`add_first_batch_check`) before the first step, on the outputs of one eager
        forward pass of ``batch`` in inference mode (a compiled step's tensors are symbolic), in the strategy's
        scope. A model whose ``call`` changes state in inference mode (a stateful RNN, variables updated in
        ``call``) sees this pass too."""
        with self._scope():
            outputs = self._forward(batch, training_settings, inference_mode=True)
        self._run_first_batch_checks(batch, outputs)

    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """Evaluate the training model on ``batch`` without gradients (``training=False`` when ``inference_mode``).

        Compiled like the training step unless in eager mode (one trace per value of ``inference_mode``).
        """
        self.ensure_ready()
        step = self._evaluate_step(bool(inference_mode), stacked=False)
        if not self._prepared:
            self._build(batch, evaluate_settings)
        loss, num_samples, auxiliary_results = step(batch, evaluate_settings)
        return ModelOutputs(loss, num_samples, auxiliary_results)

    def evaluate_losses(
        self, batches: Sequence[Any], evaluate_settings: Any = None, inference_mode: bool = True
    ) -> list[ModelOutputs]:
        """:meth:`evaluate_loss` of each batch, ``evaluation_steps_per_execution`` of them per compiled call when
        more than one (stacked and evaluated in a ``tf.while_loop``, as :meth:`train_on_batches`); the same values."""
        if self.eager_mode or self.evaluation_steps_per_execution == 1 or len(batches) < 2:
            return super().evaluate_losses(batches, evaluate_settings, inference_mode)
        self.ensure_ready()
        if not self._prepared:
            self._build(batches[0], evaluate_settings)
        step = self._evaluate_step(bool(inference_mode), stacked=True)
        return self._stacked.evaluate(step, batches, evaluate_settings)

    def _evaluate_step(self, inference_mode: bool, stacked: bool) -> EagerStep | CompiledStep:
        """The evaluation step for ``inference_mode``, of one batch or of stacked batches; made once."""
        key = (inference_mode, stacked)
        step = self._evaluate_steps.get(key)
        if step is None:

            def evaluate(batch: Any, settings: Any, _mode: bool = inference_mode) -> tuple:
                return self._evaluate_step_function(batch, settings, _mode)

            name = f"evaluation step (inference_mode={inference_mode}{', stacked batches' if stacked else ''})"
            if self.eager_mode:
                step = EagerStep(evaluate, name)
            elif stacked:
                step = self._stacked.evaluation_step(evaluate, name)
            else:
                step = CompiledStep(evaluate, name, self.batch_data_signature)
            self._evaluate_steps[key] = step
        return step

    # ----- state -----
    def get_state(self) -> dict:
        """Weights, optimizer variables and seed generator states as numpy arrays (copies, made once).

        Returns:
            ``{"model_components": {name: [np.ndarray, ...]}, "optimizers": {name: [np.ndarray, ...]},
            "seed_generators": [np.ndarray, ...]}``: per component its ``get_weights()`` (trainable and
            non-trainable, in Keras' order); per optimizer the values of ``optimizer.variables`` (iteration
            count, learning rate, slots, in creation order); the states (int64, shape ``(2,)``) of the Keras seed
            generators of the model components and then of the training model (``Dropout`` etc.; each once, in
            the order of ``.variables``), which ``get_weights()`` leaves out. When the trainer cannot be built
            yet (see :meth:`_build`), a state given to :meth:`set_state` and not applied yet is returned, else
            what exists so far.
        """
        self._build()
        return self._state.get_state(self.training_model)

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned.

        Unbuilt model components are built first (from ``batch_data_signature`` when given); when they cannot be
        built without data, the state is kept and applied right after building, before the first update. A
        state without ``"seed_generators"`` (taken before they were part of it) leaves the seed generators as
        they are.

        Raises:
            ValueError: Names, numbers of arrays or shapes in ``state`` do not match the trainer's (raised when
                the state is applied: at once, or on building when it is pending).
        """
        self._check_state_names(state)
        built = self._build()
        if not built:
            _log.debug("Model not built yet: the state is applied when it is built (before the first update)")
        self._state.set_state(state, self.training_model, built)

    # ----- learning rate -----
    def set_learning_rate(self, learning_rate: float, optimizer_name: Optional[str] = None) -> None:
        """Set the learning rate of the named optimizer, or of all optimizers.

        Raises:
            ValueError: Unknown ``optimizer_name``.
            TypeError: The optimizer was created with a learning rate schedule (Keras cannot set it then).
        """
        selected = self._selected_optimizers(optimizer_name)
        for optimizer in selected:
            optimizer.learning_rate = learning_rate
        # the logged value is the first optimizer's: known now, so not read back from the variable every step
        if any(optimizer is self._optimizer_list[0] for optimizer in selected):
            self._logged_learning_rate = float(learning_rate)

    def _learning_rate_for_logs(self) -> Any:
        """The first optimizer's learning rate for ``logs``, with no TensorFlow operation per step.

        A constant learning rate (a Keras variable) is read once and cached as a Python float, refreshed by
        :meth:`set_learning_rate` (an assignment to the optimizer's variable made elsewhere is not seen). A
        learning rate schedule is read when the logged value is read (no op per step that copies its value).
        """
        if self._logged_learning_rate is None:
            optimizer = self._optimizer_list[0]
            if isinstance(optimizer.learning_rate, tf.keras.Variable):
                self._logged_learning_rate = self.get_learning_rate()
            else:
                return Deferred(self.get_learning_rate)
        return self._logged_learning_rate

    def get_learning_rate(self, optimizer_name: Optional[str] = None) -> Optional[float]:
        """Current learning rate of the named (default: first) optimizer, as a float (schedules evaluated)."""
        optimizer = self.optimizers[optimizer_name] if optimizer_name else self._optimizer_list[0]
        return float(tf.convert_to_tensor(optimizer.learning_rate).numpy())  # also a mirrored variable
