"""The non-finite policies: a NaN or infinite training loss, trainable weight or monitored metric never makes a
successful run.

Loss policies (``TrainingManager(non_finite_loss=...)``):

* ``"raise"`` (default): training ends with a :class:`NonFiniteLossError` naming the first global iteration
  whose loss was not finite; the failure path runs (``stopped_on_error=True``), the process exits non-zero, and
  no checkpoint is written from that state (the last good one stays).
* ``"skip_step"``: the trainer skips the optimizer step of a batch whose loss is not finite (reported as
  ``optimizer_step_skipped``) and training goes on; a warning says how many steps were skipped. Deciding
  whether to skip needs the loss on the host at every step on eager backends (PyTorch: one device wait per
  step, as ``GradScaler`` has); a compiled TensorFlow step decides in the graph.
* ``"warn"``: a warning names the first non-finite iteration and training goes on.

Detection adds no device wait per step: the manager keeps the loss tensors of the steps since the last check
(:class:`NonFiniteLossTracker`) and checks them all with one conversion where values are read anyway: when a
consumer reads logged values (``LogProgress`` at its log period, the ``CheckpointManager`` before it writes),
at every epoch end, at the end of training, and after ``max_pending`` unchecked steps (a bound on the memory
the pending tensors hold). With several ranks the loss checked is the step's loss over all ranks, so every rank
finds a non-finite loss at the same batch; it is reduced at the read points (:mod:`mlpug.trainers.read_points`),
which those consumers declare, and a check covers the steps reduced so far (the others wait for the next check).
The first non-finite iteration is named exactly either way. Whatever the policy, no model or training checkpoint
holds non-finite weights (the CheckpointManager refuses to write one and keeps the last good file, and checks the
losses of every step before it writes), and "best" never points at a non-finite value.

Weight policies (``TrainingManager(non_finite_weights=..., check_weights_every=...)``): the loss can stay finite
while the weights are not (one NaN input whose row a ReLU or a ``where`` hides from the loss still makes the
gradient NaN), so the trainable weights are checked too
(:meth:`mlpug.trainers.trainer.BackendTrainer.non_finite_weights`, one device wait per check, never one per step), where
they are read anyway: before every checkpoint write (the
CheckpointManager, on every rank, even at a step checked already: a hook may have swapped other weights in), at
every epoch end, at the end of training, and after ``check_weights_every`` training steps without a check (default
1000, the bound of the loss checks; None: only at those points).

* ``"raise"`` (default): training ends with a :class:`NonFiniteWeightsError` naming the first check that found
  them (the global iteration, epoch and batch step of the last step before it, and the previous check that found
  them finite) and which weights; the failure path runs and no checkpoint is written from that state.
* ``"warn"``: one warning at the first check that finds them, training goes on, and the end of training says
  so (never "All good"): for a model whose non-finite weights are deliberate or unused.

Metric policy (``CheckpointManager(non_finite_metric=...)``): a monitored metric that is NaN or infinite can never
be the best, so the best model checkpoint would silently never be written; ``"raise"`` (default) ends training with
a :class:`NonFiniteMetricError` naming the metric and its epoch, ``"warn"`` logs a warning and goes on. A dataset
metric (``TestMetricsLogger``) that is not finite is logged as a warning naming it and its epoch, monitored or not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional, get_args

from mlpug.distributed import is_pending
from mlpug.logs import to_number

NonFiniteLossPolicy = Literal["raise", "skip_step", "warn"]
NON_FINITE_LOSS_POLICIES = get_args(NonFiniteLossPolicy)
NonFiniteWeightsPolicy = Literal["raise", "warn"]
NON_FINITE_WEIGHTS_POLICIES = get_args(NonFiniteWeightsPolicy)
NonFiniteMetricPolicy = Literal["raise", "warn"]
NON_FINITE_METRIC_POLICIES = get_args(NonFiniteMetricPolicy)
DEFAULT_CHECK_WEIGHTS_EVERY = 1000
"""Training steps between two checks of the weights when no checkpoint or epoch end checks them sooner."""

_log = logging.getLogger("mlpug.non_finite")


class NonFiniteError(FloatingPointError):
    """Base of the errors of the non-finite policies (loss, weights, monitored metric)."""


class NonFiniteLossError(NonFiniteError):
    """The training loss was NaN or infinite.

    Attributes:
        global_iter: 0-based global iteration of the first non-finite loss.
        epoch: Its 0-based epoch.
        batch_step: Its 0-based batch step in that epoch.
        value: The loss value (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, global_iter: int, epoch: int, batch_step: int, value: float):
        super().__init__(
            f"the training loss is {value} at global iteration {global_iter} (epoch {epoch}, batch step {batch_step}); "
            "training stopped and no checkpoint was written from this state (an earlier one, if any, is kept). Lower "
            "the learning rate, check the data of that batch, or pass TrainingManager(non_finite_loss='skip_step' or "
            "'warn')"
        )
        self.global_iter, self.epoch, self.batch_step, self.value = global_iter, epoch, batch_step, value


class NonFiniteWeightsError(NonFiniteError):
    """Trainable weights held NaN or infinite values at a check (see the module docstring).

    Attributes:
        names: The non-finite trainable weights, as :meth:`~mlpug.trainers.trainer.BackendTrainer.non_finite_weights`
            names them.
        global_iter: 0-based global iteration of the last step before the check that found them (-1: before the
            first step of the run).
        epoch: Its 0-based epoch.
        batch_step: Its 0-based batch step in that epoch.
        last_finite_iter: The same position of the previous check, which found every weight finite; None when
            there was none in this run.
    """

    def __init__(
        self, names: Sequence[str], global_iter: int, epoch: int, batch_step: int, last_finite_iter: Optional[int]
    ):
        self.names = list(names)
        self.global_iter, self.epoch, self.batch_step = global_iter, epoch, batch_step
        self.last_finite_iter = last_finite_iter
        shown = ", ".join(self.names[:10]) + (f" and {len(self.names) - 10} more" if len(self.names) > 10 else "")
        where = (
            f"after global iteration {global_iter} (epoch {epoch}, batch step {batch_step})"
            if global_iter >= 0
            else "before the first training step of this run"
        )
        since = (
            f"the previous check, after global iteration {last_finite_iter}, found every weight finite"
            if last_finite_iter is not None
            else "no earlier check in this run"
        )
        self.finding = f"the trainable weights hold NaN or infinite values {where}: {shown} ({since})"
        super().__init__(
            f"{self.finding}. Training stopped and no "
            "checkpoint was written from this state (an earlier one, if any, is kept). The loss may have stayed "
            "finite: a NaN input whose row the model hides from the loss (a ReLU, a where) still makes the gradient "
            "NaN. Check the data and the learning rate, clip the gradients; TrainingManager(check_weights_every=n) "
            "finds it within n steps"
        )


class NonFiniteMetricError(NonFiniteError):
    """The metric a ``CheckpointManager`` monitors was NaN or infinite (``non_finite_metric="raise"``).

    Attributes:
        metric: The dotted path of the metric in ``logs["current"]``.
        value: Its value (``nan``, ``inf`` or ``-inf``).
        epoch: 0-based epoch of the weights it was computed from.
        global_iter: 0-based global iteration of the last step before it was computed.
    """

    def __init__(self, metric: str, value: float, epoch: int, global_iter: int, owner: str = "CheckpointManager"):
        self.metric, self.value, self.epoch, self.global_iter = metric, value, epoch, global_iter
        section = metric.split(".", 1)[0]
        self.finding = (
            f"{owner}: the monitored metric {metric!r} is {value} at epoch {epoch} (global iteration {global_iter})"
        )
        super().__init__(
            f"{self.finding}; a non-finite value is never the best, so no best model checkpoint would be written "
            f"for it. Check the {section!r} data (NaN or infinite inputs or targets) and the model, or pass "
            "CheckpointManager(non_finite_metric='warn') to go on with a warning"
        )


def _validate_policy(policy: Any, accepted: tuple, argument: str) -> Any:
    if policy not in accepted:
        raise ValueError(f"{argument} must be one of {list(accepted)}, got {policy!r:.100}")
    return policy


def validate_non_finite_loss_policy(policy: Any) -> NonFiniteLossPolicy:
    """Return ``policy`` when it is one of :data:`NON_FINITE_LOSS_POLICIES`.

    Raises:
        ValueError: It is not; the message lists the accepted values.
    """
    return _validate_policy(policy, NON_FINITE_LOSS_POLICIES, "non_finite_loss")


def validate_non_finite_weights_policy(policy: Any) -> NonFiniteWeightsPolicy:
    """Return ``policy`` when it is one of :data:`NON_FINITE_WEIGHTS_POLICIES`.

    Raises:
        ValueError: It is not; the message lists the accepted values.
    """
    return _validate_policy(policy, NON_FINITE_WEIGHTS_POLICIES, "non_finite_weights")


def validate_non_finite_metric_policy(policy: Any) -> NonFiniteMetricPolicy:
    """Return ``policy`` when it is one of :data:`NON_FINITE_METRIC_POLICIES`.

    Raises:
        ValueError: It is not; the message lists the accepted values.
    """
    return _validate_policy(policy, NON_FINITE_METRIC_POLICIES, "non_finite_metric")


NonFiniteIndices = Callable[[Sequence[Any]], list]
"""``non_finite_indices(losses) -> [index, ...]`` of the losses that are not finite (one device wait)."""


class NonFiniteLossTracker:
    """Keeps the loss of every step since the last check and checks them together (see the module docstring).

    Args:
        policy: ``"raise"``, ``"skip_step"`` or ``"warn"``.
        non_finite_indices: The trainer's vectorised check (``BackendTrainer.non_finite_indices``).
        max_pending: Check by itself after this many unchecked steps (bounds the memory of pending tensors).

    Raises:
        ValueError: A bad ``policy`` or ``max_pending``.
    """

    def __init__(self, policy: NonFiniteLossPolicy, non_finite_indices: NonFiniteIndices, max_pending: int = 1000):
        self.policy = validate_non_finite_loss_policy(policy)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.non_finite_indices = non_finite_indices
        self.max_pending = max_pending
        self.num_non_finite = 0  # non-finite steps found so far (skip_step / warn)
        self._losses: list = []
        self._positions: list = []  # (global_iter, epoch, batch_step) per pending loss

    def record(self, loss: Any, global_iter: int, epoch: int, batch_step: int) -> None:
        """Remember the loss of a step (no device wait); check all pending ones every ``max_pending`` steps."""
        self._losses.append(loss)
        self._positions.append((global_iter, epoch, batch_step))
        if len(self._losses) >= self.max_pending:
            self.check()

    def check(self) -> None:
        """Check the pending losses with one conversion, then forget them. With several ranks only those of the
        steps reduced over the ranks so far (the steps since the last read point stay pending), in order.

        Raises:
            NonFiniteLossError: With the ``"raise"`` policy, naming the first non-finite iteration.
        """
        count = len(self._losses)
        while count and is_pending(self._losses[count - 1]):  # steps are reduced in order: a pending suffix
            count -= 1
        if not count:
            return
        losses, positions = self._losses[:count], self._positions[:count]
        del self._losses[:count], self._positions[:count]
        bad = self.non_finite_indices(losses)
        if not bad:
            return
        global_iter, epoch, batch_step = positions[bad[0]]
        value = float(to_number(losses[bad[0]]))
        if self.policy == "raise":
            raise NonFiniteLossError(global_iter, epoch, batch_step, value)
        self.num_non_finite += len(bad)
        what = "their optimizer steps were skipped" if self.policy == "skip_step" else "training goes on"
        _log.warning(
            f"The training loss was not finite at {len(bad)} of the last {len(losses)} steps, first {value} at global "
            f"iteration {global_iter} (epoch {epoch}, batch step {batch_step}); {what} "
            f"(non_finite_loss={self.policy!r}; {self.num_non_finite} such steps so far)."
        )


class NonFiniteWeightsCheck:
    """Checks the trainable weights with the trainer's one-wait check, at the points the manager chooses (see the
    module docstring); two checks at the same global iteration are one, unless :meth:`forget` was called between
    them (the ``CheckpointManager`` does before every write: a hook may have set other weights at that step).

    Args:
        policy: ``"raise"`` or ``"warn"``.
        non_finite_weights: The trainer's check (``BackendTrainer.non_finite_weights``): names of the non-finite
            weights.
        every: Check as well when this many training steps passed since the last check (int >= 1), or None.

    Attributes:
        first_found: The first :class:`NonFiniteWeightsError` (``"warn"``: training went on), or None.
        names: What the latest check found (empty: every weight was finite).

    Raises:
        ValueError: A bad ``policy`` or ``every``.
    """

    def __init__(
        self,
        policy: NonFiniteWeightsPolicy,
        non_finite_weights: Callable[[], list],
        every: Optional[int] = DEFAULT_CHECK_WEIGHTS_EVERY,
    ):
        self.policy = validate_non_finite_weights_policy(policy)
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"check_weights_every must be an int >= 1 (training steps) or None, got {every!r:.100}")
        self.non_finite_weights = non_finite_weights
        self.every = every
        self.first_found: Optional[NonFiniteWeightsError] = None
        self.names: list = []
        self._checked_at: Optional[int] = None  # the number of trained steps at the latest check
        self._last_finite_iter: Optional[int] = None

    def next_check(self, num_steps: int) -> float:
        """After a check at ``num_steps`` trained steps: the step count at which the next check is due when nothing
        checks sooner (``every`` steps later; ``inf``: never)."""
        return math.inf if self.every is None else num_steps + self.every

    def forget(self) -> None:
        """Check again at the next call even at the same step count (the weights may have been set)."""
        self._checked_at = None

    def check(self, num_steps: int, epoch: int, batch_step: int) -> None:
        """Check the weights after ``num_steps`` training steps (one device wait, none when already checked there).

        Args:
            num_steps: Steps trained so far (the manager's ``global_iter``).
            epoch / batch_step: Position of the last of those steps.

        Raises:
            NonFiniteWeightsError: Non-finite weights and the policy is ``"raise"``.
        """
        if num_steps != self._checked_at:
            self.names = list(self.non_finite_weights())
            self._checked_at = num_steps
            if not self.names:
                self._last_finite_iter = num_steps - 1
                return
        elif not self.names:
            return
        error = NonFiniteWeightsError(self.names, num_steps - 1, epoch, batch_step, self._last_finite_iter)
        if self.policy == "raise":
            raise error
        if self.first_found is None:
            self.first_found = error
            _log.warning(
                f"{error.finding[0].upper()}{error.finding[1:]}; training goes on (non_finite_weights='warn')."
            )
