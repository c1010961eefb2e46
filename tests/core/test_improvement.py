"""``ImprovementRule``: the one "better" rule, its table of cases, and that EarlyStopping and ProgressBar ask it
(the CheckpointManager's delegation is tested in test_checkpoint_manager.py)."""

import io
import math

import pytest

from mlpug.callbacks import EarlyStopping, ProgressBar
from mlpug.callbacks.improvement import ImprovementRule

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "mode, min_delta, value, best, improves",
    [
        # no best yet: any finite value improves, a non-finite one never does
        ("min", 0.0, 3.0, None, True),
        ("max", 0.5, -3.0, None, True),
        ("min", 0.0, NAN, None, False),
        ("max", 0.0, INF, None, False),
        ("min", 0.0, -INF, None, False),
        # min mode: strictly lower than best - min_delta
        ("min", 0.0, 0.9, 1.0, True),
        ("min", 0.0, 1.0, 1.0, False),
        ("min", 0.0, 1.1, 1.0, False),
        ("min", 0.25, 0.8, 1.0, False),  # better by 0.2 < min_delta
        ("min", 0.25, 0.75, 1.0, False),  # exactly best - min_delta: not strictly better
        ("min", 0.25, 0.7, 1.0, True),
        ("min", 0.0, -INF, 1.0, False),  # -inf is never an improvement, not even in min mode
        ("min", 0.0, NAN, 1.0, False),
        # max mode: strictly higher than best + min_delta
        ("max", 0.0, 1.1, 1.0, True),
        ("max", 0.0, 1.0, 1.0, False),
        ("max", 0.0, 0.9, 1.0, False),
        ("max", 0.25, 1.2, 1.0, False),
        ("max", 0.25, 1.25, 1.0, False),
        ("max", 0.25, 1.3, 1.0, True),
        ("max", 0.0, INF, 1.0, False),  # inf is never an improvement, not even in max mode
        ("max", 0.0, NAN, 1.0, False),
        # an int min_delta and int values are numbers like any other
        ("max", 1, 3, 1, True),
        ("max", 1, 2, 1, False),
    ],
)
def test_the_rule_table(mode, min_delta, value, best, improves):
    assert ImprovementRule(mode, min_delta).is_improvement(value, best) is improves


def test_attributes_and_description():
    rule = ImprovementRule("max", 1)
    assert (rule.mode, rule.min_delta) == ("max", 1.0) and isinstance(rule.min_delta, float)
    assert rule.describe() == "max, min_delta 1.0"
    assert repr(rule) == "ImprovementRule(mode='max', min_delta=1.0)"
    assert (ImprovementRule().mode, ImprovementRule().min_delta) == ("min", 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="lowest"), "mode must be 'min' or 'max', got 'lowest'"),
        (dict(min_delta=-0.1), r"min_delta must be a number >= 0 \(in the metric's units\), got -0.1"),
        (dict(min_delta=NAN), "min_delta must be a number >= 0 .* got nan"),
        (dict(min_delta=True), "min_delta must be a number >= 0 .* got True"),
        (dict(min_delta="0.1"), "min_delta must be a number >= 0 .* got '0.1'"),
        (dict(mode="high", mode_argument="metric_opt_mode"), "metric_opt_mode must be 'min' or 'max', got 'high'"),
        (dict(min_delta=-1, min_delta_argument="improvement_threshold"), "improvement_threshold must be a number"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImprovementRule(**kwargs)


class Scripted(ImprovementRule):
    """A rule that answers from a script and records what it was asked."""

    def __init__(self, answers):
        super().__init__("min")
        self.answers, self.asked = list(answers), []

    def is_improvement(self, value, best):
        self.asked.append((value, best))
        return self.answers.pop(0)


def test_early_stopping_asks_the_rule():
    """``improves`` is the rule's answer for (value, best); ``mode`` / ``min_delta`` are the rule's."""
    stopping = EarlyStopping("validation.dataset.loss", mode="max", min_delta=0.5)
    assert isinstance(stopping.improvement, ImprovementRule)
    assert (stopping.mode, stopping.min_delta) == ("max", 0.5)
    stopping.improvement = Scripted([False, True])
    stopping.best = 2.0
    assert stopping.improves(10.0) is False  # the own max rule would say True
    assert stopping.improves(-10.0) is True  # ... and False here
    assert stopping.improvement.asked == [(10.0, 2.0), (-10.0, 2.0)]


def _progress_bar_descriptions(bar, values):
    bar.on_training_start(len(values), 1, 0, 0, 0)
    for epoch, value in enumerate(values):
        logs = {"current": {"epoch": epoch, "batch_step": 0, "training": {"batch": {"loss": value}}}}
        bar.on_epoch_start(logs)
        bar.on_epoch_completed(logs)
    return [line.split(": 0/1 batches")[0] for line in bar.file.getvalue().splitlines()]


def test_progress_bar_asks_the_rule_of_each_metric():
    """The best shown is the rule's: an always-improving rule makes every value the best; NaN is not shown."""
    values = [1.0, 2.0, NAN, 0.5]
    bar = ProgressBar("toy", metrics={"Loss": ("training.batch.loss", "min")}, loss_path=None, file=io.StringIO())
    assert bar.improvement["Loss"].mode == "min"
    assert _progress_bar_descriptions(bar, values) == [
        "(1) toy | Epoch: 1/4 | Loss: 1.0000 / (1.0000)",
        "(1) toy | Epoch: 2/4 | Loss: 2.0000 / (1.0000)",
        "(1) toy | Epoch: 3/4 | Loss: 2.0000 / (1.0000) | of epoch 2",  # NaN: the last value stays
        "(4) toy | Epoch: 4/4 | Loss: 0.5000 / (0.5000)",
    ]
    bar = ProgressBar("toy", metrics={"Loss": ("training.batch.loss", "min")}, loss_path=None, file=io.StringIO())
    bar.improvement["Loss"] = Scripted([True, True, True])
    descriptions = _progress_bar_descriptions(bar, values)
    assert descriptions[1] == "(2) toy | Epoch: 2/4 | Loss: 2.0000 / (2.0000)"  # 2.0 is "better" by the rule
    assert [value for value, _ in bar.improvement["Loss"].asked] == [1.0, 2.0, 0.5]  # NaN never reaches the rule
    assert math.isclose(bar.best["Loss"], 0.5)
