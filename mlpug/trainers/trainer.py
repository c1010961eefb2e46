"""The contract between the neutral ``TrainingManager`` and a backend: ``BackendTrainer``, ``StepResult``.

The manager calls :meth:`BackendTrainer.train_on` once per batch and gets everything it needs from that step in one
:class:`StepResult`, lazily: values stay backend scalars until a consumer reads them, so the loop does not wait
for the device. A backend ``DefaultTrainer`` composes its step from the neutral step parts, in one place:

* a precision policy (:mod:`mlpug.trainers.precision`),
* a chunking policy for gradient accumulation (:mod:`mlpug.chunking`),
* a gradient synchronisation (:mod:`mlpug.trainers.gradient_sync`),
* random-state providers (:mod:`mlpug.random_state`),

each with a null object that gives the plain step. ``docs/architecture.md`` lists what a new backend implements.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Optional

from mlpug.checkpointing.sharded import ShardedCheckpoints
from mlpug.chunking import BatchChunk, BatchChunking, infer_num_samples
from mlpug.data import ContinuedDataSource, DataSource
from mlpug.distributed import DistributedContext, SerialContext
from mlpug.logs import to_number
from mlpug.random_state import NumpyRandomState, PythonRandomState, RandomStateProvider


class ModelOutputs(NamedTuple):
    """What a training model returned for one batch, normalised.

    Attributes:
        loss: Scalar loss tensor, the mean over the samples of the batch (detached after training).
        num_samples: Number of samples the loss is averaged over (int, or a backend scalar).
        auxiliary_results: Anything else the model returned (e.g. logits), or None.
    """

    loss: Any
    num_samples: Any
    auxiliary_results: Any = None


FirstBatchCheck = Callable[[Any, ModelOutputs], None]
"""A check of the first training batch: ``check(batch, outputs)`` raises when the outputs show a mistake (see
:meth:`BackendTrainer.add_first_batch_check`)."""


class StepResult(NamedTuple):
    """Everything the manager needs from one optimisation step; values may be backend scalars (read lazily).

    Attributes:
        loss: Scalar loss tensor of the batch (sample-weighted over its chunks), detached.
        num_samples: Samples in the batch (int or backend int scalar).
        auxiliary_results: What the model returned besides the loss (merged over chunks), detached, or None.
        optimizer_step_skipped: Whether the optimizer step was skipped (float16 loss scaling found inf/nan
            gradients): ``False``, or a bool / backend boolean scalar.
        learning_rate: The learning rate of the first optimizer at this step: a float, a backend scalar, a
            ``mlpug.logs.Deferred`` or None (no learning rate).
    """

    loss: Any
    num_samples: Any
    auxiliary_results: Any = None
    optimizer_step_skipped: Any = False
    learning_rate: Any = None


class BackendTrainer(ABC):
    """Contract between the neutral ``TrainingManager`` and a backend: one optimisation step and state.

    Implementations must not know about epochs, callbacks or files.

    Attributes:
        skip_non_finite_steps: When True, :meth:`train_on` skips the optimizer step of a batch whose loss is not
            finite and reports it as ``optimizer_step_skipped`` (set by ``TrainingManager(non_finite_loss=
            "skip_step")``; see :mod:`mlpug.trainers.non_finite`).
    """

    skip_non_finite_steps: bool = False
    steps_per_execution: int = 1
    """How many optimisation steps :meth:`train_on_batches` runs per call at most (1: one ``train_on`` per batch).
    The manager gives it up to this many batches of an epoch at a time, fewer where a callback needs the model
    sooner (see :meth:`mlpug.trainers.callback.Callback.batches_until_model_access`)."""
    evaluation_steps_per_execution: int = 1
    """How many batches the ``MetricEvaluator`` hands :meth:`evaluate_losses` at a time in a dataset evaluation."""
    _first_batch_checks: tuple = ()  # see add_first_batch_check; backends run them with _run_first_batch_checks

    @abstractmethod
    def set_training_model(self, training_model: Any) -> None:
        """Set the model that maps ``(batch, evaluate_settings, inference_mode)`` to a loss (see ModelOutputs)."""

    @abstractmethod
    def train_on(self, batch: Any, training_settings: Any = None) -> StepResult:
        """Run one optimisation step on ``batch``; return its :class:`StepResult` without waiting for the device."""

    def train_on_batches(self, batches: Sequence[Any], training_settings: Any = None) -> list[StepResult]:
        """One optimisation step per batch of ``batches``, in order; the results of the steps, one per batch.

        The manager calls this instead of :meth:`train_on` when :attr:`steps_per_execution` > 1. Default: one
        ``train_on`` call per batch; backends that compile several steps into one call override it (TensorFlow:
        a ``tf.while_loop`` inside one ``tf.function``), with the same results as ``train_on`` batch by batch.
        """
        return [self.train_on(batch, training_settings) for batch in batches]

    @abstractmethod
    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """Evaluate the model on ``batch`` without updating anything (evaluation mode, no gradients)."""

    def evaluate_losses(
        self, batches: Sequence[Any], evaluate_settings: Any = None, inference_mode: bool = True
    ) -> list[ModelOutputs]:
        """:meth:`evaluate_loss` for each of ``batches``, in order. The ``MetricEvaluator`` evaluates datasets in
        blocks of batches through this; backends that compile a block into one call override it (TensorFlow)."""
        return [self.evaluate_loss(batch, evaluate_settings, inference_mode) for batch in batches]

    @abstractmethod
    def get_state(self) -> dict:
        """Plain-container state of model components and optimizers, keyed by their names."""

    @abstractmethod
    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned."""

    @abstractmethod
    def set_learning_rate(self, learning_rate: float, optimizer_name: Optional[str] = None) -> None:
        """Set the learning rate of one optimizer (by name) or of all optimizers."""

    @abstractmethod
    def get_learning_rate(self, optimizer_name: Optional[str] = None) -> Optional[float]:
        """Learning rate of the named optimizer, or of the first one, now; None when it has none."""

    @abstractmethod
    def ensure_ready(self) -> None:
        """Raise when the trainer cannot train yet (e.g. ``set_training_model`` was never called)."""

    def non_finite_indices(self, values: Sequence[Any]) -> list[int]:
        """Positions of the ``values`` (scalar losses) that are NaN or infinite, with one device wait for all.

        Default: each value converted with :func:`mlpug.logs.to_number`; backends vectorise this.
        """
        return [index for index, value in enumerate(values) if not math.isfinite(to_number(value))]

    def add_first_batch_check(self, check: FirstBatchCheck) -> None:
        """Have ``check(batch, outputs)`` called once, on the next batch this trainer trains, before any gradient of
        it is applied: a check that raises ends training with no optimizer step taken.

        ``batch`` is the batch (its first chunk under gradient accumulation) as the data produced it, ``outputs``
        the :class:`ModelOutputs` of a forward pass of it, with eager, detached values: of the training step's own
        forward where the backend runs it eagerly (PyTorch), else of one extra forward pass in inference mode
        before the compiled step (TensorFlow, where the step's tensors are symbolic). Checks run in the order they
        were added; then they are dropped, so no step after the first pays for them. The one-call API checks its
        outputs against the targets here, and ``TrainingMetricsLogger`` its metric functions (see the README,
        "First-batch checks").
        """
        self._first_batch_checks = (*self._first_batch_checks, check)

    def _run_first_batch_checks(self, batch: Any, outputs: ModelOutputs) -> None:
        """Call the checks of :meth:`add_first_batch_check` on ``outputs`` of ``batch`` and drop them."""
        checks, self._first_batch_checks = self._first_batch_checks, ()
        for check in checks:
            check(batch, outputs)

    _warned_unchecked_weights: ClassVar[set] = set()  # the classes whose non_finite_weights is the default

    def non_finite_weights(self) -> list[str]:
        """Names of the trainable weights that hold a NaN or an infinite value (empty when all are finite).

        One device wait for all of them (never one per weight); the manager calls it where the weights are read
        anyway, never per step (see :mod:`mlpug.trainers.non_finite`). Weights that do not exist yet (a model not
        built) are not listed. With replicated weights (data-parallel) this rank's copy is checked, which every rank
        holds alike.

        Default, for trainers that do not implement it (the ``DefaultTrainer`` of every backend does): no weight is
        listed, and a warning, once per class, says that the weights of this trainer are not checked.

        Returns:
            ``"<model component name>.<weight name>"`` per non-finite weight, in the order of the components.
        """
        trainer_type = type(self)
        if trainer_type not in BackendTrainer._warned_unchecked_weights:
            BackendTrainer._warned_unchecked_weights.add(trainer_type)
            logging.getLogger("mlpug.BackendTrainer").warning(
                f"{trainer_type.__qualname__} does not implement non_finite_weights(): its trainable weights cannot "
                "be checked for NaN or infinite values during training (TrainingManager(non_finite_weights=...) "
                "finds none); implement it to have them checked"
            )
        return []

    def training_data_source(self, dataset: Any) -> DataSource:
        """How the manager iterates the training ``dataset`` every epoch (:class:`mlpug.data.DataSource`): an
        iterator (``iter(dataset) is dataset``, e.g. a generator) continues across epochs and a resume skips the
        batches trained before (:class:`mlpug.data.ContinuedDataSource`); anything else is iterated anew every
        epoch. Backends choose other sources for their own datasets (e.g. TensorFlow: infinite or reshuffled
        ``tf.data``)."""
        if isinstance(dataset, Iterator):
            return ContinuedDataSource(dataset)
        return DataSource(dataset)

    def random_state_providers(self) -> list[RandomStateProvider]:
        """The random number generators of this run, saved and restored with training checkpoints.

        Default: Python's ``random`` and NumPy's global generator; backends add their own.
        """
        return [PythonRandomState(), NumpyRandomState()]

    def distributed_context(self) -> DistributedContext:
        """The ranks this trainer trains with (the ``TrainingManager``'s and ``MetricEvaluator``'s default).

        Default: the single-process :class:`~mlpug.distributed.SerialContext`; data-parallel backends return theirs.
        """
        return SerialContext()

    def evaluation_dataset(self, dataset: Any) -> Any:
        """The part of an evaluation ``dataset`` this rank evaluates (``TestMetricsLogger`` asks at construction of
        the manager): every sample on exactly one rank, no padding, so that reduced dataset metrics count every
        sample once. Default (one process): ``dataset`` itself."""
        return dataset

    def sharded_checkpoints(self) -> Optional[ShardedCheckpoints]:
        """How training checkpoints of a sharded state are written (see :mod:`mlpug.checkpointing.sharded`), or None
        (default) when the state is whole on every rank (one file, written by the primary rank)."""
        return None

    def prepare_evaluation(self) -> None:
        """Make the model that evaluation runs hold the trained weights; called on every rank at the same point
        before a dataset is evaluated with the live weights (``MetricEvaluator.evaluate_dataset``). Default:
        nothing; a sharded trainer (FSDP) gathers its weights here (a collective)."""
        return None

    def check_asynchronous_evaluation(self) -> None:
        """Raise when this trainer cannot evaluate on a worker thread (``TestMetricsLogger(run_async=True)`` asks
        when it is given the training manager, before training starts). Default: it can (nothing happens).

        Raises:
            RuntimeError: It cannot (a subclass's message says why and what to do).
        """
        return None

    def evaluation_snapshot(self) -> Any:
        """A new :class:`mlpug.trainers.snapshot.EvaluationSnapshot` of this trainer's model, for asynchronous
        evaluation (one per evaluation that can be pending at a time; call when the model is built).

        Raises:
            NotImplementedError: This trainer cannot evaluate a copy of its model on another thread.
        """
        raise NotImplementedError(
            f"{type(self).__qualname__} has no evaluation_snapshot(): asynchronous evaluation (run_async=True) "
            "needs a trainer that can copy its model; evaluate synchronously (run_async=False)"
        )


RETURN_FORMS = (
    "loss, (loss,), (loss, auxiliary_results), (loss, num_samples, auxiliary_results) or a dict with the key 'loss' "
    "(and optionally 'num_samples', 'auxiliary_results')"
)
"""The return forms of a training model, as error messages list them (see :class:`DefaultTrainer`)."""


def describe_value(value: Any, max_items: int = 8) -> str:
    """What ``value`` is, for error messages: arrays and tensors as ``Tensor[4, 1] float32`` (type name, shape,
    dtype), tuples, lists and dicts with their items (the first ``max_items``), anything else by type and value."""
    if isinstance(value, Mapping):
        items = [f"{key!r}: {describe_value(item, max_items)}" for key, item in list(value.items())[:max_items]]
        return f"{type(value).__name__} {{{', '.join(items)}{', ...' if len(value) > max_items else ''}}}"
    if isinstance(value, (tuple, list)):
        items = [describe_value(item, max_items) for item in value[:max_items]]
        more = ", ..." if len(value) > max_items else ""
        return f"{type(value).__name__} of {len(value)} ({', '.join(items)}{more})"
    shape = getattr(value, "shape", None)
    if shape is not None:
        try:
            dims = str(list(shape))
        except (TypeError, ValueError):  # a TensorShape of unknown rank
            dims = "[unknown rank]"
        dtype = getattr(value, "dtype", None)
        dtype_name = getattr(dtype, "name", None) or str(dtype).removeprefix("torch.")
        return f"{type(value).__name__}{dims} {dtype_name}"
    return f"{type(value).__qualname__} {value!r:.80}"


def name_objects(objects: Any, kind: str, expected_type: type | tuple, single_name: str) -> dict[str, Any]:
    """Normalise one object, a list or a dict of objects into a dict keyed by name.

    Names are the keys of the objects' state in checkpoints: ``single_name`` for one object,
    ``f"{single_name}_{i}"`` for list items, the dict's own keys for a dict.

    Args:
        objects: One object, a list/tuple or a dict (str keys) of objects.
        kind: Argument name used in error messages, e.g. ``"optimizers"``.
        expected_type: Type (or tuple of types) every object must have.
        single_name: Name used for a single object.

    Raises:
        TypeError: An object has the wrong type, or a dict key is not a string.
        ValueError: The collection is empty.
    """
    if isinstance(objects, Mapping):
        named = dict(objects)
    elif isinstance(objects, (list, tuple)):
        named = {f"{single_name}_{index}": obj for index, obj in enumerate(objects)}
    else:
        named = {single_name: objects}
    if not named:
        raise ValueError(f"{kind} must not be empty, got {objects!r}")
    type_names = (
        " or ".join(t.__module__ + "." + t.__qualname__ for t in expected_type)
        if isinstance(expected_type, tuple)
        else expected_type.__module__ + "." + expected_type.__qualname__
    )
    for name, obj in named.items():
        if not isinstance(name, str):
            raise TypeError(f"{kind}: names must be str, got key {name!r} of type {type(name).__name__}")
        if not isinstance(obj, expected_type):
            raise TypeError(
                f"{kind}: expected a {type_names}, a list or a dict of them; "
                f"{name!r} is a {type(obj).__module__}.{type(obj).__qualname__}: {obj!r:.200}"
            )
    return named


class DefaultTrainer(BackendTrainer, ABC):
    """Backend-neutral part of the default trainer: naming, model set-up checks and output normalisation.

    Backends subclass it and implement the step. Training models may return:

    * the loss (a scalar tensor, mean over the samples of the batch);
    * a tuple ``(loss, auxiliary_results)`` or ``(loss, num_samples, auxiliary_results)``;
    * a dict with key ``loss`` and optional keys ``num_samples`` and ``auxiliary_results``.

    When ``num_samples`` is not given, it is counted from the batch (:func:`mlpug.chunking.infer_num_samples`).
    """

    optimizer_type: type | tuple = object
    model_component_type: type | tuple = object

    def __init__(self, optimizers: Any, model_components: Any):
        self.optimizers = name_objects(optimizers, "optimizers", self.optimizer_type, "optimizer")
        self.model_components = name_objects(model_components, "model_components", self.model_component_type, "model")
        self.training_model: Any = None
        self.chunking: BatchChunking = BatchChunking()  # backends set theirs from batch_chunk_size

    @property
    def batch_chunk_size(self) -> Optional[int]:
        """Samples per chunk for gradient accumulation, or None (whole batches)."""
        return self.chunking.batch_chunk_size

    def _selected_optimizers(self, optimizer_name: Optional[str]) -> list:
        """The named optimizer, or all optimizers for ``None``.

        Raises:
            ValueError: ``optimizer_name`` is not one of the optimizers' names (they are listed).
        """
        if optimizer_name is None:
            return list(self.optimizers.values())
        if optimizer_name not in self.optimizers:
            raise ValueError(f"optimizer_name {optimizer_name!r} unknown; optimizers: {sorted(self.optimizers)}")
        return [self.optimizers[optimizer_name]]

    def _check_state_names(self, state: Any) -> None:
        """Raise before anything is loaded when ``state`` names other model components / optimizers.

        Raises:
            ValueError: The names differ (both sides are listed).
        """
        for kind, objects in (("model_components", self.model_components), ("optimizers", self.optimizers)):
            given = state.get(kind) if isinstance(state, Mapping) else None
            if not isinstance(given, Mapping) or set(given) != set(objects):
                found = sorted(given) if isinstance(given, Mapping) else f"{type(given).__name__}: {given!r:.100}"
                raise ValueError(f"{kind} in state {found} do not match the trainer's {sorted(objects)}")

    def ensure_ready(self) -> None:
        if self.training_model is None:
            raise RuntimeError(
                f"{type(self).__name__}: no training model. Call trainer.set_training_model(train_model) "
                "before manager.start_training()."
            )

    def _normalise_outputs(self, results: Any, batch: Any, chunk: Optional[BatchChunk] = None) -> ModelOutputs:
        """Turn what the training model returned into ModelOutputs; raise when it holds no loss.

        Args:
            chunk: When ``batch`` is a chunk of a training batch (gradient accumulation), that chunk: its loss is
                weighted by its share of the batch's rows (``chunk.num_samples``).

        Raises:
            ValueError / TypeError: No scalar loss; or, for a chunk, the model returned a ``num_samples`` other
                than the chunk's rows, or a tensor (the row-share weighting would be wrong for a loss averaged
                over other units, e.g. valid tokens).
        """
        if isinstance(results, Mapping):
            if "loss" not in results:
                raise ValueError(
                    "The training model returned a dict without a 'loss' key (keys: "
                    f"{sorted(map(str, results))}); return {{'loss': ..., 'num_samples': ..., "
                    "'auxiliary_results': ...}}"
                )
            loss = results["loss"]
            num_samples = results.get("num_samples")
            auxiliary_results = results.get("auxiliary_results")
        elif isinstance(results, tuple):
            if len(results) == 2:
                (loss, auxiliary_results), num_samples = results, None
            elif len(results) == 3:
                loss, num_samples, auxiliary_results = results
            elif len(results) == 1:
                (loss,), num_samples, auxiliary_results = results, None, None
            else:
                raise ValueError(
                    f"The training model returned a tuple of {len(results)} items: {describe_value(results)}; "
                    f"expected {RETURN_FORMS}"
                )
        else:
            loss, num_samples, auxiliary_results = results, None, None
        if loss is None or not self._is_scalar_loss(loss):
            raise TypeError(
                "The training model must return a scalar loss tensor (the mean over the batch's samples), as "
                f"{RETURN_FORMS}; got {type(loss).__module__}.{type(loss).__qualname__} as the loss: "
                f"{describe_value(loss)}, in {describe_value(results)}{self._loss_hint(results, loss)}"
            )
        chunk_rows = None if chunk is None else chunk.num_samples
        if num_samples is None:
            num_samples = infer_num_samples(batch, self._leading_dimension)
        elif chunk_rows is not None and not (
            type(num_samples) is int and type(chunk_rows) is int and num_samples == chunk_rows
        ):  # a chunk's rows may be a symbolic tensor (compiled TensorFlow): then every returned num_samples is refused
            raise ValueError(
                "With batch_chunk_size, every chunk's loss is weighted by its share of the batch's rows (samples), "
                f"but the training model returned num_samples={num_samples!r} for a chunk of {chunk_rows} rows, as for "
                "a loss averaged over other units (e.g. valid tokens), for which that weighting would be wrong. "
                "Return the loss as a mean over the rows of the batch without num_samples, or train without "
                "batch_chunk_size."
            )
        return ModelOutputs(loss, num_samples, auxiliary_results)

    def _loss_hint(self, results: Any, loss: Any) -> str:
        """What would be right, for the message of a return value without a scalar loss (may be empty)."""
        if isinstance(results, (tuple, list)):
            scalars = [index for index, item in enumerate(results) if index and self._is_scalar_loss(item)]
            if scalars:
                return (
                    f"; item {scalars[0]} is a scalar: the loss comes first, e.g. return (loss, logits), or return "
                    "{'loss': loss, 'auxiliary_results': logits}"
                )
            if isinstance(results, list):
                return "; a list is none of these forms: return a tuple or a dict"
        if getattr(loss, "ndim", None):  # a tensor of one or more dimensions (None: unknown rank)
            return (
                "; a loss per sample (or per element) must be reduced to its mean over the batch, e.g. loss.mean() "
                "or a loss function with reduction='mean'"
            )
        return ""

    @abstractmethod
    def _is_scalar_loss(self, loss: Any) -> bool:
        """True when ``loss`` is a scalar tensor of this backend."""

    def _leading_dimension(self, array: Any) -> Any:
        """Size of ``array``'s first dimension; backends with symbolic shapes override this."""
        return array.shape[0]
