"""The ``Callback`` base class, the one list of hooks, and the order in which callbacks receive them.

The position of every hook in the training life cycle is written down in
:mod:`mlpug.trainers.training_manager` (``TrainingManager``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from mlpug.logs import MANAGER_LOG_PATHS, did_you_mean
from mlpug.trainers.evaluation_result import EvaluationResult

if TYPE_CHECKING:
    from mlpug.trainers.run_context import RunContext

HOOKS = (
    "set_training_manager",
    "on_training_start",
    "on_epoch_start",
    "on_batch_training_start",
    "on_batch_training_failed",
    "on_batch_training_completed",
    "on_batch_checkpoint",
    "on_evaluation_result",
    "on_epoch_completed",
    "on_epoch_checkpoint",
    "on_training_checkpoint",
    "on_training_ended",
)
"""Every hook, in life-cycle order (``on_evaluation_result`` runs wherever a producer publishes a result: see
:meth:`Callback.on_evaluation_result`). Dispatching a name not in this list is an error."""


class Callback:
    """Base class of all callbacks: every hook is a no-op here.

    A hook may return ``False`` to report a non-fatal problem: the manager logs it and sets
    ``logs["cb_calls_success"] = False``. Raising an exception runs the failure path and ends training.

    Callbacks that write into ``logs`` declare what they produce (``produces``: dataset names such as
    ``"training"`` or ``"validation"``, or ``"best"`` for the best-model decision); a producer that reads what
    other producers write declares it in ``consumes``. The manager calls every hook on the producers first (each
    after the producers it consumes from), then on all other callbacks, each group in list order (see
    :func:`dispatch_order`), so that where a callback stands in the list never decides what it reads. A producer
    that knows the exact dotted paths it writes under ``logs["current"]`` declares them in ``log_paths`` (the metric
    loggers do), so that a consumer can check a path it is given (e.g. ``metric_to_monitor``) at construction
    (:func:`check_log_path`).

    Checkpoint phase: ``on_batch_checkpoint`` / ``on_epoch_checkpoint`` run after the batch-end / epoch-end hooks
    of *all* callbacks, and ``on_training_checkpoint`` once when training stops (always, before
    ``on_training_ended``); savers (the ``CheckpointManager``) write there, so a checkpoint holds the state of
    every callback after that batch or epoch, wherever the callback stands in the list.

    Args:
        name: Unique name of this callback; it is the key of its state in training checkpoints.
    """

    def __init__(self, name: Optional[str] = None):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a non-empty str or None, got {type(name).__name__}: {name!r:.100}")
        if name == "":
            raise ValueError("name must be a non-empty str (it keys the callback's checkpoint state), got ''")
        self.name = name or type(self).__name__
        self.training_manager: Optional[RunContext] = None  # set by set_training_manager (the 2021 name)
        self._log = logging.getLogger(f"mlpug.{type(self).__name__}")

    # Producers / consumers of logs sections (dataset names such as "training" or "validation", or "best").
    reduces_batch_metrics: bool = False
    """True for a callback that adds batch metrics to the step's reduction over the ranks
    (``context.batch_reduction``, see :mod:`mlpug.distributed`) in ``on_batch_training_completed``: that hook runs
    before the batch-end hooks of all other callbacks (and before the collective of a read point is issued)."""

    def batches_until_values_read(self, global_iter: int) -> Optional[int]:
        """With several ranks: how many of the next batches train before this callback's batch hooks read values
        reduced over the ranks (``logs`` values of the metric loggers, or ``context.check_finite()``).

        With several ranks every step's batch loss and metrics stay on their rank until a *read point*, where one
        collective reduces every step since the last one (see :mod:`mlpug.trainers.read_points`). A callback that
        reads them in a batch hook returns ``n``: its hooks of the batch with global iteration
        ``global_iter + n - 1`` read them (``n >= 1``; 1: every batch). Every rank must return the same value, also
        where only the primary rank reads (its read is what the collective is for). The last batch of every epoch
        is always a read point, so reads in epoch-end and end-of-training hooks (and in ``on_evaluation_result``)
        need no declaration. In one process nothing is reduced and this is not asked.

        Args:
            global_iter: The global iteration (0-based) of the next batch to train.

        Returns:
            None when the batch hooks read no reduced value; default: 1 when the callback implements
            ``on_batch_training_start``, ``on_batch_training_completed`` or ``on_batch_checkpoint`` (it may read
            at every batch) and does not override this method, else None.
        """
        if (
            self.overrides("on_batch_training_start")
            or self.overrides("on_batch_training_completed")
            or self.overrides("on_batch_checkpoint")
        ):
            return 1
        return None

    def batches_until_model_access(self, global_iter: int) -> Optional[int]:
        """For trainers that run several optimisation steps per call (``steps_per_execution``): how many of the
        next batches may be trained in one call before this callback's batch hooks need the model.

        With several steps per call the manager calls every batch-level hook for every batch after the call
        returns, with that batch's :class:`~mlpug.trainers.trainer.StepResult` and ``logs``, but the model,
        the optimizers and the learning rate are then those after the call's last step. A callback whose batch
        hook reads or changes them (writes a checkpoint, evaluates the model, steps a learning rate schedule)
        returns ``n``: its hooks of the batch with global iteration ``global_iter + n - 1`` need the state after
        exactly that batch, so the manager ends the call there (``n >= 1``; 1: after every batch, which means one
        step per call). Every rank must return the same value.

        Args:
            global_iter: The global iteration (0-based) of the next batch to train.

        Returns:
            None (default) when the batch hooks read only the step results and ``logs``; 1 when the callback
            overrides ``on_batch_training_start`` or ``on_batch_checkpoint`` (acting before a step, or on the model
            after every step) and does not override this method.
        """
        if self.overrides("on_batch_training_start") or self.overrides("on_batch_checkpoint"):
            return 1
        return None

    @property
    def produces(self) -> frozenset:
        """What this callback writes into ``logs`` (see the class docstring); default nothing."""
        return frozenset()

    @property
    def consumes(self) -> frozenset:
        """What this callback, being a producer, reads from other producers; default nothing."""
        return frozenset()

    @property
    def log_paths(self) -> Optional[frozenset]:
        """The dotted paths under ``logs["current"]`` that this callback writes, e.g.
        ``{"validation.dataset.loss"}``; None (default): not declared, so any path under the sections it
        ``produces`` may exist (see :func:`check_log_path`)."""
        return None

    @property
    def publishes_results(self) -> frozenset:
        """The dataset names whose whole-dataset evaluations this callback publishes as
        :class:`~mlpug.trainers.evaluation_result.EvaluationResult` events
        (``self.context.publish_result(result)``); default none. A ``TestMetricsLogger`` at dataset level
        publishes its dataset's."""
        return frozenset()

    @property
    def asynchronous_results(self) -> frozenset:
        """The dataset names (a subset of :attr:`publishes_results`) whose results this callback publishes late,
        evaluated on a snapshot of older weights; default none."""
        return frozenset()

    @property
    def context(self) -> RunContext:
        """The :class:`~mlpug.trainers.run_context.RunContext` given to :meth:`set_training_manager`.

        Raises:
            RuntimeError: The callback is not part of a ``TrainingManager`` yet.
        """
        if self.training_manager is None:
            raise RuntimeError(
                f"callback {self.name!r} is not part of a TrainingManager yet: pass it in "
                "TrainingManager(callbacks=[...]) first"
            )
        return self.training_manager

    # ----- hooks -----
    def set_training_manager(self, manager: RunContext) -> Optional[bool]:
        """Keep the run context (``manager``: the name of the 2021 API) as ``self.training_manager``; called once,
        when the ``TrainingManager`` is constructed. Overrides check their configuration against the run here
        (e.g. that a monitored path is written) and call ``super().set_training_manager(manager)``."""
        self.training_manager = manager
        return True

    def on_training_start(
        self, num_epochs: int, num_batches_per_epoch: int, start_epoch: int, start_batch: int, start_update_iter: int
    ) -> Optional[bool]:
        return True

    def on_epoch_start(self, logs: dict) -> Optional[bool]:
        return True

    def on_batch_training_start(self, training_batch: Any, logs: dict) -> Optional[bool]:
        return True

    def on_batch_training_failed(self, exception: BaseException, logs: dict) -> Optional[bool]:
        return True

    def on_batch_training_completed(self, training_batch: Any, logs: dict) -> Optional[bool]:
        return True

    def on_batch_checkpoint(self, logs: dict) -> Optional[bool]:
        """Checkpoint phase of a batch: after every callback's ``on_batch_training_completed``."""
        return True

    def on_evaluation_result(self, result: EvaluationResult, logs: dict) -> Optional[bool]:
        """One whole-dataset evaluation result, dispatched once per result, in the order published.

        Runs inside the hook in which the producer published it (synchronous ``TestMetricsLogger``: its
        ``on_epoch_completed``; asynchronous: the epoch end or the ``on_training_checkpoint`` at which it lands),
        after the producers dispatched before the publisher; a consumer (a callback that produces nothing, or a
        producer that consumes the result's dataset) gets it before its own part of that hook. When several
        results land at once, each gets its own call, oldest first. ``result.epoch`` / ``global_iter`` give the
        position of the evaluated weights; ``logs["current"]`` is that of the hook (and holds the newest result).
        """
        return True

    def on_epoch_completed(self, logs: dict) -> Optional[bool]:
        return True

    def on_epoch_checkpoint(self, logs: dict) -> Optional[bool]:
        """Checkpoint phase of an epoch: after every callback's ``on_epoch_completed``; the manager's counters
        already point at the next epoch."""
        return True

    def on_training_checkpoint(self, stopped_early: bool, stopped_on_error: bool, interrupted: bool) -> Optional[bool]:
        """Checkpoint phase at the end of training: once, always (also after an error or a signal), before
        ``on_training_ended``."""
        return True

    def on_training_ended(
        self, stopped_early: bool, stopped_on_error: bool, interrupted: bool, callback_calls_success: bool
    ) -> Optional[bool]:
        return True

    # ----- state -----
    def get_state(self) -> dict:
        """Plain-container state for training checkpoints; stateless callbacks return ``{}``."""
        return {}

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned."""

    def overrides(self, hook: str) -> bool:
        """True when this callback's class implements ``hook`` itself (the base no-op is skipped)."""
        return getattr(type(self), hook) is not getattr(Callback, hook)


def check_log_path(path: str, callbacks: Sequence[Callback], argument: str) -> None:
    """Check that something writes ``path`` into ``logs["current"]``, before training starts.

    ``path`` is written when the ``TrainingManager`` writes it (:data:`mlpug.logs.MANAGER_LOG_PATHS`), a callback
    declares it in ``log_paths``, or its first key (its section) is in the ``produces`` of a callback that declares
    no ``log_paths`` (then anything under that section may exist).

    Args:
        path: A dotted path under ``logs["current"]``, e.g. ``"validation.dataset.loss"``.
        callbacks: All callbacks of the training.
        argument: What names ``path`` in the message, e.g. ``"CheckpointManager: metric_to_monitor"``.

    Raises:
        ValueError: Nothing writes ``path``; the message suggests the paths it may mean (a Keras name such as
            ``val_loss``, or a typo: see :func:`mlpug.logs.did_you_mean`) and lists the paths that are written.
    """
    section = path.split(".", 1)[0]
    declared = set(MANAGER_LOG_PATHS)
    open_sections = set()
    for callback in callbacks:
        paths = callback.log_paths
        if paths is None:
            open_sections |= set(callback.produces)
        else:
            declared |= set(paths)
    if path in declared or section in open_sections:
        return
    producers = [callback.name for callback in callbacks if section in callback.produces]
    if producers:
        reason = f"the callbacks that produce {section!r} ({', '.join(producers)}) do not write it"
    else:
        reason = f"no callback produces {section!r}"
    anything_under = f"; and anything under {sorted(open_sections)}" if open_sections else ""
    suggestion = did_you_mean(path, declared, open_sections)
    raise ValueError(
        f"{argument} {path!r} is not written into logs['current']: {reason}.{suggestion} Paths that are written: "
        f"{', '.join(sorted(declared))}{anything_under}. A callback of your own that writes it declares its section in "
        f"produces (e.g. produces = frozenset({{{section!r}}})), and may declare its paths in log_paths."
    )


def dispatch_order(callbacks: Sequence[Callback]) -> list[Callback]:
    """The order in which callbacks receive every hook: producers first, then the others, each in list order.

    A producer (non-empty ``produces``) that consumes what another producer produces comes after it (a stable
    topological order); callbacks that produce nothing may read anything, so they come after all producers.

    Raises:
        ValueError: Producers consume from each other in a cycle (the callbacks are named).
    """
    producers = [callback for callback in callbacks if callback.produces]
    others = [callback for callback in callbacks if not callback.produces]
    ordered: list[Callback] = []
    pending = list(producers)
    while pending:
        for callback in pending:
            waits_for = [other for other in pending if other is not callback and callback.consumes & other.produces]
            if not waits_for:
                ordered.append(callback)
                pending.remove(callback)
                break
        else:
            raise ValueError(
                "callbacks consume from each other in a cycle: "
                + ", ".join(f"{c.name!r} produces {sorted(c.produces)}, consumes {sorted(c.consumes)}" for c in pending)
            )
    return ordered + others
