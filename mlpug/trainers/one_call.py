"""The one-call API: ``mlp.Trainer(model, loss_func, optimizer, metrics=...).train(train_dataset, ...)``.

A facade in the spirit of pytorch-accelerated's ``Trainer`` and Keras' ``fit``, built only from the full API's parts:
a backend ``DefaultTrainer``, one ``MetricEvaluator``, ``TrainingMetricsLogger`` and ``TestMetricsLogger``, a
``ProgressBar`` or ``LogProgress``, an optional ``CheckpointManager``, a ``MetricsHistory`` (returned) and the
``TrainingManager``. Options keep the names of the part they go to, so a user who outgrows the facade writes the same
objects by hand (``examples/fashion_mnist``) without touching the model: the facade's training model only calls
``model(inputs)`` and ``loss_func`` on a ``(inputs, targets)`` batch.

Each backend subclasses :class:`OneCallTrainer` (``mlpug.pytorch.Trainer``, ``mlpug.tensorflow.Trainer``) with its
modules, its loss-argument order and the datasets it batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, Optional

from mlpug.trainers.arguments import check_positive_int

Progress = Optional[Literal["bar", "log"]]
_PROGRESS = ("bar", "log", None)
DEFAULT_BATCH_SIZE = 32  # as Keras fit


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
            always logged.
        **trainer_options: Passed to the backend ``DefaultTrainer`` unchanged (``batch_chunk_size`` for gradient
            accumulation, also used by the evaluator; ``use_mixed_precision``, ``autocast_dtype``,
            ``clip_gradients_norm``, ``clip_gradients_value``; PyTorch ``device``; TensorFlow
            ``distribution_strategy``, ``eager_mode``, ...): see its docstring.

    Attributes:
        trainer: The backend ``DefaultTrainer`` (built here, so that bad options fail at construction).
        training_model: The model the trainer calls: ``{"loss": loss_func(...), "auxiliary_results": outputs}``.
        manager: The ``TrainingManager`` of the last :meth:`train` call (None before).
        history: The ``MetricsHistory`` of the last :meth:`train` call (None before).

    Raises:
        TypeError: ``loss_func`` is not callable, or ``metrics`` is not a mapping of str to callables.
        Any error of the ``DefaultTrainer`` for a bad ``optimizer``, ``model`` or option, with its message.
    """

    #: The backend package (``mlpug.pytorch``, ``mlpug.tensorflow``), set by each backend subclass.
    backend: ClassVar[Any] = None

    def __init__(
        self,
        model: Any,
        loss_func: Callable[[Any, Any], Any],
        optimizer: Any,
        metrics: Optional[Mapping[str, Callable]] = None,
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
        self.model, self.loss_func, self.optimizer, self.metrics = model, loss_func, optimizer, metrics
        self.batch_chunk_size = trainer_options.get("batch_chunk_size")
        self.trainer = self.backend.trainers.DefaultTrainer(
            optimizers=optimizer, model_components=model, **self._trainer_options(model, trainer_options)
        )
        self.training_model = self._training_model(model, loss_func)
        self.manager: Any = None
        self.history: Any = None

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
        callbacks: Sequence[Any] = (),
        progress: Progress = "bar",
        log_period: int = 200,
        checkpoints_path: Optional[str] = None,
        checkpoint_name: str = "model",
        metric_to_monitor: Optional[str] = None,
        run_async_validation: bool = False,
        **manager_options: Any,
    ) -> Any:
        """Trains for ``num_epochs`` epochs and returns the ``MetricsHistory`` (one row per epoch).

        Datasets are batched here when they are samples, and used as they are when they already yield batches:

        * a tuple/list of arrays ``(inputs, targets)`` with the same first dimension (NumPy or backend tensors):
          sliced into batches of ``batch_size`` (default 32, as Keras ``fit``) by ``mlp.data.ResumableArrayBatches``,
          shuffled every epoch from ``(seed, epoch)`` only for training, so a resume is exact mid-epoch;
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
        self.manager, self.history = manager, history
        manager.start_training()
        return history

    def _batches(
        self, dataset: Any, argument: str, given_batch_size: Optional[int], batch_size: Optional[int], training: bool,
        shuffle: bool, seed: int,
    ) -> Any:  # fmt: skip
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
        """The backend training model: ``{"loss": ..., "auxiliary_results": outputs}`` of a batch."""
        raise NotImplementedError


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
