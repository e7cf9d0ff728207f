"""Scalars as JSON lines: one strict JSON object `{"step": step, name: value, ...}` per `write_scalars`."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping

from moe_grok import atomic_files, strict_json
from moe_grok.writers.scalar_writer import checked_scalars


def jsonl_line(step: int, scalars: Mapping[str, float]) -> str:
    """One row as written: strict JSON (NaN and Inf as null), keys in the given order, newline-terminated."""
    return strict_json.dumps({"step": step, **scalars}) + "\n"


class JsonlWriter:
    """Appends one JSON line per step to `path` (a scalar writer: see scalar_writer).

    history: when given, the file is first replaced, whole (atomic_files), by these (step, scalars) rows,
    then appended to: a resumed run drops the rows it will redo. Without it, rows are appended to what
    the file holds. A kill can cut only the last line short; `training.metrics_log.read_metrics` skips
    such a line.
    """

    def __init__(self, path: str, history: Iterable[tuple[int, Mapping[str, float]]] | None = None):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if history is not None:
            atomic_files.write_text(path, "".join(jsonl_line(*checked_scalars(s, v)) for s, v in history))
        self._file = None
        self._lock = threading.Lock()  # one writer may serve several threads (a callback of several seeds)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        line = jsonl_line(*checked_scalars(step, scalars))
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (open across writes; close())
            self._file.write(line)

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
