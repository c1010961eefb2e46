"""The non-finite loss policy: a NaN or infinite training loss never makes a successful run.

Policies (``TrainingManager(non_finite_loss=...)``):

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
the pending tensors hold). Whatever the policy, no model or training checkpoint holds non-finite weights
(the CheckpointManager refuses to write one and keeps the last good file), and "best" never points at a
non-finite value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

from mlpug.logs import to_number

NonFiniteLossPolicy = Literal["raise", "skip_step", "warn"]
NON_FINITE_LOSS_POLICIES = get_args(NonFiniteLossPolicy)

_log = logging.getLogger("mlpug.non_finite")


class NonFiniteLossError(FloatingPointError):
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
            "training stopped and no checkpoint was written from this state (the last good one is kept). Lower the "
            "learning rate, check the data of that batch, or pass TrainingManager(non_finite_loss='skip_step' or "
            "'warn')"
        )
        self.global_iter, self.epoch, self.batch_step, self.value = global_iter, epoch, batch_step, value


def validate_non_finite_loss_policy(policy: Any) -> NonFiniteLossPolicy:
    """Return ``policy`` when it is one of :data:`NON_FINITE_LOSS_POLICIES`.

    Raises:
        ValueError: It is not; the message lists the accepted values.
    """
    if policy not in NON_FINITE_LOSS_POLICIES:
        raise ValueError(f"non_finite_loss must be one of {list(NON_FINITE_LOSS_POLICIES)}, got {policy!r:.100}")
    return policy


NonFiniteIndices = Callable[[Sequence[Any]], list]
"""``non_finite_indices(losses) -> [index, ...]`` of the losses that are not finite (one device wait)."""


class NonFiniteLossTracker:
    """Keeps the loss of every step since the last check and checks them together (see the module docstring).

    Args:
        policy: ``"raise"``, ``"skip_step"`` or ``"warn"``.
        non_finite_indices: The trainer's vectorised check (``Trainer.non_finite_indices``).
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
        """Check the pending losses with one conversion, then forget them.

        Raises:
            NonFiniteLossError: With the ``"raise"`` policy, naming the first non-finite iteration.
        """
        if not self._losses:
            return
        losses, positions = self._losses, self._positions
        self._losses, self._positions = [], []
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
