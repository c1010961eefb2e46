"""The checkpoint codec: a nested checkpoint <-> named arrays plus ``dict[str, str]`` metadata, with a checksum.

A checkpoint (plain containers with a backend's arrays) becomes what a safetensors file holds: the arrays,
named ``a0``, ``a1``, ... in the order they are met, and string metadata with three entries:

* ``"mlpug"``: the header as JSON (:func:`mlpug.checkpointing.make_header`);
* ``"structure"``: the JSON *skeleton* of everything else, in which every array is replaced by a reference
  ``{"__array__": index}`` (with ``"scalar": true`` for a NumPy scalar);
* ``"checksum"``: ``"crc32:<8 hex digits>"``, see :func:`checksum`.

Skeleton nodes: ``None``, bool, int (any size), float (NaN and infinities as JSON ``NaN`` / ``Infinity``) and
str are themselves; a list is a JSON list; ``{"__tuple__": [...]}`` a tuple; ``{"__dict__": [[key, value],
...]}`` a dict (keys: str, int, float, bool, None or tuples of them; insertion order kept);
``{"__ordered_dict__": [[key, value], ...], "metadata": ...}`` an ``OrderedDict`` with its ``_metadata``
attribute (the module versions ``torch.nn.Module.load_state_dict`` reads). Nothing else is stored: no object
is ever pickled or unpickled.

The codec is backend-neutral; a saver passes two functions: ``stored_array(value, where)`` (the array to store
for ``value``, or None when ``value`` is not one of its arrays) and ``array_bytes(array)`` (the array's raw
bytes as a buffer, for the checksum).
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np

from mlpug.checkpointing.header import HEADER_KEY, CheckpointError

STRUCTURE_KEY, CHECKSUM_KEY = "structure", "checksum"
StoredArray = Callable[[Any, str], Optional[Any]]
ArrayBytes = Callable[[Any], Any]


def encode_plain(value: Any, arrays: list, where: str = "state", stored_array: Optional[StoredArray] = None) -> Any:
    """The JSON-able skeleton of ``value`` (see the module docstring); its arrays are appended to ``arrays``.

    Args:
        value: Nested dicts, lists, tuples, Python scalars, str, None and (with ``stored_array``) arrays.
        arrays: List that receives the arrays to store; a skeleton reference is the index in this list.
        where: Name of ``value`` in error messages, e.g. ``"checkpoint"``.
        stored_array: ``stored_array(value, where)`` is the array to store for ``value`` (contiguous, in host
            memory), or None when ``value`` is not an array of the saver's backend; None: no arrays allowed.

    Returns:
        The skeleton: JSON-able nested lists, dicts and scalars.

    Raises:
        TypeError: A value is of another type, or a dict key is not a plain scalar or tuple (naming where).
    """
    if stored_array is not None:
        array = stored_array(value, where)
        if array is not None:
            arrays.append(array)
            node: dict = {"__array__": len(arrays) - 1}
            if isinstance(value, np.generic):
                node["scalar"] = True
            return node
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        items = [
            [_encode_key(key, where), encode_plain(item, arrays, f"{where}[{key!r}]", stored_array)]
            for key, item in value.items()
        ]
        if not isinstance(value, OrderedDict):
            return {"__dict__": items}
        node = {"__ordered_dict__": items}
        metadata = getattr(value, "_metadata", None)
        if metadata is not None:
            node["metadata"] = encode_plain(metadata, arrays, f"{where}._metadata", stored_array)
        return node
    if isinstance(value, tuple):
        return {"__tuple__": [encode_plain(v, arrays, f"{where}[{i}]", stored_array) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_plain(v, arrays, f"{where}[{i}]", stored_array) for i, v in enumerate(value)]
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints hold only plain "
        "containers (dict, list, tuple), Python scalars, str, None and the backend's arrays, no pickled objects"
    )


def _encode_key(key: Any, where: str) -> Any:
    if isinstance(key, np.generic):
        key = key.item()
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, tuple):
        return {"__tuple__": [_encode_key(k, where) for k in key]}
    raise TypeError(
        f"{where} has a key {key!r:.100} of type {type(key).__qualname__}; checkpoint dict keys must be str, "
        "int, float, bool, None or tuples of them"
    )


def decode_plain(skeleton: Any, arrays: Mapping[str, Any]) -> Any:
    """Inverse of :func:`encode_plain`.

    Args:
        skeleton: A skeleton made by :func:`encode_plain`.
        arrays: The stored arrays by name: ``"a<index>"``.

    Returns:
        The nested value, with dict key types, tuples and ``OrderedDict`` (with ``_metadata``) restored.

    Raises:
        KeyError: A reference to an array that ``arrays`` does not hold.
    """
    if isinstance(skeleton, list):
        return [decode_plain(v, arrays) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__array__" in skeleton:
        array = arrays[f"a{skeleton['__array__']}"]
        return array[()] if skeleton.get("scalar") else array
    if "__tuple__" in skeleton:
        return tuple(decode_plain(v, arrays) for v in skeleton["__tuple__"])
    if "__ordered_dict__" in skeleton:
        value = OrderedDict((decode_plain(k, arrays), decode_plain(v, arrays)) for k, v in skeleton["__ordered_dict__"])
        if "metadata" in skeleton:
            value._metadata = decode_plain(skeleton["metadata"], arrays)  # type: ignore[attr-defined]
        return value
    return {decode_plain(k, arrays): decode_plain(v, arrays) for k, v in skeleton["__dict__"]}


def checksum(header: str, structure: str, arrays: Mapping[str, Any], array_bytes: ArrayBytes) -> str:
    """CRC-32 of a checkpoint's content, as ``"crc32:<8 hex digits>"``.

    One CRC-32 (``zlib.crc32``) runs over, in this order: the header JSON and the structure JSON (UTF-8, each
    followed by a newline), then for every array in the order of ``arrays`` (``a0``, ``a1``, ...) the line
    ``"<name> <dtype> <shape>\\n"`` (dtype as safetensors names it, e.g. ``float32`` or ``bfloat16``; shape as a
    JSON list) followed by the array's raw little-endian bytes. So one flipped byte in the data, the skeleton,
    the header or a dtype / shape entry of the safetensors header is detected.

    Args:
        header: The header JSON stored in the metadata.
        structure: The skeleton JSON stored in the metadata.
        arrays: The arrays by name, in index order.
        array_bytes: Function returning an array's raw bytes as a contiguous buffer.

    Returns:
        The checksum text stored under ``"checksum"`` in the metadata.
    """
    crc = zlib.crc32(f"{header}\n{structure}\n".encode("utf-8"))
    for name, array in arrays.items():
        dtype = str(array.dtype).rsplit(".", 1)[-1]  # NumPy "float32", torch "torch.float32" -> "float32"
        crc = zlib.crc32(f"{name} {dtype} {json.dumps([int(n) for n in array.shape])}\n".encode("ascii"), crc)
        crc = zlib.crc32(array_bytes(array), crc)
    return f"crc32:{crc:08x}"


def encode_checkpoint(
    checkpoint: Mapping, stored_array: StoredArray, array_bytes: ArrayBytes
) -> tuple[dict[str, Any], dict[str, str]]:
    """The arrays and metadata of a safetensors file holding ``checkpoint`` (see the module docstring).

    Args:
        checkpoint: The checkpoint: its header under ``"mlpug"`` and plain containers with arrays.
        stored_array: The saver's ``stored_array`` hook (see :func:`encode_plain`).
        array_bytes: The saver's ``array_bytes`` hook (see :func:`checksum`).

    Returns:
        ``(arrays, metadata)``: the arrays by name (``a0``, ``a1``, ...) and the string metadata.

    Raises:
        TypeError: A value that checkpoints cannot hold (naming where it is).
        ValueError: ``checkpoint`` has no ``"mlpug"`` header dict.
    """
    arrays: list = []
    content = {key: value for key, value in checkpoint.items() if key != HEADER_KEY}
    structure = json.dumps(encode_plain(content, arrays, "checkpoint", stored_array))
    header = checkpoint.get(HEADER_KEY)
    if not isinstance(header, dict):
        raise ValueError(
            f"a checkpoint needs its header dict under 'mlpug' (mlpug.checkpointing.make_header(kind, backend)), "
            f"got {header!r:.100}"
        )
    header_text = json.dumps(header)
    named = {f"a{index}": array for index, array in enumerate(arrays)}
    metadata = {HEADER_KEY: header_text, STRUCTURE_KEY: structure}
    metadata[CHECKSUM_KEY] = checksum(header_text, structure, named, array_bytes)
    return named, metadata


def decode_checkpoint(
    metadata: Mapping[str, str], arrays: Mapping[str, Any], array_bytes: ArrayBytes, path: str
) -> dict:
    """The checkpoint content (everything but the header) of a file's metadata and arrays; verifies the checksum.

    Args:
        metadata: The file's safetensors metadata.
        arrays: The file's arrays by name.
        array_bytes: The saver's ``array_bytes`` hook.
        path: The file, for error messages.

    Returns:
        The checkpoint without its ``"mlpug"`` header.

    Raises:
        CheckpointError: A metadata entry is missing, the array names are not ``a0`` .. ``a<n-1>``, the checksum
            does not match or the skeleton is malformed: the file is corrupt.
    """
    names = [f"a{index}" for index in range(len(arrays))]
    if STRUCTURE_KEY not in metadata or CHECKSUM_KEY not in metadata or set(arrays) != set(names):
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: expected metadata entries {[HEADER_KEY, STRUCTURE_KEY, CHECKSUM_KEY]} "
            f"and arrays a0 .. a{len(arrays) - 1}, found {sorted(metadata)} and {sorted(arrays)[:8]}"
        )
    ordered = {name: arrays[name] for name in names}
    computed = checksum(metadata[HEADER_KEY], metadata[STRUCTURE_KEY], ordered, array_bytes)
    if computed != metadata[CHECKSUM_KEY]:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its content has checksum {computed}, the file records "
            f"{metadata[CHECKSUM_KEY]!r:.40}"
        )
    try:
        return decode_plain(json.loads(metadata[STRUCTURE_KEY]), ordered)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint file {path} is corrupt: malformed structure: {error!r:.200}") from error
