"""Nested plain containers <-> a JSON-able skeleton plus a list of NumPy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

_STRUCTURE_KEY = "__mlpug_structure__"


def encode_plain(value: Any, arrays: list, where: str = "state") -> Any:
    """JSON-able skeleton of ``value``; NumPy arrays and scalars are appended to ``arrays`` and referenced.

    Raises:
        TypeError: A value is not a plain container, a Python scalar or a NumPy array (naming where it is).
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"{where} is an object array; checkpoints hold only numeric/bool/string arrays")
        arrays.append(array)
        return {"__array__": len(arrays) - 1, "scalar": isinstance(value, np.generic)}
    if isinstance(value, dict):
        return {
            "__dict__": [
                [encode_plain(k, arrays, f"{where} key"), encode_plain(v, arrays, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [encode_plain(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_plain(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints hold only plain "
        "containers (dict, list, tuple), Python scalars, str and arrays, no pickled objects"
    )


def decode_plain(skeleton: Any, arrays: dict) -> Any:
    """Inverse of :func:`encode_plain`; ``arrays`` maps ``"a<index>"`` to the stored arrays."""
    if isinstance(skeleton, list):
        return [decode_plain(v, arrays) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__array__" in skeleton:
            array = arrays[f"a{skeleton['__array__']}"]
            return array[()] if skeleton.get("scalar") else array
        if "__tuple__" in skeleton:
            return tuple(decode_plain(v, arrays) for v in skeleton["__tuple__"])
        return {_hashable(decode_plain(k, arrays)): decode_plain(v, arrays) for k, v in skeleton["__dict__"]}
    return skeleton


def _hashable(key: Any) -> Any:
    return key.item() if isinstance(key, np.generic) else key
