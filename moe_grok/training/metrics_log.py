"""A run's metrics log, ``workdir/metrics.jsonl``: one strict JSON object per logged step (a NaN written as
null, read back as NaN), appended."""
from __future__ import annotations

import json
import os
from typing import Any

from moe_grok import atomic_files, strict_json

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts (a line cut short by a kill at the end is skipped)."""
    path = os.path.join(workdir, METRICS_FILE)
    with open(path) as f:
        lines = f.read().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(strict_json.nan_for_null(json.loads(line)))
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not valid JSON ({e}); remove or repair that line") from e
    return rows


class MetricsLog:
    """The writer of one run's metrics.jsonl; `last` is the newest row (an empty dict before any)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self.last: dict[str, Any] = {}

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.workdir) if os.path.exists(self.path) else []

    def keep_up_to(self, step: int) -> None:
        """Drop the rows newer than `step` (on resume from the train state at `step`: they will be
        redone; -1 drops every row)."""
        kept = [row for row in self.rows() if row["step"] <= step]
        atomic_files.write_text(self.path, "".join(strict_json.dumps(row) + "\n" for row in kept))
        self.last = kept[-1] if kept else {}

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(strict_json.dumps(row) + "\n")
        self.last = row
