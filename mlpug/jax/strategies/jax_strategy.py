"""``JaxStrategy``: the neutral :class:`~mlpug.trainers.strategy.Strategy` plus where the JAX ``DefaultTrainer``
places the arrays of a step.

A compiled JAX step runs where its input arrays live: the strategy says where the training state (parameters,
optimizer states, the model's other variables) and the batches live, and ``jax.jit`` runs the step there (XLA
partitions it and inserts the collectives). The trainer calls these hooks at the few points where values enter the
step, unconditionally; the base class leaves every value where it is (one device).
"""

from __future__ import annotations

from typing import Any, TypeVar

from mlpug.trainers.strategy import Strategy

Tree = TypeVar("Tree")
"""A pytree (tuples, lists, dicts of arrays and other values); the hooks return it in the same structure."""


class JaxStrategy(Strategy):
    """A distribution strategy of the JAX backend (see the module docstring); subclass it to write another."""

    def place_state(self, tree: Tree) -> Tree:
        """The training state (parameter values, optimizer states, other variables: a pytree of arrays) placed where
        the compiled step reads it; called when the state enters the trainer (``set_training_model``, ``set_state``),
        never per step. Arrays that are already placed so must still be new arrays (the step donates them), leaves
        that are not arrays stay as they are. Default: ``tree`` itself (one device)."""
        return tree

    def place_batch(self, batch: Tree, batch_axis: int = 0) -> Tree:
        """The arrays of ``batch`` placed where the compiled step reads them, split along ``batch_axis`` (the sample
        axis: 0 for one batch, 1 for batches stacked along a new axis 0); called once per batch (or per stack of
        batches) before the step. Default: ``batch`` itself (one device).

        Raises:
            ValueError: The strategy cannot split the batch so (a subclass's message says why).
        """
        return batch

    def local_outputs(self, tree: Tree, global_values: bool = False) -> Tree:
        """The per-sample outputs of a step (the model's auxiliary results) as this process's part, matching the
        batch it fed (with several processes a step's arrays span every process's devices); with ``global_values``
        the step's loss (a value of the global batch) as this process's copy. Called once per step and evaluation,
        never waits for the device. Default: ``tree`` itself.

        Raises:
            ValueError: An auxiliary result that cannot be given as this process's part (a subclass's message names
                it and says why).
        """
        return tree

    def local_num_samples(self, num_samples: Any, batch: Any) -> Any:
        """The ``num_samples`` of a step's or evaluation's outputs as this process's count, matching the batch it
        fed (``batch``, as given to the trainer); called with :meth:`local_outputs`, never waits for the device.
        Default: ``num_samples`` itself.

        Raises:
            ValueError: The strategy cannot tell this process's count (a subclass's message says why).
        """
        return num_samples

    def check_asynchronous_evaluation(self) -> None:
        """Raise when evaluation on a worker thread (``TestMetricsLogger(run_async=True)``) cannot run under this
        strategy; called when the trainer makes an evaluation snapshot. Default: it can.

        Raises:
            RuntimeError: It cannot (a subclass's message says why and what to do).
        """
