"""The ``logs`` dict: its schema, lazy metric values and dotted-path access.

This module is the one place where the schema is written down. Every backend builds the same ``logs``.

Schema (keys are snake_case; durations are in seconds)::

    logs = {
        "epoch": int,                 # 0-based epoch being trained
        "final_epoch": int,           # num_epochs - 1
        "final_batch_step": int,      # num_batches_per_epoch - 1
        "cb_calls_success": bool,     # False once any callback reported a non-fatal problem
        "resumed_mid_epoch": bool,    # True while training an epoch it continues mid-way (after a resume or a
                                      # stop inside it): on_epoch_start then sees the restored callback states
        "training_settings": Any,     # passed to the training model as ``evaluate_settings`` during training
        "evaluate_settings": Any,     # passed to the model when evaluating
        "best": dict,                 # plain copy of ``current`` at the last improvement (owned by the
                                      # CheckpointManager, which decides "best"; {} without one)
        "current": {                  # rebuilt for every batch
            "epoch": int, "batch_step": int, "global_iter": int,  # all 0-based
            "training": {
                "batch": {"loss": float, <metric>: float, ...},
                "window_average": {"loss": float, ...},  # sample-weighted sliding window over recent batches
                "dataset": {...},                         # whole-dataset metrics, when computed
            },
            "<dataset name>": {"batch": {...}, "window_average": {...}, "dataset": {...}},  # e.g. "validation"
            "training_params": {
                "batch": {"duration": float, "lr": float, "batch_size": int,
                          "optimizer_step_skipped": bool},  # True when mixed precision skipped the step (inf/nan)
                "window_average": {"duration": float},
                "epoch": {"duration": float, "lr": float},
            },
            "is_best": bool,
        },
    }

``logs`` holds plain data only: the raw outputs of a step (loss tensor, auxiliary results such as logits) reach
consumers as ``TrainingManager.step_result``, never through ``logs``.

Metric leaves are produced as :class:`Deferred` values inside :class:`MetricValues` dicts. A deferred
value is computed (e.g. a tensor converted with ``.item()``) the first time a consumer reads it, and
the number replaces it, so that no device synchronisation happens at a step where nobody reads a value.
Readers always see Python numbers (or ``None``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

_MISSING = object()


class Deferred:
    """A value computed on first read, e.g. a tensor that becomes a Python float.

    Args:
        compute: Callable without arguments that returns the value (a Python number or ``None``).
    """

    __slots__ = ("_compute",)

    def __init__(self, compute: Callable[[], Any]):
        self._compute = compute

    def __call__(self) -> Any:
        return self._compute()

    def __repr__(self) -> str:
        return "Deferred(...)"


class MetricValues(dict):
    """A dict whose :class:`Deferred` values are resolved (once) when they are read.

    Every way of reading a value (``[]``, ``get``, ``items``, ``values``, ``copy``, ``repr``) returns
    resolved values; the resolved value is stored so it is computed at most once.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if type(value) is Deferred:
            value = value()
            dict.__setitem__(self, key, value)
        return value

    def __iter__(self):
        # Defined in Python on purpose: CPython then copies this dict (``dict(values)``, ``{**values}``,
        # ``other.update(values)``) through ``keys()`` and ``__getitem__``, so copies hold resolved values.
        return dict.__iter__(self)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def values(self):
        return [self[key] for key in self]

    def items(self):
        return [(key, self[key]) for key in self]

    def copy(self) -> "MetricValues":
        return MetricValues(self.items())

    def update_deferred(self, other: "MetricValues") -> None:
        """Add ``other``'s entries as they are, deferred values still unresolved (no conversion happens)."""
        for key in other:
            dict.__setitem__(self, key, dict.__getitem__(other, key))

    def __repr__(self) -> str:
        return f"MetricValues({dict(self.items())!r})"


def to_number(value: Any) -> Any:
    """Python number of a scalar: Python numbers as they are, numpy/torch scalars via ``item()``,
    TensorFlow eager tensors via ``numpy()``. This is where a device synchronisation happens."""
    if value is None or isinstance(value, (int, float)):
        return value
    if not hasattr(value, "item") and hasattr(value, "numpy"):  # TF eager tensor
        value = value.numpy()
    return value.item() if hasattr(value, "item") else value


def resolve(value: Any) -> Any:
    """Deep copy of a logs (sub)tree as plain dicts of Python values, with every deferred value resolved.

    Args:
        value: A logs dict or any part of it.

    Returns:
        Plain ``dict``/``list`` containers holding the resolved leaves.
    """
    if type(value) is Deferred:
        return value()
    if isinstance(value, Mapping):
        return {key: resolve(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(item) for item in value)
    return value


def iter_paths(logs: Mapping, prefix: str = "") -> Iterator[str]:
    """Yield every dotted path to a leaf of ``logs``."""
    for key in logs:
        path = f"{prefix}{key}"
        value = dict.__getitem__(logs, key) if isinstance(logs, dict) else logs[key]
        if isinstance(value, Mapping) and value:
            yield from iter_paths(value, path + ".")
        else:
            yield path


def get_value_at(logs: Mapping, path: str, default: Any = _MISSING) -> Any:
    """Read the value at a dotted path, e.g. ``"current.validation.dataset.loss"``.

    Args:
        logs: The logs dict (or any sub-dict).
        path: Keys joined by dots.
        default: Returned when the path does not exist; when not given, a missing path raises.

    Returns:
        The value (deferred values are resolved to Python numbers).

    Raises:
        KeyError: The path does not exist; the message lists the paths that do.
    """
    node: Any = logs
    for key in path.split("."):
        if isinstance(node, Mapping) and key in node:
            node = node[key]
            continue
        if default is not _MISSING:
            return default
        paths = sorted(iter_paths(logs))
        raise KeyError(
            f"logs path {path!r} does not exist (missing key {key!r}).{did_you_mean(path, paths)} Available paths: "
            f"{', '.join(paths) or '(none)'}"
        )
    return node


KERAS_LOG_NAMES = {"lr": "training_params.batch.lr", "learning_rate": "training_params.batch.lr"}
"""Keras log names whose ``logs["current"]`` path is not found by the rule of :func:`keras_equivalents`."""


def keras_equivalents(name: str) -> list[str]:
    """The ``logs["current"]`` paths that a Keras log name means, most likely first.

    ``val_<metric>`` is a metric of the validation dataset (``validation.dataset.<metric>``, or with a batch-level
    ``TestMetricsLogger`` ``validation.window_average.<metric>`` / ``validation.batch.<metric>``); any other name
    without a dot is a training metric (``training.window_average.<metric>``, the sliding average closest to Keras'
    running epoch average, then ``training.dataset.<metric>`` and ``training.batch.<metric>``); see also
    :data:`KERAS_LOG_NAMES`. A dotted path gets none, and so does a bare prefix such as ``val_`` (a name ending
    in ``_``: its metric name is left out).
    """
    if "." in name or not name or name.endswith("_"):
        return []
    if name in KERAS_LOG_NAMES:
        return [KERAS_LOG_NAMES[name]]
    if name.startswith("val_") and len(name) > 4:
        return [f"validation.{kind}.{name[4:]}" for kind in ("dataset", "window_average", "batch")]
    return [f"training.{kind}.{name}" for kind in ("window_average", "dataset", "batch")]


def did_you_mean(path: str, known: Iterable[str], open_sections: Iterable[str] = ()) -> str:
    """A sentence for an error about a missing log path: the paths of ``known`` that ``path`` may have meant.

    First the paths a Keras name means (:func:`keras_equivalents`, e.g. ``val_loss`` -> ``validation.dataset.loss``)
    or a path spelled like the first of them (``val_acc`` -> ``validation.dataset.accuracy``), then paths that are
    spelled like ``path`` (``difflib``); at most three.

    Args:
        path: The dotted path that is not there.
        known: The paths that exist (or are written).
        open_sections: Sections under which any path may exist (a Keras equivalent there counts as known).

    Returns:
        ``" Did you mean 'a' or 'b'?"``; for a Keras name whose paths nobody writes, a sentence saying which path
        it means; else ``""``.
    """
    known, open_sections = sorted(set(known)), set(open_sections)
    equivalents = keras_equivalents(path)
    found = [item for item in equivalents if item in known]
    if not found:  # under a section that may hold anything, the most likely one
        found = [item for item in equivalents if item.split(".", 1)[0] in open_sections][:1]
    close = difflib.get_close_matches(path, known, n=2, cutoff=0.6)
    if equivalents and not found:  # e.g. val_acc -> validation.dataset.accuracy
        prefix, metric = equivalents[0].rsplit(".", 1)
        close = [
            item
            for item in known
            if item.rsplit(".", 1)[0] == prefix
            and (
                item.rsplit(".", 1)[1].startswith(metric)
                or difflib.SequenceMatcher(None, metric, item.rsplit(".", 1)[1]).ratio() >= 0.75
            )
        ][:1] + close
    suggestions = list(dict.fromkeys(found + close))[:3]
    if suggestions:
        return f" Did you mean {' or '.join(map(repr, suggestions))}?"
    if equivalents and (path.startswith("val_") or path == "loss" or path in KERAS_LOG_NAMES):
        return f" (The Keras name {path!r} is {equivalents[0]!r} in mlpug's logs; nothing writes it here.)"
    return ""


def set_value_at(logs: dict, path: str, value: Any) -> None:
    """Set the value at a dotted path, creating intermediate dicts as needed."""
    keys = path.split(".")
    node = logs
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


MANAGER_LOG_PATHS = frozenset(
    {"epoch", "batch_step", "global_iter", "is_best"}
    | {f"training_params.batch.{key}" for key in ("duration", "lr", "batch_size", "optimizer_step_skipped")}
    | {"training_params.epoch.duration", "training_params.epoch.lr"}
)
"""The dotted paths under ``logs["current"]`` that the ``TrainingManager`` itself writes; callbacks declare
theirs (``Callback.log_paths``)."""


def new_logs(final_epoch: int, final_batch_step: int, training_settings: Any, evaluate_settings: Any) -> dict:
    """Return the top level of a fresh ``logs`` dict (see the module docstring for the schema)."""
    return {
        "epoch": 0,
        "final_epoch": final_epoch,
        "final_batch_step": final_batch_step,
        "cb_calls_success": True,
        "resumed_mid_epoch": False,
        "training_settings": training_settings,
        "evaluate_settings": evaluate_settings,
        "best": {},
        "current": {},
    }


def new_current(epoch: int, batch_step: int, global_iter: int) -> dict:
    """Return the ``current`` part of ``logs`` for one batch, with the standard empty sections."""
    return {
        "epoch": epoch,
        "batch_step": batch_step,
        "global_iter": global_iter,
        "training": {},
        "training_params": {"batch": MetricValues(), "window_average": MetricValues(), "epoch": MetricValues()},
        "is_best": False,
    }


def deferred_number(value: Any) -> Any:
    """``value`` itself when it is a Python number, None or already deferred; else a :class:`Deferred` converting
    it when read."""
    if value is None or type(value) in (int, float, bool, Deferred):
        return value
    return Deferred(partial(to_number, value))
