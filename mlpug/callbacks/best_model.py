"""``BestModel``: the decision of "best" of a ``CheckpointManager``, apart from writing files and loading them.

It holds the monitored metric, the :class:`~mlpug.callbacks.improvement.ImprovementRule`, the ``non_finite_metric``
policy and the one record of the best iteration (``best_logs``, also ``logs["best"]``). The ``CheckpointManager``
asks it at each period (synchronous values, from ``logs``) and for each asynchronous result (a view of ``logs`` as
of the evaluated weights), and writes the best model checkpoint when it says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

from mlpug.callbacks.improvement import ImprovementRule
from mlpug.logs import get_value_at, resolve
from mlpug.trainers.non_finite import NonFiniteMetricError, NonFiniteMetricPolicy
from mlpug.trainers.run_context import RunContext


class BestModel:
    """Decides whether the monitored value of an iteration is the best so far.

    Args:
        metric_to_monitor: Dotted path into ``logs["current"]``, e.g. ``"validation.dataset.loss"``.
        improvement: The rule (mode, minimum change; NaN / inf never improve).
        non_finite_metric: ``"raise"`` or ``"warn"`` for a NaN / inf monitored value (see ``CheckpointManager``).
        owner: The name of the ``CheckpointManager``, for messages.
        warn_every_value: Warn at every non-finite value (epoch level), else only at the first (batch level).

    Attributes:
        best_logs: A plain copy of ``logs["current"]`` at the best iteration so far (``{}`` before the first).
        num_non_finite_values: Non-finite monitored values met so far (``non_finite_metric="warn"``).
    """

    def __init__(
        self,
        metric_to_monitor: str,
        improvement: ImprovementRule,
        non_finite_metric: NonFiniteMetricPolicy,
        owner: str,
        warn_every_value: bool,
    ):
        self.metric_to_monitor = metric_to_monitor
        self.improvement = improvement
        self.non_finite_metric = non_finite_metric
        self.owner = owner
        self.warn_every_value = warn_every_value
        self.best_logs: dict = {}
        self.num_non_finite_values = 0
        self._log = logging.getLogger("mlpug.CheckpointManager")

    @property
    def best_value(self) -> Optional[float]:
        """The monitored value at the best iteration so far (None before the first improvement)."""
        return get_value_at(self.best_logs, self.metric_to_monitor) if self.best_logs else None

    def value_in(self, current: Mapping) -> Any:
        """The monitored value in ``current`` (``logs["current"]``): a number or None.

        Raises:
            KeyError: The path is not in ``current`` (the message lists the paths that exist).
            TypeError: The value is not a number.
        """
        metric = self.metric_to_monitor
        section = metric.split(".", 1)[0]
        try:
            value = get_value_at(current, metric)
        except KeyError as error:
            raise KeyError(
                f"{self.owner}: metric_to_monitor {metric!r} is not in logs['current']. {error.args[0]} A callback "
                f"of your own that writes it must declare it, e.g. produces = frozenset({{{section!r}}}), so that it "
                "runs first."
            ) from None
        if value is not None and not isinstance(value, (int, float)):
            raise TypeError(
                f"{self.owner}: the monitored metric {metric!r} must be a number, got {type(value).__qualname__}: "
                f"{value!r:.100}"
            )
        return value

    def consider(self, value: Any, view: dict, logs: dict, context: RunContext) -> bool:
        """Decide on ``value``, the monitored value of the weights at ``view``'s position (``logs["current"]``, or
        as of the weights an asynchronous result evaluated). On an improvement ``best_logs`` and ``logs["best"]``
        become a plain copy of ``view`` and ``logs["current"]["is_best"]`` is set.

        Returns:
            Whether ``value`` is the new best.

        Raises:
            NonFiniteLossError / NonFiniteWeightsError / NonFiniteMetricError: See :meth:`check_finite`.
        """
        self.check_finite(value, view, context)
        if value is None or not self.improvement.is_improvement(value, self.best_value):
            return False
        logs["current"]["is_best"] = True
        self.best_logs = logs["best"] = resolve(view)
        return True

    def check_finite(self, value: Any, current: Mapping, context: RunContext) -> None:
        """Apply ``non_finite_metric`` to a NaN / inf ``value`` of the weights at ``current``'s position (every rank
        alike: the values are reduced). A non-finite loss or non-finite weights are named first.

        Raises:
            NonFiniteLossError / NonFiniteWeightsError: Found by the run's check (their policy ``"raise"``).
            NonFiniteMetricError: ``non_finite_metric="raise"``.
        """
        if not isinstance(value, (int, float)) or math.isfinite(value):
            return
        context.check_finite(weights=True)
        metric = self.metric_to_monitor
        error = NonFiniteMetricError(metric, value, current["epoch"], current["global_iter"], self.owner)
        training_policy = metric.split(".", 1)[0] == "training" and context.non_finite_loss_policy
        if self.non_finite_metric == "raise" and training_policy in (False, "raise"):
            raise error
        self.num_non_finite_values += 1
        if self.num_non_finite_values == 1 or self.warn_every_value:
            policy = f"non_finite_loss={training_policy!r}" if training_policy else "non_finite_metric='warn'"
            self._log.warning(f"{error.finding}; it is not a candidate for the best model ({policy}).")

    def warn_at_end(self) -> None:
        """One more warning at the end of training when the monitored value was not finite at some check."""
        if self.num_non_finite_values:
            best_epoch = self.best_logs.get("epoch")
            best = f"the best is {self.best_value} (epoch {best_epoch})" if self.best_logs else "no best model"
            self._log.warning(
                f"{self.owner}: the monitored metric {self.metric_to_monitor!r} was not finite at "
                f"{self.num_non_finite_values} check(s) of this run; {best}"
            )
