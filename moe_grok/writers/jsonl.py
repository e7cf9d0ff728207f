"""Scalars as JSON lines: one strict JSON object `{"step": step, name: value, ...}` per `write_scalars`."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from moe_grok import atomic_files, strict_json
from moe_grok.writers.scalar_writer import AppendingFile, checked_scalars


def jsonl_line(step: int, scalars: Mapping[str, float]) -> str:
    """One row as written: strict JSON (NaN and Inf as null), keys in the given order, newline-terminated."""
    return strict_json.dumps({"step": step, **scalars}) + "\n"


class JsonlWriter(AppendingFile):
    """Appends one JSON line per step to `path` (a scalar writer: see scalar_writer).

    history: when given, the file is first replaced, whole (atomic_files), by these (step, scalars) rows,
    then appended to: a resumed run drops the rows it will redo. Without it, rows are appended to what
    the file holds. A kill can cut only the last line short; `training.metrics_log.read_metrics` skips
    such a line.
    """

    def __init__(self, path: str, history: Iterable[tuple[int, Mapping[str, float]]] | None = None):
        super().__init__(path, "a")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if history is not None:
            atomic_files.write_text(path, "".join(jsonl_line(*checked_scalars(s, v)) for s, v in history))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.append(jsonl_line(*checked_scalars(step, scalars)))
