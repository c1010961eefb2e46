"""The one-call API: ``mlp.Trainer(model, loss_func, optimizer, metrics=...).train(train_dataset, ...)``.

A facade built only from the full API's parts:
a backend ``DefaultTrainer``, one ``MetricEvaluator``, ``TrainingMetricsLogger`` and ``TestMetricsLogger``, a
``ProgressBar`` or ``LogProgress``, an optional ``CheckpointManager``, a ``MetricsHistory`` (returned) and the
``TrainingManager``. Options keep the names of the part they go to, so a user who outgrows the facade writes the same
objects by hand (``examples/fashion_mnist``) without touching the model: the facade's training model only calls
``model(inputs)`` and ``loss_func`` on a ``(inputs, targets)`` batch.

Each backend subclasses :class:`OneCallTrainer` (``mlpug.pytorch.Trainer``, ``mlpug.tensorflow.Trainer``) with its
modules, its loss-argument order and the datasets it batches.

First-batch checks: before the first optimizer step of every :meth:`OneCallTrainer.train` call, the first batch's
outputs are checked against its targets (:func:`check_targets_fit`, unless ``allow_broadcast=True``) and every metric
function is called once on them (:func:`mlpug.metrics.metric_functions_check`), through
:meth:`mlpug.trainers.trainer.Trainer.add_first_batch_check`; an error in ``loss_func`` names the types and shapes
of the outputs and targets it got (:func:`raise_loss_func_error`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar, Literal, NoReturn, Optional, Union

import numpy as np

from mlpug.callbacks import (
    Callback,
    CheckpointManager,
    LogProgress,
    MetricsHistory,
    ProgressBar,
    TestMetricsLogger,
    TrainingMetricsLogger,
)
from mlpug.data import ResumableArrayBatches
from mlpug.evaluation import MetricEvaluator
from mlpug.trainers.arguments import check_positive_int
from mlpug.trainers.hook_dispatcher import add_note
from mlpug.trainers.trainer import DefaultTrainer, describe_value
from mlpug.trainers.training_manager import TrainingManager

Progress = Optional[Literal["bar", "log"]]
_PROGRESS = ("bar", "log", None)
#: Samples per batch for data batched here when no batch size is given: Keras ``fit``'s default, matched on purpose.
DEFAULT_BATCH_SIZE = 32


class OneCallTrainer:
    """Trains ``model`` on ``(inputs, targets)`` batches with the standard callbacks in one call.

    Args:
        model: The backend model (``torch.nn.Module`` / ``keras.Model``) mapping the batch's inputs to outputs
            (e.g. logits ``[B, C]``). Its weights are what the optimizer updates and the checkpoints hold.
        loss_func: ``loss_func(outputs, targets)`` on PyTorch, ``loss_func(targets, outputs)`` on TensorFlow (each
            library's own order, so ``torch.nn.CrossEntropyLoss()`` and ``keras.losses.*`` work unchanged); returns
            the scalar mean loss of the batch.
        optimizer: The backend optimizer (built on ``model``'s parameters on PyTorch).
        metrics: Batch metric functions by name (e.g. ``{"accuracy": mlp.metrics.accuracy}``), each of a
            :class:`~mlpug.evaluation.MetricInputs` whose ``auxiliary_results`` are the model's outputs; they are
            logged for training (batch and moving average) and for the validation set (whole dataset). The loss is
            always logged. Each is called once on the first batch's outputs before the first optimizer step, so
            that one of another signature (e.g. ``f(y_true, y_pred)``) fails before anything trains.
        allow_broadcast: Keyword only. False (default): before the first optimizer step, the first batch's outputs
            and targets are checked; when their shapes differ such that ``loss_func`` broadcasts them against each
            other (outputs ``[B, 1]`` and targets ``[B]`` give ``[B, B]``: every output compared with every target)
            and the loss differs from both aligned ones (the targets reshaped to the outputs' shape, the outputs to
            the targets'), training ends with a ``ValueError`` naming both shapes and the fix. A loss that aligns
            them itself, either way, passes. True: no such check, for a loss that broadcasts on purpose.
        **trainer_options: Passed to the backend ``DefaultTrainer`` unchanged (``batch_chunk_size`` for gradient
            accumulation, also used by the evaluator; ``use_mixed_precision``, ``autocast_dtype``,
            ``clip_gradients_norm``, ``clip_gradients_value``, ``strategy``; PyTorch ``device``; TensorFlow
            ``eager_mode``, ...): see its docstring.

    Attributes:
        trainer: The backend ``DefaultTrainer`` (built here, so that bad options fail at construction).
        training_model: The model the trainer calls: ``{"loss": loss_func(...), "auxiliary_results": outputs}``.
        manager: The ``TrainingManager`` of the last :meth:`train` call (None before).
        history: The ``MetricsHistory`` of the last :meth:`train` call (None before).

    Raises:
        TypeError: ``loss_func`` is not callable, ``metrics`` is not a mapping of str to callables, or
            ``allow_broadcast`` is not a bool.
        Any error of the ``DefaultTrainer`` for a bad ``optimizer``, ``model`` or option, with its message.
    """

    #: The parts this facade builds, by the names of a backend package: ``trainers.DefaultTrainer``,
    #: ``trainers.TrainingManager``, ``evaluation.MetricEvaluator``, ``data.ResumableArrayBatches`` and the
    #: ``callbacks`` it adds; set by each backend subclass (:func:`backend_parts`).
    backend: ClassVar[Any] = None

    def __init__(
        self,
        model: Any,
        loss_func: Callable[[Any, Any], Any],
        optimizer: Any,
        metrics: Optional[Mapping[str, Callable]] = None,
        *,
        allow_broadcast: bool = False,
        **trainer_options: Any,
    ):
        if self.backend is None:
            raise TypeError("OneCallTrainer is the neutral base: use a backend's mlp.Trainer (e.g. mlpug.pytorch)")
        if not callable(loss_func):
            raise TypeError(f"loss_func must be callable (e.g. a loss module or function), got {loss_func!r:.200}")
        if metrics is not None and not isinstance(metrics, Mapping):
            raise TypeError(
                "metrics must map names to metric functions, e.g. {'accuracy': mlp.metrics.accuracy}; got "
                f"{metrics!r:.200}"
            )
        metrics = dict(metrics or {})
        bad = {name: func for name, func in metrics.items() if not isinstance(name, str) or not callable(func)}
        if bad:
            raise TypeError(f"metrics must map names (str) to metric functions, got {bad!r:.200}")
        if "loss" in metrics:
            raise ValueError("metrics: 'loss' is always logged (the model's loss); give the metric another name")
        if not isinstance(allow_broadcast, bool):
            raise TypeError(f"allow_broadcast must be True or False, got {allow_broadcast!r:.100}")
        self.allow_broadcast = allow_broadcast
        self.model, self.loss_func, self.optimizer, self.metrics = model, loss_func, optimizer, metrics
        self.batch_chunk_size = trainer_options.get("batch_chunk_size")
        self.trainer: DefaultTrainer = self.backend.trainers.DefaultTrainer(
            optimizers=optimizer, model_components=model, **self._trainer_options(model, trainer_options)
        )
        self.training_model = self._training_model(model, loss_func)
        self.manager: Optional[TrainingManager] = None
        self.history: Optional[MetricsHistory] = None

    def train(
        self,
        train_dataset: Any,
        validation_dataset: Any = None,
        *,
        num_epochs: int = 1,
        batch_size: Optional[int] = None,
        validation_batch_size: Optional[int] = None,
        shuffle: bool = True,
        seed: int = 0,
        callbacks: Sequence[Callback] = (),
        progress: Progress = "bar",
        log_period: int = 200,
        checkpoints_path: Optional[str] = None,
        checkpoint_name: str = "model",
        metric_to_monitor: Optional[str] = None,
        run_async_validation: bool = False,
        **manager_options: Any,
    ) -> MetricsHistory:
        """Trains for ``num_epochs`` epochs and returns the ``MetricsHistory`` (one row per epoch).

        Datasets are batched here when they are samples, and used as they are when they already yield batches:

        * a tuple/list of arrays ``(inputs, targets)`` with the same first dimension (NumPy or backend tensors):
          sliced into batches of ``batch_size`` (default :data:`DEFAULT_BATCH_SIZE`, 32) by
          ``mlp.data.ResumableArrayBatches``, shuffled every epoch from ``(seed, epoch)`` only for training, so a
          resume is exact mid-epoch;
        * a ``torch.utils.data.Dataset`` (PyTorch): ``mlp.data.resumable_data_loader`` (the same order);
        * a ``tf.data.Dataset`` (TensorFlow) of samples with ``batch_size``: batched here (training: shuffled first
          with ``seed``, one reshuffle per epoch); one whose pipeline has a ``batch`` stage is used as it is;
        * anything else iterable (a ``DataLoader``, a list of batches): used as it is; then ``batch_size`` is an
          error, since it could not apply.

        Args:
            train_dataset: The training data (see above); batches are ``(inputs, targets)``.
            validation_dataset: Evaluated as a whole at every epoch end (``validation.dataset.*`` in the logs);
                None: no validation.
            num_epochs: Epochs to train (>= 1); with ``resume_from``, the total including those already done.
            batch_size: Samples per training batch (per process when distributed), for data that is batched here.
            validation_batch_size: Samples per validation batch; default ``batch_size``.
            shuffle: Shuffle the training samples that are batched here.
            seed: Seed of that shuffle.
            callbacks: More callbacks, after the standard ones (e.g. ``EarlyStopping``, ``AutoTensorboard``).
            progress: ``"bar"`` (a tqdm bar per epoch, needs tqdm), ``"log"`` (``LogProgress`` blocks every
                ``log_period`` batches) or None (silent).
            log_period: Batches between ``LogProgress`` blocks (``progress="log"``).
            checkpoints_path: Directory for a ``CheckpointManager`` (best model, latest model, training
                checkpoint); None: no checkpoints. Needed for ``resume_from="latest"``.
            checkpoint_name: The checkpoint files' base name.
            metric_to_monitor: The "best" model's metric; default ``"validation.dataset.loss"``, or
                ``"training.window_average.loss"`` without validation.
            run_async_validation: Validate on a worker thread while the next epoch trains
                (``TestMetricsLogger(run_async=True)``).
            **manager_options: Passed to the ``TrainingManager`` unchanged (``resume_from``, ``non_finite_loss``,
                ``num_batches_per_epoch``, ``handle_signals``, ...).

        Every call trains anew from the model's current weights: epochs count from 0 (the shuffle order of epoch
        0 again), with a new history and a new "best" record; to continue a run, resume it from its training
        checkpoint (``checkpoints_path`` and ``resume_from="latest"``).

        Returns:
            The ``MetricsHistory``: ``.rows``, ``.table()``, ``.to_dataframe()``, ``.save(directory, name)``.

        Raises:
            TypeError / ValueError: A bad argument, named, before anything trains (including the parts' own
                checks at the manager's construction); an option whose part is not built (e.g.
                ``metric_to_monitor`` without ``checkpoints_path``). Batches that are not ``(inputs, targets)``
                pairs are found at the first step (a ``TypeError``).
            ValueError / TypeError: A first-batch check failed, before any optimizer step: outputs and targets that
                broadcast in ``loss_func`` (see ``allow_broadcast``), a metric function that cannot run on the
                outputs, a training model return value without a scalar loss.
        """
        if progress not in _PROGRESS:
            raise ValueError(f"progress must be 'bar', 'log' or None, got {progress!r}")
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size")
        if validation_batch_size is not None:
            check_positive_int(validation_batch_size, "validation_batch_size")
        _check_prerequisites(
            {"validation_dataset": validation_dataset, "checkpoints_path": checkpoints_path},
            validation_batch_size=(validation_batch_size, None, "validation_dataset"),
            run_async_validation=(run_async_validation, False, "validation_dataset"),
            metric_to_monitor=(metric_to_monitor, None, "checkpoints_path"),
            checkpoint_name=(checkpoint_name, "model", "checkpoints_path"),
            resume_from=(
                resume_from if isinstance(resume_from := manager_options.get("resume_from"), str) else None,
                None,
                "checkpoints_path",
            ),
        )
        mlp = self.backend
        training_batches = self._batches(train_dataset, "train_dataset", batch_size, batch_size, True, shuffle, seed)
        evaluator = mlp.evaluation.MetricEvaluator(
            trainer=self.trainer, batch_metric_funcs=self.metrics, batch_chunk_size=self.batch_chunk_size
        )
        standard: list = [mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator)]
        set_names = ["training"]
        if validation_dataset is not None:
            validation_batches = self._batches(
                validation_dataset, "validation_dataset", validation_batch_size, validation_batch_size or batch_size,
                False, False, seed,
            )  # fmt: skip
            standard.append(
                mlp.callbacks.TestMetricsLogger(
                    validation_batches, "validation", metric_evaluator=evaluator, run_async=run_async_validation
                )
            )
            set_names.append("validation")
        if progress == "bar":
            standard.append(mlp.callbacks.ProgressBar())
        elif progress == "log":
            standard.append(mlp.callbacks.LogProgress(log_period=log_period, set_names=set_names))
        if checkpoints_path is not None:
            if metric_to_monitor is None:
                metric_to_monitor = (
                    "validation.dataset.loss" if validation_dataset is not None else "training.window_average.loss"
                )
            standard.append(
                mlp.callbacks.CheckpointManager(
                    checkpoints_path=checkpoints_path,
                    base_checkpoint_filename=checkpoint_name,
                    metric_to_monitor=metric_to_monitor,
                )
            )
        history = mlp.callbacks.MetricsHistory()
        manager = mlp.trainers.TrainingManager(
            self.trainer,
            training_batches,
            num_epochs=num_epochs,
            callbacks=[*standard, history, *callbacks],
            **manager_options,
        )
        self.trainer.set_training_model(self.training_model)
        if not self.allow_broadcast:
            self.trainer.add_first_batch_check(self.training_model.check_targets)
        self.manager, self.history = manager, history
        manager.start_training()
        return history

    def _batches(
        self, dataset: Any, argument: str, given_batch_size: Optional[int], batch_size: Optional[int], training: bool,
        shuffle: bool, seed: int,
    ) -> Iterable[Any]:  # fmt: skip
        """``dataset`` as an iterable of batches (see :meth:`train`); backends add their dataset types.

        Args:
            given_batch_size: The batch size given for this dataset: an error for data that is batched already.
            batch_size: Samples per batch for data batched here (None: ``DEFAULT_BATCH_SIZE``).
            training: The training set (shuffled with ``shuffle``, ``seed``) or an evaluation set (in order).
        """
        if isinstance(dataset, (tuple, list)) and dataset and hasattr(dataset[0], "shape"):
            if len(dataset) != 2 or not hasattr(dataset[1], "shape"):
                kinds = [type(item).__qualname__ for item in dataset]
                raise TypeError(f"{argument} must be two arrays (inputs, targets), got a {len(dataset)}-tuple {kinds}")
            try:
                return self.backend.data.ResumableArrayBatches(
                    tuple(dataset), batch_size or DEFAULT_BATCH_SIZE, shuffle=training and shuffle, seed=seed
                )
            except ValueError as error:
                raise ValueError(f"{argument}: {error}") from None
        if not hasattr(dataset, "__iter__"):
            raise TypeError(
                f"{argument} must be a tuple of arrays (inputs, targets), a dataset or an iterable of batches, got "
                f"{type(dataset).__qualname__}"
            )
        if given_batch_size is not None:
            raise ValueError(
                f"{argument} ({type(dataset).__qualname__}) already yields batches, so batch_size={given_batch_size} "
                "cannot apply: set the batch size where the batches are made, or pass the samples (arrays or a "
                "dataset)"
            )
        return dataset

    def _trainer_options(self, model: Any, options: dict) -> dict:
        """The ``DefaultTrainer`` options: the given ones, with the backend's defaults for the one-call API."""
        return options

    def _training_model(self, model: Any, loss_func: Callable) -> Any:
        """The backend training model: ``{"loss": ..., "auxiliary_results": outputs}`` of a batch, with a method
        ``check_targets(batch, outputs)``, the first-batch check of :func:`check_targets_fit`."""
        raise NotImplementedError


def backend_parts(
    *,
    default_trainer: Callable[..., DefaultTrainer],
    metric_evaluator: type[MetricEvaluator],
    checkpoint_manager: type[CheckpointManager],
    array_batches: type[ResumableArrayBatches],
) -> SimpleNamespace:
    """The :attr:`OneCallTrainer.backend` of a backend: its own classes with the neutral ``TrainingManager`` and
    callbacks, under the names of a backend package (``trainers.DefaultTrainer``, ``callbacks.ProgressBar``, ...).

    A backend builds it from its modules, not from its package (``mlpug.<backend>``, whose ``__init__`` imports the
    backend's one-call module).
    """
    return SimpleNamespace(
        trainers=SimpleNamespace(DefaultTrainer=default_trainer, TrainingManager=TrainingManager),
        evaluation=SimpleNamespace(MetricEvaluator=metric_evaluator),
        callbacks=SimpleNamespace(
            TrainingMetricsLogger=TrainingMetricsLogger,
            TestMetricsLogger=TestMetricsLogger,
            ProgressBar=ProgressBar,
            LogProgress=LogProgress,
            CheckpointManager=checkpoint_manager,
            MetricsHistory=MetricsHistory,
        ),
        data=SimpleNamespace(ResumableArrayBatches=array_batches),
    )


def _check_prerequisites(present: Mapping[str, Any], **options: tuple) -> None:
    """Raise when an option is set whose part is not built: ``name=(value, default, needed argument)``.

    Raises:
        ValueError: Names the option, its value and the argument it needs.
    """
    for name, (value, default, needed) in options.items():
        if value != default and present[needed] is None:
            raise ValueError(f"{name}={value!r} needs {needed}= (without it there is nothing it applies to)")


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch of the one-call API.

    Raises:
        TypeError: The batch is not a pair; the message says what it is.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "mlp.Trainer needs batches (inputs, targets), got a "
        f"{type(batch).__qualname__}{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}; with "
        "other batches, write the training model yourself (mlp.trainers.DefaultTrainer.set_training_model)"
    )


def broadcast_shape(first: Sequence[int], second: Sequence[int]) -> Optional[list[int]]:
    """The shape that arrays of shapes ``first`` and ``second`` broadcast to (NumPy's rules), or None when they do
    not broadcast."""
    result = []
    for index in range(1, max(len(first), len(second)) + 1):
        a = first[-index] if index <= len(first) else 1
        b = second[-index] if index <= len(second) else 1
        if a != b and 1 not in (a, b):
            return None
        result.append(max(a, b) if 1 in (a, b) else a)
    return result[::-1]


#: What :func:`check_targets_fit` asks its ``loss`` callable to change: nothing (None, the arguments as given), the
#: ``"targets"`` reshaped to the outputs' shape, the ``"outputs"`` reshaped to the targets' shape, or an axis (an
#: int, negative: counted from the end) along which the targets are rolled by one position.
ArgumentChange = Union[None, Literal["targets", "outputs"], int]


def made_up_values(shape: Sequence[int], inexact: bool, descending: bool = False) -> np.ndarray:
    """Distinct values of ``shape`` for :func:`check_targets_fit` (a NumPy array; backends convert it to their
    dtype): from 0.1 to 0.9 (or back) for a floating-point (``inexact``) dtype, else alternating 0 and 1.

    Args:
        shape: The array's shape.
        inexact: Whether the array's dtype is floating point or complex.
        descending: From 0.9 down to 0.1 (alternating from 1), so that outputs and targets made up together differ.
    """
    size = int(np.prod(shape))
    values: np.ndarray
    if inexact:
        values = np.linspace(0.9, 0.1, size) if descending else np.linspace(0.1, 0.9, size)
    else:
        values = (np.arange(size) + int(descending)) % 2
    return values.reshape(tuple(shape))


def check_targets_fit(
    outputs_shape: Sequence[Any], targets_shape: Sequence[Any], loss: Callable[[bool, ArgumentChange], float]
) -> None:
    """The first-batch check of ``allow_broadcast=False``: raise when the model's outputs and the targets broadcast
    against each other in ``loss_func`` and that changes the loss.

    Suspect are shapes that differ, hold as many elements and broadcast to a shape larger than both (outputs
    ``[B, 1]`` and targets ``[B]`` give ``[B, B]``). Then ``loss_func`` is called again, aligned both ways (the
    targets reshaped to the outputs' shape, the outputs reshaped to the targets' shape) and with the targets rolled
    by one position along an axis on which they meet outputs of size 1; on the first batch, and (where that raises
    nothing: constant outputs, e.g. of a model initialised with zeros, or constant targets) on made-up distinct values
    of the same shapes and dtypes. ``loss_func`` compared every output with every target when the loss as given
    differs (relative 1e-5) from both aligned ones and equals the rolled one (every target still meets every output).
    A loss that aligns the shapes itself passes, whichever side it changes: it gives the value of an alignment (Keras
    losses reshape the targets, ``mse_loss(outputs.squeeze(-1), targets)`` the outputs), or one that changes with the
    rolled targets (``mse_loss(outputs, targets[:, None])``, which the reshaped arguments make broadcast), or it
    raises on one of the changed arguments (``tf.squeeze(outputs, -1)``); so do class indices ``[B]`` against logits
    ``[B, C]`` (other numbers of elements). Warnings raised during these calls (torch's broadcast ``UserWarning``) are
    silenced: the calls are the check's, not the user's.

    Args:
        outputs_shape: Shape of the model's outputs for the first batch (known dimensions).
        targets_shape: Shape of its targets.
        loss: ``loss(made_up, change)``: the loss (a float) of the first batch (``made_up`` False) or of made-up
            distinct values of the same shapes (True), with the arguments changed as ``change`` (a
            :data:`ArgumentChange`) says; it may raise (then those values are not compared).

    Raises:
        ValueError: Names both shapes, the broadcast shape, the three losses, the fix (reshape the targets or the
            outputs to the other's shape) and ``allow_broadcast=True``.
    """
    outputs_shape, targets_shape = list(outputs_shape), list(targets_shape)
    if None in outputs_shape or None in targets_shape or outputs_shape == targets_shape:
        return
    combined = broadcast_shape(outputs_shape, targets_shape)
    if combined is None or combined in (outputs_shape, targets_shape):
        return
    if math.prod(outputs_shape) != math.prod(targets_shape):
        return
    roll_axis = next(
        axis
        for axis in range(-1, -len(targets_shape) - 1, -1)
        if targets_shape[axis] > 1 and (-axis > len(outputs_shape) or outputs_shape[axis] == 1)
    )  # exists: the broadcast shape is larger than the targets'
    losses = None
    for made_up in (False, True):  # the first batch, then made-up distinct values
        losses = _misfit(loss, made_up, roll_axis)
        if losses is not None:
            break
    if losses is None:
        return
    given, by_targets, by_outputs = losses
    values = "made-up values of these shapes" if made_up else "the first batch"
    to_outputs = _reshape_example("targets", targets_shape, outputs_shape)
    to_targets = _reshape_example("outputs", outputs_shape, targets_shape)
    raise ValueError(
        f"mlp.Trainer: the model's outputs have shape {outputs_shape} and the targets {targets_shape}; in loss_func "
        f"they broadcast to {combined}, comparing every output with every target, which trains a wrong model (the "
        f"loss of {values} is {given:.6g}, with the targets reshaped to {outputs_shape} {by_targets:.6g}, with the "
        f"outputs reshaped to {targets_shape} {by_outputs:.6g}). Fix: reshape one to the other's shape, either the "
        f"targets to {outputs_shape}{to_outputs} or, in loss_func, the outputs to {targets_shape}{to_targets}; or, "
        "when the broadcast is meant, mlp.Trainer(..., allow_broadcast=True). Checked before the first optimizer step."
    )


def _misfit(
    loss: Callable[[bool, ArgumentChange], float], made_up: bool, roll_axis: int
) -> Optional[tuple[float, float, float]]:
    """The losses ``(as given, targets reshaped, outputs reshaped)`` of :func:`check_targets_fit` where the first
    equals the loss with the targets rolled along ``roll_axis`` and differs from both others; else None, also where
    one raises or is not finite (nothing to compare). The rolled targets come first: a loss that aligns the shapes
    itself usually differs there, and is not called on reshaped arguments it may refuse (``tf.squeeze(outputs, -1)``
    of outputs ``[B]``: TensorFlow logs the error). Warnings are silenced (torch's broadcast ``UserWarning``): the
    calls are the check's, not the user's."""
    losses: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for change in (None, roll_axis, "targets", "outputs"):
            try:
                value = float(loss(made_up, change))
            except Exception:
                return None
            if not math.isfinite(value):
                return None
            if change == roll_axis and not math.isclose(losses[0], value, rel_tol=1e-5):
                return None
            losses.append(value)
    given, _, by_targets, by_outputs = losses
    if math.isclose(given, by_targets, rel_tol=1e-5) or math.isclose(given, by_outputs, rel_tol=1e-5):
        return None
    return given, by_targets, by_outputs


def _reshape_example(name: str, from_shape: list, to_shape: list) -> str:
    """`` (e.g. name[..., None])`` or `` (e.g. name[..., 0])`` where ``to_shape`` adds or drops a last dimension of
    size 1 (an expression that works on NumPy, torch and TensorFlow alike), else ``""``."""
    if to_shape == [*from_shape, 1]:
        return f" (e.g. {name}[..., None])"
    if from_shape == [*to_shape, 1]:
        return f" (e.g. {name}[..., 0])"
    return ""


def raise_loss_func_error(error: Exception, outputs: Any, targets: Any, call: str) -> NoReturn:
    """Raise what ``loss_func`` raised with what it got and what it must return: a ``TypeError`` from ``error`` when
    the model's outputs are no tensor (a tuple, a dict: the usual cause), else ``error`` with a note.

    Raises:
        TypeError / the type of ``error``: Names the types and shapes of the outputs and targets (see
            :func:`mlpug.trainers.trainer.describe_value`).
    """
    note = (
        f"mlpug: raised by {call} of mlp.Trainer, with the model's outputs {describe_value(outputs)} and the targets "
        f"{describe_value(targets)}; loss_func gets model(inputs) as the model returns it and must return the "
        "batch's scalar mean loss"
    )
    if hasattr(outputs, "shape"):
        add_note(error, note)
        raise error
    raise TypeError(
        f"{note}: for a model that returns a tuple or a dict, give a loss_func that takes it, or make the model "
        f"return one tensor (e.g. the logits [B, C]). loss_func raised {type(error).__name__}: {error}"
    ) from error
