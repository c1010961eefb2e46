"""Running a step function eagerly or compiled with ``tf.function``, and checking batches against a signature.

A step function has the form ``step(batch, settings)``. :class:`CompiledStep` compiles it:

* with a ``batch_data_signature`` (and optionally a ``settings_signature``) it is traced once, for that
  signature (``tf.function(input_signature=...)``); settings without a signature are a Python constant of the
  trace (one trace per distinct settings object);
* without a signature it is traced with ``reduce_retracing=True``: after the first trace, a batch of another
  shape (e.g. the smaller last batch of an epoch) causes one more trace with the differing dimensions relaxed
  to ``None``, which then serves every batch size. Every retrace is reported in a debug log line; a retrace for
  batch dtypes (or a structure) no trace had before, and the 5th trace, in a warning that names the step, the batch
  specs and what to do (at trace time: nothing per step). TensorFlow's own frequent-retracing warning is turned off
  for these functions: it names ``CompiledStep._traced`` and counts the traces of every step of the process together.

Dispatch: calling a ``tf.function`` builds the trace type of every argument and looks it up among the traces
(``docs/design-notes.md`` has what that costs); calling the traced ``ConcreteFunction`` directly only binds
the arguments to its input types, which raises ``TypeError`` when they do not fit. So :class:`CompiledStep`
keeps the concrete function that ``tf.function`` chose for the last batch and calls it directly while batches
fit it, falling back to the ``tf.function`` (which retraces where needed) when they do not. It keeps a concrete
function only where every batch that fits it would also be dispatched to it by ``tf.function``: a trace with
fully defined shapes, or the only trace (e.g. one with a signature). So the graph that runs for a batch is the
same either way (with the short last batch: the full-batch trace for full batches, as ``tf.function`` would
choose). Two details keep it so: the traced function takes its arguments packed in one tuple, since a concrete
function whose arguments do not bind retries them as a flat list of tensors and would then run a single tensor
of another shape through the graph unchecked; and without a signature, NumPy arrays and scalars in the batch and
the settings are converted to tensors first (``tf.function`` traces them by their own dtype, while binding would
cast them to the trace's).

:class:`EagerStep` is the null object: it calls the step function as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
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


def stack_batches(batches: Sequence[Any]) -> Any:
    """One batch structure whose arrays have a new leading dimension: the batches, in order (``np.stack`` for numpy
    arrays, ``tf.stack`` for tensors); the batches must have the same structure, shapes and dtypes."""
    return tf.nest.map_structure(
        lambda *arrays: np.stack(arrays) if isinstance(arrays[0], np.ndarray) else tf.stack(arrays), *batches
    )


def same_shape_runs(batches: Sequence[Any]) -> list[list]:
    """``batches`` split into runs of consecutive batches whose arrays have the same shapes and dtypes (so each
    run can be stacked), in order; e.g. full batches and the short last batch of an epoch form two runs."""
    runs: list[list] = []
    previous = None
    for batch in batches:
        key = tuple((tuple(leaf.shape), leaf.dtype) for leaf in tf.nest.flatten(batch))
        if runs and key == previous:
            runs[-1].append(batch)
        else:
            runs.append([batch])
        previous = key
    return runs


def _as_tensors(values: Sequence[Any]) -> list:
    """``values`` with Python numbers as tensors (as a ``tf.function`` returns them, so they stack too); tensors
    and None as they are."""
    return [value if value is None else tf.convert_to_tensor(value) for value in values]


def run_stacked(step: Callable[..., Any], stacked_batches: Any, *args: Any) -> Any:
    """Inside a traced function: ``step(batch_i, *args)`` for every batch of ``stacked_batches`` (leading
    dimension: the batches), one after the other in a ``tf.while_loop`` (``parallel_iterations=1``, so stateful
    steps run in order); returns the structure of one step's outputs with every tensor stacked along a new
    leading dimension (Python numbers as tensors, as ``tf.function`` returns them; None as it is). ``step`` is
    traced once, as a ``tf.function`` of its own (the runtime inlines its call), for the spec of one batch: the
    outputs of that trace give the dtypes and shapes of the ``tf.TensorArray`` s that collect the outputs, and the
    loop body is its only call site, so a stateful op of the step (a legacy random op such as
    ``tf.random.uniform``) is one op that runs once per batch and draws anew for every batch.
    """
    count = tf.shape(tf.nest.flatten(stacked_batches)[0])[0]

    def batch_at(index: Any) -> Any:
        return tf.nest.map_structure(lambda stacked: stacked[index], stacked_batches)

    traced_step = tf.function(lambda batch: step(batch, *args))
    batch_spec = tf.nest.map_structure(lambda stacked: tf.TensorSpec(stacked.shape[1:], stacked.dtype), stacked_batches)
    structure = traced_step.get_concrete_function(batch_spec).structured_outputs
    specs = _as_tensors(tf.nest.flatten(structure))
    positions = [position for position, value in enumerate(specs) if value is not None]
    arrays = tuple(tf.TensorArray(specs[i].dtype, size=count, element_shape=specs[i].shape) for i in positions)

    def body(index: Any, arrays: tuple) -> tuple:
        outputs = _as_tensors(tf.nest.flatten(traced_step(batch_at(index))))
        return index + 1, tuple(array.write(index, outputs[i]) for array, i in zip(arrays, positions))

    _, arrays = tf.while_loop(lambda index, _: index < count, body, (tf.constant(0), arrays), parallel_iterations=1)
    flat: list[Any] = list(specs)
    for array, position in zip(arrays, positions):
        flat[position] = array.stack()
    return tf.nest.pack_sequence_as(structure, flat)


def unstack_outputs(outputs: Any, count: int) -> list:
    """The ``count`` per-batch output structures of :func:`run_stacked`'s result (one ``tf.unstack`` per tensor)."""
    flat = tf.nest.flatten(outputs)
    columns = [tf.unstack(value, num=count) if tf.is_tensor(value) else [value] * count for value in flat]
    return [tf.nest.pack_sequence_as(outputs, [column[index] for column in columns]) for index in range(count)]


def stacked_signature(signature: Any) -> Any:
    """``signature`` (nested ``tf.TensorSpec`` s of a batch, or None) with a leading ``None`` dimension added."""
    if signature is None:
        return None
    return tf.nest.map_structure(lambda spec: tf.TensorSpec([None, *spec.shape], spec.dtype, spec.name), signature)


class EagerStep:
    """Null object of :class:`CompiledStep`: calls ``step(batch, settings)`` eagerly, Python line by line."""

    def __init__(self, step: StepFunction, name: str):
        self.step = step
        self.name = name
        self.num_traces = 0

    def __call__(self, batch: Any, settings: Any) -> Any:
        return self.step(batch, settings)


_MANY_SETTINGS_TRACES = 8
_MANY_TRACES = 5  # as TensorFlow's frequent-retracing warning
_MAX_TYPE_WARNINGS = 3


def _batch_types(batch: Any) -> str:
    """The structure and dtypes of ``batch`` without shapes, e.g. ``"('float64', 'int32')"``."""

    def dtype(leaf: Any) -> str:
        if hasattr(leaf, "dtype"):
            return tf.as_dtype(leaf.dtype).name
        return type(leaf).__qualname__

    try:
        return str(tf.nest.map_structure(dtype, batch))
    except Exception:  # pragma: no cover - describing must never fail
        return type(batch).__qualname__


_MAX_CONCRETE_MISSES = 8


def frozen_contents(value: Any) -> Any:
    """A hashable snapshot of ``value``'s current contents (dicts, lists, tuples, sets recursively); objects
    that are neither hashable nor containers are identified by ``id``."""
    if isinstance(value, Mapping):
        return ("dict", tuple(sorted(((repr(k), frozen_contents(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(frozen_contents(item) for item in value))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(frozen_contents(item) for item in value))
    try:
        hash(value)
        return ("value", value)
    except TypeError:
        return ("id", id(value))


def _is_numpy(leaf: Any) -> bool:
    """A NumPy array or scalar that ``tf.function`` traces as a tensor (``np.str_`` is a Python constant to it)."""
    return isinstance(leaf, (np.ndarray, np.generic)) and not isinstance(leaf, str)


def _numpy_as_tensors(value: Any) -> tuple[Any, bool]:
    """``value`` with its NumPy arrays and scalars converted to tensors of their own dtype, and whether that was
    possible (``tf.nest`` refuses some structures, e.g. a dict whose keys cannot be sorted). A structure without
    NumPy leaves is returned as it is (one walk over its leaves)."""
    try:
        leaves = tf.nest.flatten(value)
        if not any(_is_numpy(leaf) for leaf in leaves):
            return value, True
        converted = [tf.convert_to_tensor(leaf) if _is_numpy(leaf) else leaf for leaf in leaves]
        return tf.nest.pack_sequence_as(value, converted), True
    except (TypeError, ValueError):
        return value, False


def _relaxed_shape(shape: Any) -> list:
    """The shape of a stacked batch tensor with its first two dimensions (batches, samples) open: ``[None, None,
    ...]`` (``[None]`` for a stack of scalars)."""
    dimensions = list(shape)
    return [None] * min(len(dimensions), 2) + dimensions[2:]


class CompiledStep:
    """``step(batch, settings)`` compiled with ``tf.function`` (see the module docstring for tracing rules).

    Args:
        step: The Python step function.
        name: Used in log and error messages, e.g. ``"train step"``.
        batch_data_signature: Nested ``tf.TensorSpec`` s of a batch, or None to trace without one.
        settings_signature: Nested ``tf.TensorSpec`` s of the settings (only used with a batch signature);
            None makes the settings a Python constant of the trace.
        relax_leading_dimension: Without a signature, trace the first call of stacked batches with their two
            leading dimensions left open (``None``: the number of batches and the samples per batch, as a
            ``batch_data_signature`` with a ``None`` batch dimension would), so that calls with another number of
            batches, or of the short last batch stacked alone, reuse that trace.

    Attributes:
        num_traces: How often the step function was traced so far (1 after the first call).
    """

    def __init__(
        self,
        step: StepFunction,
        name: str,
        batch_data_signature: Any = None,
        settings_signature: Any = None,
        relax_leading_dimension: bool = False,
    ):
        self.step = step
        self.name = name
        self.batch_data_signature = batch_data_signature
        self.settings_signature = settings_signature
        self.num_traces = 0
        # without a signature: the first trace leaves the leading dimension open (stacked batches: their number)
        self._relax_first_trace = relax_leading_dimension and batch_data_signature is None
        self._per_settings: dict = {}
        self._concrete: Any = None  # the ConcreteFunction called directly while batches fit it (module docstring)
        self._concrete_misses = 0  # consecutive batches that did not fit it; at _MAX_CONCRETE_MISSES: give up
        self._traced_types: list[str] = []  # the batch types (structure and dtypes) of the traces so far
        self._last_traced = ""  # the batch spec of the latest trace
        self._type_warnings = 0
        # the traced function takes (batch, settings) as one tuple (see the module docstring)
        if batch_data_signature is None:
            self._function = tf.function(self._traced, reduce_retracing=True)
        elif settings_signature is not None:
            self._function = tf.function(self._traced, input_signature=((batch_data_signature, settings_signature),))
        else:
            self._function = None  # one tf.function per settings object, see _for_settings
        if self._function is not None:
            # TensorFlow's own warning names `CompiledStep._traced` and counts the traces of every CompiledStep of
            # the process together (one key per Python function); _log_trace warns per step instead, at trace time
            self._function._omit_frequent_tracing_warning = True

    def _traced(self, arguments: tuple) -> Any:
        batch, settings = arguments
        self._log_trace(batch)
        return self.step(batch, settings)

    @tf.autograph.experimental.do_not_convert
    def _log_trace(self, batch: Any) -> None:
        """Count the trace and log it (runs only while tracing, never per step); not converted by AutoGraph.

        A retrace for batch types (structure, dtypes) that no earlier trace had is a warning naming the step and
        both batch specs (the first ``_MAX_TYPE_WARNINGS`` times); so is the ``_MANY_TRACES``-th trace (batches of
        other shapes, or settings of other values); other retraces are debug lines."""
        self.num_traces += 1
        types, spec = _batch_types(batch), describe_structure(batch)
        if self.num_traces == 1:
            _log.debug(f"{self.name}: tracing for batch {spec}")
        elif types not in self._traced_types and self._type_warnings < _MAX_TYPE_WARNINGS:
            self._type_warnings += 1
            _log.warning(
                f"{self.name}: compiled again (trace {self.num_traces}) because the batch's dtypes or structure "
                f"changed: {self._last_traced} before, now {spec}. Every new combination of dtypes "
                "compiles the step anew (and keeps one more graph). Give every batch the same dtypes (cast the "
                "inputs in the data pipeline, e.g. dataset.map(lambda x, y: (tf.cast(x, tf.float32), y)), or "
                "x.astype(np.float32)), or give the trainer batch_data_signature=(tf.TensorSpec(...), ...): one "
                "trace, and a batch that does not match it is an error naming the item."
                + (" Further changes are logged at debug level." if self._type_warnings == _MAX_TYPE_WARNINGS else "")
            )
        elif self.num_traces == _MANY_TRACES:
            _log.warning(
                f"{self.name}: compiled {self.num_traces} times, the latest for batch {spec}: "
                "batches of other shapes, or settings of other values (constants of a trace), compile the step "
                "anew. Give the trainer batch_data_signature (and training_settings_signature) to compile it once."
            )
        else:
            _log.debug(
                f"{self.name}: retracing (trace {self.num_traces}) for batch {spec}; "
                "give batch_data_signature to trace only once"
            )
        if types not in self._traced_types:
            self._traced_types.append(types)
        self._last_traced = spec

    def _for_settings(self, settings: Any) -> Callable[[Any], Any]:
        """The step (a ConcreteFunction) traced for the current *value* of ``settings`` (a trace constant): a
        changed value, also one changed in place, gets its own trace, as in the retracing mode without a batch
        signature."""
        key = frozen_contents(settings)
        entry = self._per_settings.get(key)
        if entry is None:
            function = tf.function(
                lambda arguments: self._traced((arguments[0], settings)),
                input_signature=((self.batch_data_signature,),),
            )
            concrete = function.get_concrete_function()  # its only trace: called directly, as concrete((batch,))
            entry = self._per_settings[key] = (concrete, settings)  # keep settings alive: an id in a key stays unique
            if len(self._per_settings) == _MANY_SETTINGS_TRACES:
                _log.warning(
                    f"{self.name}: traced for {_MANY_SETTINGS_TRACES} different settings values; settings are "
                    "constants of a trace, so every new value retraces. Give training_settings_signature to pass "
                    "changing settings as tensors."
                )
        return entry[0]

    def __call__(self, batch: Any, settings: Any) -> Any:
        given_batch = batch
        direct = True  # whether the kept concrete function may be called (see the module docstring)
        if self.batch_data_signature is None:
            batch, direct = _numpy_as_tensors(batch)
            if settings is not None and direct:
                settings, direct = _numpy_as_tensors(settings)
        concrete = self._concrete
        if concrete is not None and direct:
            try:
                result = concrete((batch, settings))
            except TypeError:  # the arguments do not bind to its input types; nothing ran
                self._concrete_misses += 1
            else:
                self._concrete_misses = 0
                return result
        if self._relax_first_trace:
            self._relax_first_trace = False
            relaxed = tf.nest.map_structure(lambda leaf: tf.TensorSpec(_relaxed_shape(leaf.shape), leaf.dtype), batch)
            self._function.get_concrete_function((relaxed, settings))  # later calls of any length dispatch to it
        try:
            if self._function is None:
                return self._for_settings(settings)((batch,))
            result = self._function((batch, settings))
        except (TypeError, ValueError):
            if self.batch_data_signature is not None and signature_mismatch(given_batch, self.batch_data_signature):
                check_batch_signature(given_batch, self.batch_data_signature)  # raises the clear error
            raise
        if direct:
            self._keep_concrete((batch, settings))
        return result

    def _keep_concrete(self, arguments: tuple) -> None:
        """Keep the concrete function ``tf.function`` just dispatched ``(batch, settings)`` to, for direct calls,
        where every batch that binds to it would be dispatched to it too (see the module docstring)."""
        if self._concrete_misses >= _MAX_CONCRETE_MISSES:
            if self._concrete is not None:
                _log.debug(f"{self.name}: batches keep changing their types; dispatching through tf.function")
            self._concrete = None
            return
        concrete = self._function.get_concrete_function(arguments)  # normally a lookup, no new trace
        specs = tf.nest.flatten(concrete.structured_input_signature, expand_composites=False)
        fully_defined = all(  # Python constants are matched by value; composite specs (ragged, sparse) not kept
            isinstance(spec, tf.TensorSpec) and spec.shape.is_fully_defined()
            for spec in specs
            if isinstance(spec, tf.TypeSpec)
        )
        if fully_defined or self._function.experimental_get_tracing_count() == 1:
            self._concrete = concrete
