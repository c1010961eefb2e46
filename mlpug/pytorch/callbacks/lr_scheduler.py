"""PyTorch ``LRSchedulerWrapper``: ``torch.optim.lr_scheduler`` schedulers stepped by the training loop.

See :mod:`mlpug.callbacks.lr_scheduler` for when they step. Warm-up is composed from torch's own
schedulers, e.g. ``SequentialLR(optimizer, [LinearLR(optimizer, 0.1, total_iters=100), CosineAnnealingLR(...)],
milestones=[100])``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from mlpug.callbacks.lr_scheduler import LRSchedulerWrapper as _NeutralLRSchedulerWrapper

_SCHEDULER_TYPES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


class LRSchedulerWrapper(_NeutralLRSchedulerWrapper):
    """Steps ``torch.optim.lr_scheduler`` schedulers (``scheduler.step()``; ``ReduceLROnPlateau.step(metric)``)
    after every optimizer step, or every epoch with ``batch_level=False``; their ``state_dict()`` is in training
    checkpoints.

    Args:
        schedulers: A scheduler, a list or a dict of them (each holds its optimizer).
        batch_level: See :class:`mlpug.callbacks.lr_scheduler.LRSchedulerWrapper`.
        metric_to_monitor: Needed by (and only by) ``ReduceLROnPlateau``, e.g. ``"validation.dataset.loss"``.
        name: The callback's name.

    Raises:
        TypeError: A scheduler is not a ``torch.optim.lr_scheduler`` scheduler.
        ValueError: ``ReduceLROnPlateau`` without ``metric_to_monitor``, or ``metric_to_monitor`` without it.
    """

    def check_scheduler(self, name: str, scheduler: Any) -> None:
        if not isinstance(scheduler, _SCHEDULER_TYPES):
            raise TypeError(
                f"scheduler {name!r} must be a torch.optim.lr_scheduler scheduler (e.g. StepLR, OneCycleLR, "
                f"ReduceLROnPlateau); got a {type(scheduler).__module__}.{type(scheduler).__qualname__}"
            )
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if plateau and self.metric_to_monitor is None:
            raise ValueError(
                f"scheduler {name!r} is a ReduceLROnPlateau, which steps on a metric: pass "
                "metric_to_monitor='validation.dataset.loss' (or another path) and batch_level=False"
            )
        if not plateau and self.metric_to_monitor is not None:
            raise ValueError(
                f"scheduler {name!r} ({type(scheduler).__qualname__}) does not take a metric, but metric_to_monitor="
                f"{self.metric_to_monitor!r} was given; only ReduceLROnPlateau uses one"
            )

    def step_scheduler(self, name: str, scheduler: Any, metric: Optional[float]) -> None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if metric is not None:  # the wrapper passes the monitored value (epochs without it do not step)
                scheduler.step(metric)
        else:
            scheduler.step()

    def scheduler_state(self, name: str, scheduler: Any) -> Any:
        return scheduler.state_dict()

    def load_scheduler_state(self, name: str, scheduler: Any, state: Any) -> None:
        scheduler.load_state_dict(state)
