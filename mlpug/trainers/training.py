"""The one training loop (``TrainingManager``) and the contract with backend trainers (``Trainer``).

The manager owns epochs, batches, the stop flag, timing, ``logs``, hooks, signals and the failure path;
it never touches tensors. A backend ``DefaultTrainer`` owns one optimisation step.

Life cycle (every hook is dispatched to every callback, in list order)::

    set_training_manager(manager)                                # at manager construction
    on_training_start(num_epochs, num_batches_per_epoch, start_epoch, start_batch, start_update_iter)
    for epoch in range(start_epoch, num_epochs):
        on_epoch_start(logs)
        data_iterator = mlpug.data.epoch_iterator(dataset, epoch, start_batch if first epoch else 0)
        [resumed run, first epoch: random states restored (before the iterator at an epoch start, else after)]
        for batch_step in range(start_batch if first epoch else 0, num_batches_per_epoch):
            [stop requested or signal received -> leave both loops]
            batch = next(data_iterator)                          # data errors -> failure path
            on_batch_training_start(batch, logs)
            logs.current.training.batch.raw = trainer.train_on(batch, logs["training_settings"])
            on_batch_training_failed(exception, logs)            # only when the step raised -> failure path
            on_batch_training_completed(batch, logs)
        on_epoch_completed(logs)                                 # only for a completed epoch
    on_training_ended(stopped_early, stopped_on_error, interrupted, callback_calls_success)  # ALWAYS

Failure path: an exception in the step, the data iterator or a hook ends the loops, ``on_training_ended``
runs with ``stopped_on_error=True`` and the exception is re-raised with a note saying where it happened.
SIGINT / SIGTERM only set a flag; training ends at the next batch boundary with ``interrupted=True``
and the end hooks run (a CheckpointManager saves a training checkpoint there); then ``KeyboardInterrupt``
(SIGINT) or ``SystemExit(128 + signal)`` (SIGTERM) is raised, so the process ends with the conventional status.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple, Optional, Union

from mlpug import checkpointing
from mlpug import data as data_module
from mlpug import logs as logs_module
from mlpug.chunking import holds_array
from mlpug.distributed import DistributedContext, SerialContext
from mlpug.logs import Deferred, MetricValues, to_number
from mlpug.trainers.callbacks.callback import HOOKS, Callback

_log = logging.getLogger("mlpug.TrainingManager")


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


class Trainer(ABC):
    """Contract between the neutral ``TrainingManager`` and a backend: one optimisation step and state.

    Implementations must not know about epochs, callbacks or files.

    Attributes:
        last_step_skipped: True when the last :meth:`train_on` skipped the optimizer step (e.g. a float16 loss
            scaler found inf/nan gradients); the manager writes it to
            ``logs.current.training_params.batch.optimizer_step_skipped``.
    """

    last_step_skipped: bool = False

    def get_last_step_skipped(self) -> Any:
        """:attr:`last_step_skipped` as a bool or a backend boolean scalar, without waiting for the device.

        The manager stores it in ``logs`` and converts it only when a consumer reads it; backends whose flag
        lives on the device override this to return it unconverted.
        """
        return self.last_step_skipped

    def get_learning_rate_for_logs(self) -> Any:
        """The learning rate now (first optimizer), as a Python number or a backend scalar snapshot, without
        waiting for the device; the manager converts it only when a consumer reads it. Default:
        :meth:`get_learning_rate`."""
        return self.get_learning_rate()

    @abstractmethod
    def set_training_model(self, training_model: Any) -> None:
        """Set the model that maps ``(batch, evaluate_settings, inference_mode)`` to a loss (see ModelOutputs)."""

    @abstractmethod
    def train_on(self, batch: Any, training_settings: Any = None) -> ModelOutputs:
        """Run one optimisation step on ``batch``; return the model outputs (loss detached)."""

    @abstractmethod
    def evaluate_loss(self, batch: Any, evaluate_settings: Any = None, inference_mode: bool = True) -> ModelOutputs:
        """Evaluate the model on ``batch`` without updating anything (evaluation mode, no gradients)."""

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
        """Learning rate of the named optimizer, or of the first one; None when it has none."""

    @abstractmethod
    def ensure_ready(self) -> None:
        """Raise when the trainer cannot train yet (e.g. ``set_training_model`` was never called)."""


def name_objects(objects: Any, kind: str, expected_type: type | tuple, single_name: str) -> dict:
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


class DefaultTrainer(Trainer, ABC):
    """Backend-neutral part of the default trainer: naming, model set-up checks and output normalisation.

    Backends subclass it and implement the step. Training models may return:

    * the loss (a scalar tensor, mean over the samples of the batch);
    * a tuple ``(loss, auxiliary_results)`` or ``(loss, num_samples, auxiliary_results)``;
    * a dict with key ``loss`` and optional keys ``num_samples`` and ``auxiliary_results``.

    When ``num_samples`` is not given, it is the size of the first dimension of the batch's first tensor.
    """

    optimizer_type: type | tuple = object
    model_component_type: type | tuple = object

    def __init__(self, optimizers: Any, model_components: Any):
        self.optimizers = name_objects(optimizers, "optimizers", self.optimizer_type, "optimizer")
        self.model_components = name_objects(model_components, "model_components", self.model_component_type, "model")
        self.training_model = None

    def ensure_ready(self) -> None:
        if self.training_model is None:
            raise RuntimeError(
                f"{type(self).__name__}: no training model. Call trainer.set_training_model(train_model) "
                "before manager.start_training()."
            )

    def _normalise_outputs(self, results: Any, batch: Any, chunk_rows: Optional[int] = None) -> ModelOutputs:
        """Turn what the training model returned into ModelOutputs; raise when it holds no loss.

        Args:
            chunk_rows: When ``batch`` is a chunk of a training batch (gradient accumulation), its number of rows:
                its loss is weighted by its share of the batch's rows.

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
                    f"The training model returned a tuple of {len(results)} items; expected (loss,), "
                    "(loss, auxiliary_results) or (loss, num_samples, auxiliary_results)"
                )
        else:
            loss, num_samples, auxiliary_results = results, None, None
        if loss is None or not self._is_scalar_loss(loss):
            raise TypeError(
                "The training model must return a scalar loss tensor (alone, in a tuple or as dict['loss']); "
                f"got {type(loss).__module__}.{type(loss).__qualname__}: {loss!r:.200}"
            )
        if num_samples is None:
            num_samples = self._infer_num_samples(batch)
        elif chunk_rows is not None and not (type(num_samples) is int and num_samples == chunk_rows):
            raise ValueError(
                "With batch_chunk_size, every chunk's loss is weighted by its share of the batch's rows (samples), "
                f"but the training model returned num_samples={num_samples!r} for a chunk of {chunk_rows} rows, as for "
                "a loss averaged over other units (e.g. valid tokens), for which that weighting would be wrong. "
                "Return the loss as a mean over the rows of the batch without num_samples, or train without "
                "batch_chunk_size."
            )
        return ModelOutputs(loss, num_samples, auxiliary_results)

    @abstractmethod
    def _is_scalar_loss(self, loss: Any) -> bool:
        """True when ``loss`` is a scalar tensor of this backend."""

    def _infer_num_samples(self, batch: Any) -> Any:
        """Leading dimension of the first array in ``batch`` (an array, or tuples/lists/dicts holding arrays).

        A list/tuple whose first item holds no array (e.g. a list of ``(x, y)`` samples) counts its items.
        Models whose batches fit neither rule return ``num_samples`` themselves.
        """
        node = batch
        while True:
            shape = getattr(node, "shape", None)
            if shape is not None and len(shape) > 0:
                return self._leading_dimension(node)
            if isinstance(node, Mapping) and node:
                node = next(iter(node.values()))
            elif isinstance(node, (list, tuple)) and node and holds_array(node[0]):
                node = node[0]
            elif isinstance(node, (list, tuple)):
                return len(node)
            else:
                raise TypeError(
                    f"cannot infer the number of samples of a batch of type {type(batch).__qualname__}; "
                    "return it from the training model as num_samples"
                )

    def _leading_dimension(self, array: Any) -> Any:
        """Size of ``array``'s first dimension; backends with symbolic shapes override this."""
        return array.shape[0]


class TrainingManager:
    """Runs the training loop and dispatches the hooks of the callbacks (see the module docstring).

    Args:
        trainer: A backend ``DefaultTrainer`` (or any :class:`Trainer`).
        training_dataset: Iterable of batches; it is iterated anew every epoch.
        num_epochs: Number of epochs to train (>= 1).
        num_batches_per_epoch: Batches per epoch. Default ``len(training_dataset)``; required for iterables
            without ``len()`` (e.g. infinite generators), of which this many batches form an epoch.
        callbacks: Callback instances, called in list order. Producers of logs (metric loggers) must
            come before their consumers (progress, checkpoints); a warning is logged otherwise.
        training_settings: Passed to the training model as ``evaluate_settings`` in each training step.
        evaluate_settings: Passed to the model when callbacks evaluate it.
        distributed: Distributed context; default the single-process :class:`SerialContext`.
        handle_signals: Install SIGINT/SIGTERM handlers during training (main thread only).
        name: Name used in log messages.
        resume_from: Continue a run from a training checkpoint: its path, ``"latest"`` (the training checkpoint
            of the ``CheckpointManager`` in ``callbacks``) or a loaded checkpoint
            (``mlp.load_training_checkpoint(path)``). It is loaded and applied (:meth:`set_state`) when
            :meth:`start_training` begins, before any hook runs.

    Raises:
        TypeError / ValueError: At construction, for a bad trainer, dataset, epoch/batch count or callback, or a
            ``resume_from`` that names no existing file or needs a ``CheckpointManager`` that is not there.
    """

    def __init__(
        self,
        trainer: Trainer,
        training_dataset: Iterable,
        num_epochs: int = 1,
        num_batches_per_epoch: Optional[int] = None,
        callbacks: Optional[Sequence[Callback]] = None,
        training_settings: Any = None,
        evaluate_settings: Any = None,
        distributed: Optional[DistributedContext] = None,
        handle_signals: bool = True,
        name: str = "TrainingManager",
        resume_from: Union[str, os.PathLike, Mapping, None] = None,
    ):
        if not isinstance(trainer, Trainer):
            raise TypeError(
                f"trainer must be an mlpug Trainer (e.g. mlp.trainers.DefaultTrainer), got {trainer!r:.200}"
            )
        if not hasattr(training_dataset, "__iter__"):
            raise TypeError(f"training_dataset must be iterable, got {type(training_dataset).__qualname__}")
        if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1:
            raise ValueError(f"num_epochs must be an int >= 1, got {num_epochs!r}")
        if num_batches_per_epoch is None:
            try:
                num_batches_per_epoch = len(training_dataset)  # type: ignore[arg-type]
            except TypeError:
                raise ValueError(
                    f"training_dataset ({type(training_dataset).__qualname__}) has no len(); give num_batches_per_epoch"
                ) from None
        if (
            isinstance(num_batches_per_epoch, bool)
            or not isinstance(num_batches_per_epoch, int)
            or num_batches_per_epoch < 1
        ):
            raise ValueError(f"num_batches_per_epoch must be an int >= 1, got {num_batches_per_epoch!r}")
        dataset_length = getattr(training_dataset, "__len__", None)
        if dataset_length is not None and num_batches_per_epoch > dataset_length():
            raise ValueError(
                f"num_batches_per_epoch is {num_batches_per_epoch}, but training_dataset has only {dataset_length()} "
                "batches; give at most that many, or an iterable that yields enough batches per epoch"
            )
        callbacks = list(callbacks or [])
        for index, callback in enumerate(callbacks):
            if not isinstance(callback, Callback):
                raise TypeError(
                    f"callbacks[{index}] must be an mlpug Callback instance, got {type(callback).__qualname__}: "
                    f"{callback!r:.200}"
                )
        names = [callback.name for callback in callbacks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"callback names must be unique (they key checkpoint state); duplicated: {duplicates}")

        self.trainer = trainer
        self.training_dataset = training_dataset
        self.num_epochs = num_epochs
        self.num_batches_per_epoch = num_batches_per_epoch
        self.callbacks = callbacks
        self.distributed = distributed or SerialContext()
        self.handle_signals = handle_signals
        self.name = name

        self.epoch = 0  # next epoch to train
        self.batch_step = 0  # next batch step in that epoch
        self.global_iter = 0  # number of batches trained so far
        self.logs = logs_module.new_logs(
            num_epochs - 1, num_batches_per_epoch - 1, training_settings, evaluate_settings
        )

        self._stop_requested = False
        self._received_signal: Optional[int] = None
        self._epoch_end_dispatched = False  # get_state() then reports the next epoch
        self._pending_random_state: Optional[dict] = None  # restored where it was captured (see _train)
        self._resume_from = resume_from
        if resume_from is not None:
            from mlpug.trainers.callbacks.checkpoint_manager import check_resume_from

            check_resume_from(self, resume_from)
        self._hooks = self._build_dispatch_table()
        self._warn_on_callback_order()
        for callback in self.callbacks:
            callback.set_training_manager(self)

    # ----- public API -----
    def stop_training(self) -> None:
        """Ask training to stop: the current batch finishes, then the normal end hooks run."""
        self._stop_requested = True

    def get_state(self) -> dict:
        """Everything needed to continue training: the content of a training checkpoint.

        Returns:
            Plain containers and the backend's arrays (live references, not copies): ``epoch`` and
            ``batch_step`` (the next batch to train; inside ``on_epoch_completed`` already the next epoch),
            ``global_iter``, ``num_epochs``, ``num_batches_per_epoch``, ``best`` (plain logs), ``callbacks``
            (state per callback name), ``trainer`` (``trainer.get_state()``: model components, optimizers and
            whatever else the trainer holds), ``data`` (the order of a resumable training dataset, see
            :mod:`mlpug.data`) and ``random`` (the states of the registered random number generators, see
            :func:`mlpug.checkpointing.get_random_state`).
        """
        epoch, batch_step = (self.epoch + 1, 0) if self._epoch_end_dispatched else (self.epoch, self.batch_step)
        return {
            "epoch": epoch,
            "batch_step": batch_step,
            "global_iter": self.global_iter,
            "num_epochs": self.num_epochs,
            "num_batches_per_epoch": self.num_batches_per_epoch,
            "best": logs_module.resolve(self.logs["best"]),
            "callbacks": {callback.name: callback.get_state() for callback in self.callbacks},
            "trainer": self.trainer.get_state(),
            "data": data_module.get_data_state(self.training_dataset),
            "random": checkpointing.get_random_state(),
        }

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned, so that :meth:`start_training` continues exactly there.

        Counters, best logs, callback states and the trainer state are set at once; the random generator
        states are set when training resumes, at the point of the loop where they were captured. The parts
        ``trainer``, ``data`` and ``random`` are optional (older or partial states).

        Raises:
            ValueError: Naming the checkpoint file when known: callback names differ, the number of batches per
                epoch or the data order differs, or the trainer state does not fit the model components /
                optimizers (e.g. another layer shape).
        """
        source = (state.get("mlpug") or {}).get("path", "the training state")
        missing = sorted(set(state.get("callbacks", {})) ^ {c.name for c in self.callbacks})
        if missing:
            raise ValueError(
                f"{source} does not match the callbacks: {missing} present on only one side "
                f"(state has {sorted(state.get('callbacks', {}))}, manager has {[c.name for c in self.callbacks]})"
            )
        if state.get("num_batches_per_epoch", self.num_batches_per_epoch) != self.num_batches_per_epoch:
            raise ValueError(
                f"{source} was saved with num_batches_per_epoch={state['num_batches_per_epoch']}, this manager has "
                f"{self.num_batches_per_epoch}; the saved batch position would mean another place in the data"
            )
        data_module.check_data_state(self.training_dataset, state.get("data") or {}, str(source))
        if "trainer" in state:
            try:
                self.trainer.set_state(state["trainer"])
            except Exception as error:
                raise ValueError(
                    f"{source}: the saved trainer state does not fit this trainer's model components / "
                    f"optimizers: {type(error).__name__}: {error}"
                ) from error
        self.epoch, self.batch_step, self.global_iter = state["epoch"], state["batch_step"], state["global_iter"]
        self._epoch_end_dispatched = False
        self.logs["best"] = state.get("best", {})
        for callback in self.callbacks:
            callback.set_state(state["callbacks"][callback.name])
        self._pending_random_state = state.get("random")

    def start_training(self) -> None:
        """Train from the current counters to ``num_epochs`` (see the module docstring for the life cycle).

        Raises:
            RuntimeError: The trainer is not ready (e.g. no training model set).
            Exception: Whatever the step, the data or a hook raised, after the failure path ran.
            KeyboardInterrupt / SystemExit: After a clean end caused by SIGINT / SIGTERM.
        """
        self.trainer.ensure_ready()
        if self._resume_from is not None:
            from mlpug.trainers.callbacks.checkpoint_manager import load_training_state

            resume_from, self._resume_from = self._resume_from, None
            self.set_state(load_training_state(self, resume_from))
        self._stop_requested, self._received_signal = False, None
        stopped_on_error = False
        previous_handlers = self._install_signal_handlers()
        try:
            self._train()
        except BaseException as error:
            stopped_on_error = True
            _add_note(error, f"mlpug: training failed at epoch {self.epoch}, batch step {self.batch_step}")
            raise
        finally:
            try:
                self._end_training(stopped_on_error)
            finally:
                self._restore_signal_handlers(previous_handlers)
        if self._received_signal is not None:
            if self._received_signal == signal.SIGINT:
                raise KeyboardInterrupt("training interrupted by SIGINT; ended cleanly at a batch boundary")
            raise SystemExit(128 + int(self._received_signal))

    # ----- the loop -----
    def _train(self) -> None:
        logs = self.logs
        self._dispatch(
            "on_training_start",
            self.num_epochs,
            self.num_batches_per_epoch,
            self.epoch,
            self.batch_step,
            self.global_iter,
        )
        for epoch in range(self.epoch, self.num_epochs):
            self.epoch = logs["epoch"] = epoch
            epoch_start_time = time.perf_counter()
            logs["current"] = logs_module.new_current(epoch, self.batch_step, self.global_iter)
            self._dispatch("on_epoch_start", logs)
            # A resumed run restores the random states where they were captured: at an epoch start before the
            # data iterator is created (creating it may draw random numbers), mid-epoch after it.
            if self._pending_random_state is not None and self.batch_step == 0:
                self._restore_random_state()
            data = data_module.epoch_iterator(self.training_dataset, epoch, self.batch_step)
            if self._pending_random_state is not None:
                self._restore_random_state()
            epoch_completed = self._train_epoch(data, logs)
            if not epoch_completed:
                return
            params = logs["current"]["training_params"]["epoch"]
            params["duration"] = time.perf_counter() - epoch_start_time
            params["lr"] = _deferred_number(self.trainer.get_learning_rate_for_logs())
            self._epoch_end_dispatched = True
            try:
                self._dispatch("on_epoch_completed", logs)
            finally:  # a failing epoch-end hook leaves the epoch unfinished: an emergency checkpoint resumes at its end
                self._epoch_end_dispatched = False
            self.epoch, self.batch_step = epoch + 1, 0
            if self._should_stop():
                return
        self.epoch = self.num_epochs

    def _train_epoch(self, data: Any, logs: dict) -> bool:
        """Train the batches of one epoch; return False when stopped before its end."""
        trainer, training_settings = self.trainer, logs["training_settings"]
        start_hooks = self._hooks["on_batch_training_start"]
        completed_hooks = self._hooks["on_batch_training_completed"]
        epoch, new_current = self.epoch, logs_module.new_current
        for batch_step in range(self.batch_step, self.num_batches_per_epoch):
            if self._should_stop():
                return False
            self.batch_step = batch_step
            try:
                batch = next(data)
            except StopIteration:
                raise RuntimeError(
                    f"training_dataset ran out after {batch_step} batches in epoch {epoch}, but "
                    f"num_batches_per_epoch is {self.num_batches_per_epoch}"
                ) from None
            logs["current"] = current = new_current(epoch, batch_step, self.global_iter)
            if start_hooks:
                self._call(start_hooks, "on_batch_training_start", batch, logs)
            start_time = time.perf_counter()
            try:
                outputs = trainer.train_on(batch, training_settings)
            except Exception as error:
                self._dispatch_failure(error, logs)
                raise
            params = current["training_params"]["batch"]
            params["duration"] = time.perf_counter() - start_time
            params["lr"] = _deferred_number(trainer.get_learning_rate_for_logs())
            params["batch_size"] = _deferred_number(outputs.num_samples)
            params["optimizer_step_skipped"] = _deferred_number(trainer.get_last_step_skipped())
            current["training"]["batch"] = MetricValues(raw=outputs)
            self.global_iter += 1
            self.batch_step = batch_step + 1
            if completed_hooks:
                self._call(completed_hooks, "on_batch_training_completed", batch, logs)
        return True

    def _restore_random_state(self) -> None:
        state, self._pending_random_state = self._pending_random_state, None
        checkpointing.set_random_state(state)

    def _should_stop(self) -> bool:
        return self._stop_requested or self._received_signal is not None

    def _end_training(self, stopped_on_error: bool) -> None:
        interrupted = self._received_signal is not None
        stopped_early = not stopped_on_error and (self._stop_requested or interrupted)
        success = self.logs["cb_calls_success"]
        errors = []
        for callback in self.callbacks:
            try:
                if callback.on_training_ended(stopped_early, stopped_on_error, interrupted, success) is False:
                    self._report_problem(callback, "on_training_ended")
            except Exception as error:  # every callback gets its end hook, then the first error is raised
                _log.exception(f"{callback.name}.on_training_ended raised")
                errors.append(error)
        if stopped_on_error:
            _log.error("Training ended on an error.")
        elif interrupted:
            _log.warning(f"Training interrupted by signal {signal.Signals(self._received_signal).name}; ended cleanly.")
        elif stopped_early:
            _log.info("Training stopped early.")
        elif self.logs["cb_calls_success"]:
            _log.info("Training completed. All good! ❤️")
        else:
            _log.warning("Training completed, but one or more callback calls reported a problem; see the log.")
        if errors and not stopped_on_error:
            raise errors[0]

    # ----- hooks -----
    def _build_dispatch_table(self) -> dict:
        """Per hook, the bound methods of the callbacks that implement it (base no-ops are skipped)."""
        return {
            hook: [(cb, getattr(cb, hook)) for cb in self.callbacks if cb.overrides(hook)]
            for hook in HOOKS
            if hook != "set_training_manager"
        }

    def _dispatch(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every callback that implements it, in list order.

        Raises:
            ValueError: ``hook`` is not one of ``HOOKS``.
        """
        if hook not in self._hooks:
            raise ValueError(f"unknown hook {hook!r}; hooks are: {', '.join(HOOKS)}")
        self._call(self._hooks[hook], hook, *args)

    def _call(self, bound_hooks: list, hook: str, *args: Any) -> None:
        for callback, method in bound_hooks:
            try:
                result = method(*args)
            except Exception as error:
                _add_note(error, f"mlpug: raised by callback {callback.name!r} in {hook}")
                raise
            if result is False:
                self._report_problem(callback, hook)

    def _dispatch_failure(self, error: BaseException, logs: dict) -> None:
        for callback, method in self._hooks["on_batch_training_failed"]:
            try:
                method(error, logs)
            except Exception:
                _log.exception(f"{callback.name}.on_batch_training_failed raised while handling a failed step")

    def _report_problem(self, callback: Callback, hook: str) -> None:
        self.logs["cb_calls_success"] = False
        _log.warning(f"Callback {callback.name!r} reported a problem in {hook} (returned False); training goes on.")

    def _warn_on_callback_order(self) -> None:
        produced_at = {}
        for index, callback in enumerate(self.callbacks):
            for key in callback.produces:
                produced_at.setdefault(key, index)
        for index, callback in enumerate(self.callbacks):
            for key in sorted(callback.consumes):
                if produced_at.get(key, -1) > index:
                    producer = self.callbacks[produced_at[key]]
                    _log.warning(
                        f"Callback {callback.name!r} (position {index}) reads {key!r} metrics that "
                        f"{producer.name!r} (position {produced_at[key]}) writes later in the same hook; "
                        "put producers before consumers in the callbacks list."
                    )

    # ----- signals -----
    def _install_signal_handlers(self) -> dict:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}

        def handler(signum, frame):
            if self._received_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C aborts at once
            self._received_signal = signum
            _log.warning(f"Received {signal.Signals(signum).name}; training ends at the next batch boundary.")

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note") and note not in getattr(error, "__notes__", ()):
        error.add_note(note)


def _deferred_number(value: Any) -> Any:
    """``value`` itself when it is a Python number, None or already deferred; else a :class:`Deferred` converting
    it when read."""
    if value is None or type(value) in (int, float, bool, Deferred):
        return value
    return Deferred(partial(to_number, value))
