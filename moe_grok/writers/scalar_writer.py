"""The scalar writer protocol: what a training loop or a monitor hands its numbers to.

A scalar writer is any object with

  write_scalars(step: int, scalars: dict[str, float]) -> None   one step's values, name -> number
  flush() -> None                                               make what was written readable by others
  close() -> None                                               flush and release the file; idempotent

`JsonlWriter` and `TensorBoardWriter` are the built-in ones (safe to share between threads). Non-finite
values are kept: a JSONL file holds NaN / Inf as null (strict JSON, read back as NaN by
`strict_json.nan_for_null`), a TensorBoard file holds the float itself (TensorBoard draws NaN and Inf as
such).
"""
from __future__ import annotations

import numbers
import threading
from collections.abc import Mapping
from typing import Protocol


class ScalarWriter(Protocol):
    """Where scalars go (see the module docstring)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def checked_scalars(step: int, scalars: Mapping[str, object]) -> tuple[int, dict[str, float]]:
    """(step, {name: float}) after checking them: step an integer >= 0, names non-empty strings, values
    real numbers (Python or numpy numbers, 0-d arrays, framework scalars with `__float__`; not strings).
    TypeError / ValueError name the offending entry."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    checked = {}
    for name, value in scalars.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"scalar names must be non-empty strings, got {name!r}")
        if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
            raise TypeError(f"scalar {name!r} at step {step} must be a real number, got {type(value).__name__} "
                            f"{value!r}")
        checked[name] = float(value)
    return int(step), checked


class AppendingFile:
    """The file side of a scalar writer: `append` opens `self.path` on first use (in `mode`, "a" or "ab")
    and keeps it open across writes; `flush` and `close` (idempotent) as the protocol says; usable as a
    context manager; one lock, so one writer may serve several threads (a callback of several seeds)."""

    def __init__(self, path: str, mode: str):
        self.path, self._mode = path, mode
        self._file = None
        self._lock = threading.Lock()

    def append(self, data) -> None:
        with self._lock:
            if self._file is None:
                self._file = open(self.path, self._mode)  # noqa: SIM115  (open across writes; close() closes it)
            self._file.write(data)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
