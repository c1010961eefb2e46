"""The unpickler of DCP ``.metadata`` files: which globals a file may name, and whose state it may set.

A pickle builds objects with a few opcodes: a global (a class or function, resolved by ``find_class``), a call of
it (``REDUCE``, ``NEWOBJ``, ``INST``, ``OBJ``) and ``BUILD``, which sets the state (the attributes) of the object on
top of the stack. :class:`MetadataUnpickler` allows only the globals of :data:`ALLOWED_GLOBALS`, and ``BUILD`` only
on an object of one of DCP's metadata classes that this load created and has not set the state of yet, with the
state DCP's pickles hold: a dict of the class's dataclass fields (``TensorProperties``: the tuple its
``__setstate__`` takes). A ``BUILD`` on anything else (a class, a function, a shared ``Enum`` member, a torch dtype:
objects of the process, whose attributes a plain unpickler would change process-wide) is refused before it
changes anything.

It is ``pickle``'s pure-Python unpickler (``pickle._Unpickler``, whose opcodes can be replaced one by one), several
times slower than the C one; a ``.metadata`` file is read once per load.
"""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
from collections.abc import Callable
from enum import Enum
from typing import IO, Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from mlpug.checkpointing import CheckpointError

# torch's dtypes by the name they are pickled with ("float32" of torch.float32), its layouts by str ("torch.strided")
_DTYPES = {str(value).removeprefix("torch."): value for value in vars(torch).values() if isinstance(value, torch.dtype)}
_LAYOUTS = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}

_NOT_MLPUGS = "it is not a DCP metadata file mlpug wrote, and it is not unpickled"
_MAX_SHOWN = 100  # characters of a key of the file shown in a message


def _layout(name: str) -> torch.layout:
    """The torch layout named ``name`` (``"torch.strided"``, ...): how torch pickles a layout (the reduce function
    ``torch.serialization._get_layout`` is registered with ``copyreg``); the stand-in of that function."""
    if not isinstance(name, str) or name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"not a torch layout: {name!r}")
    return _LAYOUTS[name]


def _global_name(value: Any) -> tuple[str, str]:
    return value.__module__, value.__qualname__


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{
        _global_name(cls): cls
        for cls in (
            Metadata,
            StorageMeta,
            MetadataIndex,
            TensorStorageMetadata,
            BytesStorageMetadata,
            ChunkStorageMetadata,
            TensorProperties,
            _MEM_FORMAT_ENCODING,
            _StorageInfo,
            torch.Size,
            pathlib.PurePosixPath,
            pathlib.PureWindowsPath,
            pathlib.PosixPath,
            pathlib.WindowsPath,
        )
    },
    _global_name(torch.serialization._get_layout): _layout,
    **{("torch", name): dtype for name, dtype in _DTYPES.items()},
}
"""The globals a ``.metadata`` file may name, as (module, name) -> the object the unpickler returns. Each is a
class or function whose call only builds a value: DCP's metadata classes, the storage info of
``FileSystemWriter``, ``torch.Size``, torch dtypes (pickled by name: ``torch.float32``), torch layouts (through
:func:`_layout`) and the ``pathlib`` path classes (``StorageMeta.checkpoint_id``)."""

STATE_FIELDS: dict[type, frozenset[str]] = {
    cls: frozenset(field.name for field in dataclasses.fields(cls))
    for cls in (
        Metadata,
        StorageMeta,
        MetadataIndex,
        TensorStorageMetadata,
        BytesStorageMetadata,
        ChunkStorageMetadata,
        TensorProperties,
        _StorageInfo,
    )
}
"""The classes whose objects a ``.metadata`` file may set the state of (``BUILD``), each with its dataclass fields:
the keys its state may have, all of which the object must have after the load (set, or a class default)."""

_TENSOR_PROPERTIES_STATE = (torch.dtype, torch.layout, bool, _MEM_FORMAT_ENCODING, bool)
"""The types of the state ``TensorProperties.__getstate__`` returns and ``__setstate__`` takes: ``(dtype, layout,
requires_grad, memory format encoding, pin_memory)``."""


def _described(value: Any) -> str:
    """``value`` for a message: a class, function or Enum member by name, else its type (and, for a short tuple,
    its items' types); never the repr of a value of the file, which may be large."""
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    if isinstance(value, Enum):
        return f"the shared Enum member {type(value).__qualname__}.{value.name}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"the function {value.__module__}.{value.__qualname__}"
    if isinstance(value, tuple):
        if len(value) > len(_TENSOR_PROPERTIES_STATE):
            return f"a tuple of {len(value)} values"
        return f"a tuple ({', '.join(type(item).__name__ for item in value)})"
    return f"a value of type {type(value).__name__}"


class MetadataUnpickler(pickle._Unpickler):
    """Unpickles a DCP ``.metadata`` file, resolving only :data:`ALLOWED_GLOBALS` and setting state (``BUILD``)
    only on objects of :data:`STATE_FIELDS` created by this load (see the module docstring).

    Args:
        file: The open ``.metadata`` file (binary).
        path: Its path, for messages.

    :meth:`load` raises :class:`~mlpug.checkpointing.CheckpointError` naming ``path`` for what the file may not do
    (a global not allowed, a ``BUILD`` refused, an object left without its fields), before it is done; anything
    else a malformed pickle raises (``pickle.UnpicklingError``, ``EOFError``, ``TypeError``, ...) as ``pickle``
    raises it.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # pickle's stack of objects, set by load (typeshed leaves it out)

    def __init__(self, file: IO[bytes], path: str) -> None:
        super().__init__(file)
        self._path = path
        # id -> object, of the objects of STATE_FIELDS' classes this load created and has not set the state of
        # (holding them keeps their ids from being reused during the load)
        self._fresh: dict[int, Any] = {}

    def load(self) -> Any:
        """The unpickled object.

        Raises:
            mlpug.checkpointing.CheckpointError: Naming the file: it names a global not in :data:`ALLOWED_GLOBALS`,
                sets the state of an object it may not (or to a state the object's class does not take), or
                leaves an object of DCP's metadata classes without one of its fields.
            Exception: What a malformed pickle raises, as ``pickle`` raises it.
        """
        self._fresh = {}
        value = super().load()
        for unset in self._fresh.values():  # created without a state: their class's constructor or defaults only
            self._check_complete(unset)
        self._fresh = {}
        return value

    def find_class(self, module: str, name: str) -> Any:
        """The object of :data:`ALLOWED_GLOBALS` named ``module.name``.

        Raises:
            mlpug.checkpointing.CheckpointError: ``module.name`` is not allowed; nothing is imported or looked up.
        """
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise CheckpointError(
                f"The DCP metadata file {self._path} names the global {module}.{name}, which DCP metadata of "
                f"tensors never holds: {_NOT_MLPUGS}"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("DCP metadata holds no persistent ids")

    def _refused(self, what: str) -> CheckpointError:
        return CheckpointError(f"The DCP metadata file {self._path} {what}: {_NOT_MLPUGS}")

    def _record_created(self) -> None:
        """Records the object on top of the stack, just created by a call opcode, if its state may be set."""
        created = self.stack[-1]
        if type(created) in STATE_FIELDS:
            self._fresh[id(created)] = created

    def _check_complete(self, value: Any) -> None:
        missing = sorted(name for name in STATE_FIELDS[type(value)] if not hasattr(value, name))
        if missing:
            raise self._refused(f"holds a {type(value).__name__} that lacks the fields {missing}")

    def _load_build(self) -> None:
        """``BUILD``: sets the state of the object on top of the stack, if it is a fresh object of
        :data:`STATE_FIELDS` and the state is what DCP pickles for its class."""
        state = self.stack.pop()
        target = self.stack[-1]
        cls = type(target)
        if self._fresh.pop(id(target), None) is not target:
            if cls in STATE_FIELDS:
                raise self._refused(f"sets the state of a {cls.__name__} a second time (pickle BUILD)")
            raise self._refused(f"sets the state of {_described(target)} (pickle BUILD), which DCP metadata never does")
        if cls is TensorProperties:
            if not (
                isinstance(state, tuple)
                and len(state) == len(_TENSOR_PROPERTIES_STATE)
                and all(type(item) is kind for item, kind in zip(state, _TENSOR_PROPERTIES_STATE))
            ):
                raise self._refused(
                    f"sets the state of a TensorProperties to {_described(state)}: TensorProperties takes (dtype, "
                    "layout, requires_grad, memory format encoding, pin_memory) of types (dtype, layout, bool, "
                    "_MEM_FORMAT_ENCODING, bool)"
                )
            TensorProperties.__setstate__(target, state)
            return
        slot_state = None
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state), as pickled for __slots__
            state, slot_state = state
        for part in (state, slot_state):
            if part is not None and type(part) is not dict:
                raise self._refused(
                    f"sets the state of a {cls.__name__} to {_described(part)}, not a dict of its fields"
                )
            for key in part or ():
                if type(key) is not str or key not in STATE_FIELDS[cls]:
                    shown = repr(key) if len(repr(key)) <= _MAX_SHOWN else repr(key)[: _MAX_SHOWN - 3] + "..."
                    raise self._refused(
                        f"sets the field {shown} of a {cls.__name__}: {shown} is not a field of {cls.__name__}"
                    )
        target.__dict__.update(state or {})
        for key, value in (slot_state or {}).items():
            object.__setattr__(target, key, value)  # a field name; object's: MetadataIndex is frozen
        self._check_complete(target)

    # typeshed types the argument of the handlers of _Unpickler.dispatch as the C Unpickler
    dispatch[pickle.BUILD[0]] = _load_build  # type: ignore[assignment]


def _recording(load: Callable[[Any], None]) -> Callable[[Any], None]:
    """The call opcode ``load`` of ``pickle._Unpickler``, recording the object it creates."""

    def load_and_record(unpickler: MetadataUnpickler) -> None:
        load(unpickler)
        unpickler._record_created()

    return load_and_record


for _opcode in (pickle.REDUCE, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.INST, pickle.OBJ):
    MetadataUnpickler.dispatch[_opcode[0]] = _recording(pickle._Unpickler.dispatch[_opcode[0]])
del _opcode
