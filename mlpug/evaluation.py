"""``MetricEvaluator``: metrics from model outputs, sample-weighted, over a batch, a window or a dataset.

Metrics are computed in three steps (the design of the original mlpug):

* **gather** (every batch): each metric function maps the batch's :class:`MetricInputs` to a per-batch
  mean value and its weight (by default the batch's ``num_samples``). Values stay backend tensors:
  nothing is synchronised with the device here.
* **combine** (over batches of a window or dataset, and over ranks): ``sum(value * weight)``
  and ``sum(weight)``; a backend does this with one vectorised operation. In data-parallel training
  :meth:`MetricEvaluator.reduce` combines a batch's pairs over the ranks (added by the metric loggers on every
  rank after every step, reduced with the step's others at the next read point, see :mod:`mlpug.distributed`),
  and a dataset evaluation combines its batches on each rank
  first and then over the ranks, once: every rank gets the same values, and every sample counts once.
* **compute**: ``weighted_sum / weight_sum`` as a Python float, deferred until a consumer reads it
  (see :mod:`mlpug.logs`).

The evaluator never writes files or prints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple, Optional

from mlpug.chunking import split_batch, sum_values, validate_batch_chunk_size, weighted_sum
from mlpug.distributed import DistributedContext, SerialContext
from mlpug.logs import Deferred, MetricValues, to_number
from mlpug.trainers.trainer import BackendTrainer


class MetricInputs(NamedTuple):
    """What a metric function receives for one batch.

    Attributes:
        batch: The batch as the data iterable produced it.
        loss: Scalar loss tensor (mean over the batch's samples).
        num_samples: Number of samples in the batch.
        auxiliary_results: What the model returned besides the loss (e.g. logits), or None.
    """

    batch: Any
    loss: Any
    num_samples: Any
    auxiliary_results: Any


MetricFunction = Callable[[MetricInputs], Any]
"""Returns a per-batch mean value (weighted by ``num_samples``) or a tuple ``(mean_value, weight)``."""


def loss_metric(inputs: MetricInputs) -> Any:
    """The default metric: the batch's mean loss, weighted by its number of samples."""
    return inputs.loss


Gathered = dict
"""Per metric name, a ``(mean_value, weight)`` pair for one batch."""


class MetricEvaluator:
    """Computes named metrics for a batch, a sliding window of batches or a whole dataset.

    Args:
        trainer: The trainer whose ``evaluate_loss`` evaluates the model on batches that were not trained on
            (needed by ``evaluate_batch`` / ``evaluate_dataset``).
        batch_metric_funcs: Metric name -> function of :class:`MetricInputs`. The loss is always included
            (as ``"loss"``) unless this dict defines ``"loss"`` itself.
        evaluate_settings: Passed to the model when evaluating.
        distributed: Distributed context used to reduce sums over ranks. Default: the metric loggers give the
            evaluator the manager's; used alone, the trainer's (``trainer.distributed_context()``), else single
            process.
        name: Name used in messages.
        batch_chunk_size: When given (int >= 1), ``evaluate_batch`` evaluates a batch in chunks of at most this
            many samples (see :mod:`mlpug.chunking`), so big batches fit in memory; each metric of the
            batch is then the mean of its chunk values weighted by their metric weights (by default the chunks'
            number of samples), and its weight is their sum.

    Raises:
        TypeError: ``batch_metric_funcs`` is not a dict of str -> callable.
        ValueError: ``batch_chunk_size`` is not None or an int >= 1.
    """

    def __init__(
        self,
        trainer: Any = None,
        batch_metric_funcs: Optional[Mapping[str, MetricFunction]] = None,
        evaluate_settings: Any = None,
        distributed: Optional[DistributedContext] = None,
        name: str = "MetricEvaluator",
        batch_chunk_size: Optional[int] = None,
    ):
        self._batch_chunk_size = validate_batch_chunk_size(batch_chunk_size)
        funcs = {"loss": loss_metric}
        if batch_metric_funcs is not None:
            if not isinstance(batch_metric_funcs, Mapping):
                raise TypeError(
                    f"batch_metric_funcs must be a dict of name -> function, got {batch_metric_funcs!r:.200}"
                )
            for metric_name, func in batch_metric_funcs.items():
                if not isinstance(metric_name, str) or not callable(func):
                    raise TypeError(
                        f"batch_metric_funcs must map str names to callables; got {metric_name!r}: {func!r:.200}"
                    )
            funcs.update(batch_metric_funcs)
        self.trainer = trainer
        self.batch_metric_funcs = funcs
        self.evaluate_settings = evaluate_settings
        self._distributed = distributed
        self.name = name

    @property
    def distributed(self) -> DistributedContext:
        """The distributed context of the metric reductions (see the ``distributed`` argument)."""
        if self._distributed is not None:
            return self._distributed
        context = getattr(self.trainer, "distributed_context", None)
        return context() if callable(context) else SerialContext()

    @distributed.setter
    def distributed(self, context: Optional[DistributedContext]) -> None:
        self._distributed = context

    @property
    def has_distributed_context(self) -> bool:
        """True when a context was given (or set by a metric logger: the manager's)."""
        return self._distributed is not None

    def reduce(self, gathered: Gathered, reduction: Any = None) -> Gathered:
        """One batch's metric pairs combined over all ranks: added to the step's ``reduction`` (a
        :class:`mlpug.distributed.BatchReduction`: reduced with the step's other pairs by the collective of the next
        read point, values read lazily), or without one reduced now (blocking); ``gathered`` itself in a single
        process.

        Every rank must call this for the same batches in the same order (the metric loggers do, in their
        batch-end hooks).
        """
        distributed = self.distributed
        if distributed.world_size == 1:
            return gathered
        pairs = list(gathered.values())
        reduced = reduction.add(pairs) if reduction is not None else distributed.all_reduce_weighted(pairs)
        return dict(zip(gathered, reduced))

    @property
    def batch_chunk_size(self) -> Optional[int]:
        """Samples per chunk in ``evaluate_batch``, or None (whole batches)."""
        return self._batch_chunk_size

    @property
    def metric_names(self) -> list:
        return list(self.batch_metric_funcs)

    # ----- gather -----
    def gather(self, batch: Any, outputs: Any) -> Gathered:
        """Per metric, ``(mean_value, weight)`` for one batch from the model outputs (no device sync).

        Raises:
            Exception: What a metric function raised, with a note naming the metric function (and saying so when
                the model returned no ``auxiliary_results``).
        """
        inputs = MetricInputs(batch, outputs.loss, outputs.num_samples, outputs.auxiliary_results)
        gathered = {}
        for metric_name, func in self.batch_metric_funcs.items():
            try:
                result = func(inputs)
            except Exception as error:
                self._add_metric_note(error, metric_name, func, inputs)
                raise
            gathered[metric_name] = result if isinstance(result, tuple) else (result, inputs.num_samples)
        return gathered

    def _add_metric_note(self, error: Exception, metric_name: str, func: Any, inputs: MetricInputs) -> None:
        function = getattr(func, "__qualname__", repr(func))
        note = f"mlpug: raised by metric function {metric_name!r} ({function}) of {self.name}"
        if inputs.auxiliary_results is None:
            note += (
                "; the model returned no auxiliary_results (None). A metric that reads them needs a training model "
                "that returns them: {'loss': loss, 'auxiliary_results': logits} or (loss, auxiliary_results)"
            )
        if hasattr(error, "add_note"):  # Python >= 3.11
            error.add_note(note)

    def evaluate_batch(self, batch: Any, evaluate_settings: Any = None, model: Any = None) -> Gathered:
        """Evaluate the model on ``batch`` (inference mode) and gather its metrics, chunk by chunk when
        ``batch_chunk_size`` is set.

        Args:
            model: What evaluates the batch (its ``evaluate_loss``): default the trainer; an
                :class:`~mlpug.trainers.snapshot.EvaluationSnapshot` evaluates a frozen copy of the weights.

        Raises:
            TypeError / ValueError: With ``batch_chunk_size``, the batch cannot be split into chunks.
        """
        if self.trainer is None:
            raise RuntimeError(f"{self.name}: evaluating batches needs a trainer; pass MetricEvaluator(trainer=...)")
        model = self.trainer if model is None else model
        settings = self.evaluate_settings if evaluate_settings is None else evaluate_settings
        size = self._batch_chunk_size
        chunks = [batch] if size is None else [chunk.data for chunk in split_batch(batch, size)]
        gathered_chunks = [self.gather(chunk, model.evaluate_loss(chunk, settings)) for chunk in chunks]
        return self._combine_chunks(gathered_chunks)

    def _combine_chunks(self, gathered_chunks: Sequence[Gathered]) -> Gathered:
        """One batch's ``(mean_value, weight)`` per metric from its chunks': ``(sum(v*w) / sum(w), sum(w))``.

        Uses the values' own arithmetic, so tensors stay on their device (no sync). A total weight of Python
        zero gives ``(first chunk value, 0)``; backends whose weights are tensors may override this.
        """
        if len(gathered_chunks) == 1:
            return gathered_chunks[0]
        combined = {}
        for metric_name in gathered_chunks[0]:
            values = [gathered[metric_name][0] for gathered in gathered_chunks]
            weights = [gathered[metric_name][1] for gathered in gathered_chunks]
            weight_sum = sum_values(weights)
            if isinstance(weight_sum, (int, float)) and weight_sum == 0:
                combined[metric_name] = (values[0], weight_sum)
            else:
                combined[metric_name] = (weighted_sum(values, weights) / weight_sum, weight_sum)
        return combined

    # ----- combine + compute -----
    def batch_values(self, gathered: Gathered) -> MetricValues:
        """Deferred metric values of one batch."""
        return MetricValues({name: Deferred(_number_of(value)) for name, (value, _) in gathered.items()})

    def combined_values(self, gathered_batches: Sequence[Gathered], skip_non_finite: bool = False) -> MetricValues:
        """Deferred sample-weighted means of each metric over ``gathered_batches`` (on this rank: in data-parallel
        training, pass batches already combined over the ranks with :meth:`reduce`).

        ``gathered_batches`` is read when a value is first read, so it must not change afterwards
        (pass a copy or an immutable view).

        Args:
            gathered_batches: Per batch, what :meth:`gather` returned.
            skip_non_finite: Leave NaN / inf batch values (and their weights) out of the means, e.g. the batches
                whose optimizer step was skipped for a non-finite loss (``non_finite_loss="skip_step"``).
        """
        return MetricValues(
            {
                name: Deferred(self._mean_over(gathered_batches, name, skip_non_finite))
                for name in self.batch_metric_funcs
            }
        )

    def evaluate_dataset(self, dataset: Iterable, evaluate_settings: Any = None) -> MetricValues:
        """Evaluate the model over every batch of ``dataset``; return deferred sample-weighted means.

        In data-parallel training ``dataset`` is this rank's shard (see ``BackendTrainer.evaluation_dataset``;
        shards may differ in length, even be empty): its batches are combined on this rank, then over all ranks with one
        collective, called here on every rank, so that every rank gets the values of the whole dataset. This is
        :meth:`evaluate_on_rank` followed by :meth:`combine_ranks`, the two halves that asynchronous evaluation
        runs on its worker thread and on the training thread.

        Raises:
            ValueError: The dataset (over all ranks) yielded no batches.
        """
        if isinstance(self.trainer, BackendTrainer):  # (a trainer of one's own may have evaluate_loss only)
            self.trainer.prepare_evaluation()
        return self.combine_ranks(self.evaluate_on_rank(dataset, evaluate_settings))

    def evaluate_on_rank(self, dataset: Iterable, evaluate_settings: Any = None, model: Any = None) -> Any:
        """This rank's part of :meth:`evaluate_dataset`, without any collective (so it may run on another thread).

        Args:
            model: See :meth:`evaluate_batch`.

        Returns:
            One process: the deferred dataset values (:class:`~mlpug.logs.MetricValues`). Several ranks: this
            rank's ``{metric: (mean, weight)}`` as Python floats, for :meth:`combine_ranks`.

        Raises:
            ValueError: One process: the dataset yielded no batches.
        """
        gathered = self._evaluate_batches(dataset, evaluate_settings, model)
        if self.distributed.world_size > 1:
            local = {}
            for name in self.metric_names:  # this rank's sums as numbers (one vectorised conversion per metric)
                total, weight = self._weighted_sums([g[name][0] for g in gathered], [g[name][1] for g in gathered])
                local[name] = (total / weight if weight else 0.0, weight)
            return local
        if not gathered:
            raise ValueError(f"{self.name}: the dataset to evaluate yielded no batches")
        return self.combined_values(gathered)

    def _evaluate_batches(self, dataset: Iterable, evaluate_settings: Any, model: Any) -> list[Gathered]:
        """What :meth:`gather` returns for every batch of ``dataset``; the batches go to the model's
        ``evaluate_losses`` ``trainer.evaluation_steps_per_execution`` at a time (one compiled call each on
        TensorFlow), or one by one through :meth:`evaluate_batch` with ``batch_chunk_size``."""
        per_call = getattr(self.trainer, "evaluation_steps_per_execution", 1)
        if per_call == 1 or self._batch_chunk_size is not None:
            return [self.evaluate_batch(batch, evaluate_settings, model) for batch in dataset]
        if self.trainer is None:
            raise RuntimeError(f"{self.name}: evaluating batches needs a trainer; pass MetricEvaluator(trainer=...)")
        model = self.trainer if model is None else model
        settings = self.evaluate_settings if evaluate_settings is None else evaluate_settings
        gathered: list[Gathered] = []
        batches: list = []
        for batch in dataset:
            batches.append(batch)
            if len(batches) == per_call:
                gathered.extend(map(self.gather, batches, model.evaluate_losses(batches, settings)))
                batches = []
        if batches:
            gathered.extend(map(self.gather, batches, model.evaluate_losses(batches, settings)))
        return gathered

    def combine_ranks(self, rank_result: Any) -> MetricValues:
        """The dataset values from what :meth:`evaluate_on_rank` returned: with several ranks one collective (every
        rank calls this at the same point), else ``rank_result`` itself.

        Raises:
            ValueError: The dataset yielded no batches on any rank.
        """
        if self.distributed.world_size == 1:
            return rank_result
        combined = self.reduce(rank_result)
        if not to_number(next(iter(combined.values()))[1]):
            raise ValueError(f"{self.name}: the dataset to evaluate yielded no batches on any rank")
        return self.combined_values([combined])

    def _mean_over(
        self, gathered_batches: Sequence[Gathered], metric_name: str, skip_non_finite: bool = False
    ) -> Callable[[], Optional[float]]:
        def compute() -> Optional[float]:
            values = [g[metric_name][0] for g in gathered_batches]
            weights = [g[metric_name][1] for g in gathered_batches]
            weighted_sum, weight_sum = self._weighted_sums(values, weights, skip_non_finite)
            return weighted_sum / weight_sum if weight_sum else None

        return compute

    def _weighted_sums(self, values: Sequence[Any], weights: Sequence[Any], skip_non_finite: bool = False) -> tuple:
        """``(sum(value * weight), sum(weight))`` as Python floats (non-finite values left out when
        ``skip_non_finite``). Backends vectorise this."""
        pairs = [(to_number(v), to_number(w)) for v, w in zip(values, weights)]
        if skip_non_finite:
            pairs = [(v, w) for v, w in pairs if math.isfinite(v)]
        return sum(v * w for v, w in pairs), float(sum(w for _, w in pairs))


def _number_of(value: Any) -> Callable[[], Any]:
    return partial(to_number, value)
