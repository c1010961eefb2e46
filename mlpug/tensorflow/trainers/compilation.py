"""Running a step function eagerly or compiled with ``tf.function``, and checking batches against a signature.

A step function has the form ``step(batch, settings)``. :class:`CompiledStep` compiles it:

* with a ``batch_data_signature`` (and optionally a ``settings_signature``) it is traced once, for that
  signature (``tf.function(input_signature=...)``); settings without a signature are a Python constant of the
  trace (one trace per distinct settings object);
* without a signature it is traced with ``reduce_retracing=True``: after the first trace, a batch of another
  shape (e.g. the smaller last batch of an epoch) causes one more trace with the differing dimensions relaxed
  to ``None``, which then serves every batch size. Every retrace is reported in a debug log line.

:class:`EagerStep` is the null object: it calls the step function as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np
import tensorflow as tf

_log = logging.getLogger("mlpug.tensorflow.DefaultTrainer")

StepFunction = Callable[[Any, Any], Any]


def validate_signature(signature: Any, argument_name: str) -> None:
    """Check that ``signature`` is None or a nested structure (tuple/list/dict) of ``tf.TensorSpec``.

    Raises:
        TypeError: Some leaf is not a ``tf.TypeSpec``; the message names the argument and the leaf.
    """
    if signature is None:
        return
    for leaf in tf.nest.flatten(signature):
        if not isinstance(leaf, tf.TypeSpec):
            raise TypeError(
                f"{argument_name} must be a tf.TensorSpec or a tuple/list/dict of them, e.g. "
                "(tf.TensorSpec(shape=(None, 28, 28), dtype=tf.float64), tf.TensorSpec(shape=(None,), "
                f"dtype=tf.uint8)); it contains {leaf!r:.100} of type {type(leaf).__qualname__}"
            )


def describe_structure(value: Any) -> str:
    """Short description of a batch: the shape and dtype of every tensor/array in its structure."""

    def describe(leaf: Any) -> str:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            return f"{tf.as_dtype(leaf.dtype).name}{list(leaf.shape)}"
        return type(leaf).__qualname__

    try:
        return str(tf.nest.map_structure(describe, value))
    except Exception:  # pragma: no cover - describing must never fail
        return type(value).__qualname__


def signature_mismatch(batch: Any, signature: Any) -> Optional[str]:
    """Why ``batch`` does not match ``signature``, or None when it does.

    Compares the nesting structure, and per tensor (or numpy array) its dtype and whether its shape is
    compatible with the spec's shape (``None`` dimensions match any size).
    """
    try:
        tf.nest.assert_same_structure(batch, signature, check_types=False)
    except (ValueError, TypeError) as error:
        return f"the structure differs: {str(error).splitlines()[0]}"
    for (path, leaf), spec in zip(_leaf_paths(batch), tf.nest.flatten(signature)):
        if not isinstance(spec, tf.TensorSpec):
            continue
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            return f"item {path or '<batch>'} is a {type(leaf).__qualname__}, the signature expects {spec}"
        dtype = tf.as_dtype(leaf.dtype.name if isinstance(leaf.dtype, np.dtype) else leaf.dtype)
        if dtype != spec.dtype or not spec.shape.is_compatible_with(leaf.shape):
            return (
                f"item {path or '<batch>'} is {dtype.name} with shape {list(leaf.shape)}, the signature expects "
                f"{spec.dtype.name} with shape {spec.shape.as_list() if spec.shape.rank is not None else '<any>'}"
            )
    return None


def _leaf_paths(value: Any, path: str = "") -> list:
    """``(path, leaf)`` pairs in ``tf.nest.flatten`` order (dict keys sorted), paths like ``[0]['images']``."""
    if isinstance(value, dict):
        return [pair for key in sorted(value) for pair in _leaf_paths(value[key], f"{path}[{key!r}]")]
    if isinstance(value, (list, tuple)):
        return [pair for index, item in enumerate(value) for pair in _leaf_paths(item, f"{path}[{index}]")]
    return [(path, value)]


def check_batch_signature(batch: Any, signature: Any, argument_name: str = "batch_data_signature") -> None:
    """Raise a ``ValueError`` when ``batch`` does not match ``signature`` (nothing when signature is None).

    Raises:
        ValueError: The message says what differs (structure, dtype or shape), and what the batch holds.
    """
    if signature is None:
        return
    problem = signature_mismatch(batch, signature)
    if problem is not None:
        raise ValueError(
            f"The batch does not match {argument_name}: {problem}. The batch holds {describe_structure(batch)}; "
            f"{argument_name} is {signature}. Make the data and the signature agree (dtype, shape, nesting)."
        )


class EagerStep:
    """Null object of :class:`CompiledStep`: calls ``step(batch, settings)`` eagerly, Python line by line."""

    def __init__(self, step: StepFunction, name: str):
        self.step = step
        self.name = name
        self.num_traces = 0

    def __call__(self, batch: Any, settings: Any) -> Any:
        return self.step(batch, settings)


_MANY_SETTINGS_TRACES = 8


def _frozen(value: Any) -> Any:
    """A hashable snapshot of ``value``'s current contents (dicts, lists, tuples, sets recursively); objects
    that are neither hashable nor containers are identified by ``id``."""
    if isinstance(value, Mapping):
        return ("dict", tuple(sorted(((repr(k), _frozen(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(item) for item in value))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(_frozen(item) for item in value))
    try:
        hash(value)
        return ("value", value)
    except TypeError:
        return ("id", id(value))


class CompiledStep:
    """``step(batch, settings)`` compiled with ``tf.function`` (see the module docstring for tracing rules).

    Args:
        step: The Python step function.
        name: Used in log and error messages, e.g. ``"train step"``.
        batch_data_signature: Nested ``tf.TensorSpec`` s of a batch, or None to trace without one.
        settings_signature: Nested ``tf.TensorSpec`` s of the settings (only used with a batch signature);
            None makes the settings a Python constant of the trace.

    Attributes:
        num_traces: How often the step function was traced so far (1 after the first call).
    """

    def __init__(
        self,
        step: StepFunction,
        name: str,
        batch_data_signature: Any = None,
        settings_signature: Any = None,
    ):
        self.step = step
        self.name = name
        self.batch_data_signature = batch_data_signature
        self.settings_signature = settings_signature
        self.num_traces = 0
        self._per_settings: dict = {}
        if batch_data_signature is None:
            self._function = tf.function(self._traced, reduce_retracing=True)
        elif settings_signature is not None:
            self._function = tf.function(self._traced, input_signature=(batch_data_signature, settings_signature))
        else:
            self._function = None  # one tf.function per settings object, see _for_settings

    def _traced(self, batch: Any, settings: Any) -> Any:
        self._log_trace(batch)
        return self.step(batch, settings)

    @tf.autograph.experimental.do_not_convert
    def _log_trace(self, batch: Any) -> None:
        """Count the trace and log it (runs only while tracing); not converted by AutoGraph."""
        self.num_traces += 1
        if self.num_traces == 1:
            _log.debug(f"{self.name}: tracing for batch {describe_structure(batch)}")
        else:
            _log.debug(
                f"{self.name}: retracing (trace {self.num_traces}) for batch {describe_structure(batch)}; "
                "give batch_data_signature to trace only once"
            )

    def _for_settings(self, settings: Any) -> Callable[[Any], Any]:
        """The step traced for the current *value* of ``settings`` (a trace constant): a changed value, also
        one changed in place, gets its own trace, as in the retracing mode without a batch signature."""
        key = _frozen(settings)
        entry = self._per_settings.get(key)
        if entry is None:
            function = tf.function(
                lambda batch: self._traced(batch, settings), input_signature=(self.batch_data_signature,)
            )
            entry = self._per_settings[key] = (function, settings)  # keep settings alive: an id in a key stays unique
            if len(self._per_settings) == _MANY_SETTINGS_TRACES:
                _log.warning(
                    f"{self.name}: traced for {_MANY_SETTINGS_TRACES} different settings values; settings are "
                    "constants of a trace, so every new value retraces. Give training_settings_signature to pass "
                    "changing settings as tensors."
                )
        return entry[0]

    def __call__(self, batch: Any, settings: Any) -> Any:
        try:
            if self._function is None:
                return self._for_settings(settings)(batch)
            return self._function(batch, settings)
        except (TypeError, ValueError):
            if self.batch_data_signature is not None and signature_mismatch(batch, self.batch_data_signature):
                check_batch_signature(batch, self.batch_data_signature)  # raises the clear error
            raise
