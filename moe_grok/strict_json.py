"""The package's JSON: strict (RFC 8259) text, NaN and infinities written as null.

Python's json module writes NaN / Infinity tokens that other parsers (and `json.loads` with
`parse_constant` raising) reject. Every JSON file the package writes goes through `dumps` /
`dump`; readers of our own files that expect numbers map null back with `nan_for_null`.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from moe_grok import atomic_files


def to_strict(value: Any) -> Any:
    """`value` as plain JSON types: dicts (str keys), lists, str, int, bool, None and finite
    floats; NaN / +-Inf become None; numpy scalars and arrays become numbers and lists; other
    numbers (e.g. jax scalars) go through float(). TypeError for anything else."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return to_strict(value.tolist())
    try:
        return to_strict(float(value))
    except (TypeError, ValueError):
        raise TypeError(f"{type(value).__name__} {value!r} cannot be written as JSON") from None


def dumps(value: Any, **kwargs) -> str:
    """Strict JSON text of `value` (see `to_strict`); kwargs as json.dumps (indent, sort_keys...)."""
    return json.dumps(to_strict(value), allow_nan=False, **kwargs)


def dump(value: Any, path: str | os.PathLike, **kwargs) -> None:
    """Write `value` as strict JSON to the file at `path` (kwargs as json.dumps), whole or not at
    all: written aside and renamed (atomic_files), so a kill or a full disk keeps the previous
    file; an OSError names `path`."""
    text = dumps(value, **kwargs)  # a TypeError here leaves the file untouched too
    atomic_files.write_text(path, text)


def _reject_constant(name: str):
    raise ValueError(f"JSON holds {name}, which strict JSON does not allow (write it as null)")


def loads(text: str) -> Any:
    """Parse strict JSON; ValueError on NaN / Infinity tokens."""
    return json.loads(text, parse_constant=_reject_constant)


def load(path: str | os.PathLike) -> Any:
    """`loads` of the file at `path`."""
    with open(path) as f:
        return loads(f.read())


def nan_for_null(value: Any, keep: Iterable[str] = ()) -> Any:
    """`value` with every null (None) replaced by NaN, except inside the dict entries named in
    `keep` (fields where None means "not set" rather than "no number")."""
    keep = frozenset(keep)
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: v if k in keep else nan_for_null(v, keep) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_for_null(v, keep) for v in value]
    return value
