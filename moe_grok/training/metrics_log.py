"""A run's metrics log: ``workdir/metrics.jsonl``, one strict JSON object per logged step (a NaN written as
null, read back as NaN), appended; and the same rows as TensorBoard scalars in ``workdir/tensorboard/``
(`tensorboard --logdir workdir`; tags from `tensorboard_tag`)."""
from __future__ import annotations

import json
import os
from typing import Any

from moe_grok import strict_json
from moe_grok.training.evaluation import LOGGED_SPLITS
from moe_grok.writers.jsonl import JsonlWriter
from moe_grok.writers.tensorboard import TensorBoardWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


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


def tensorboard_tag(name: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key, grouped by where it comes from: the evaluation's metrics
    (`train_accuracy`, `test_loss/mul`, ...) under "eval/", the timing under "time/", a key that names its
    own group (a callback's "monitor/distance") as it is, the training step's (loss, grad_norm, ...) under
    "train/"."""
    if name == "elapsed_s":
        return "time/elapsed_s"
    if name.startswith(tuple(f"{split}_" for split in LOGGED_SPLITS)):
        return f"eval/{name}"
    return name if "/" in name else f"train/{name}"


def _split_row(row: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, float]]:
    """(step, the row's values for metrics.jsonl, the same as TensorBoard scalars by tag)."""
    values = {k: v for k, v in row.items() if k != "step"}
    return row["step"], values, {tensorboard_tag(k): v for k, v in values.items()}


class MetricsLog:
    """The writer of one run's metrics.jsonl and its TensorBoard scalars (workdir/tensorboard, when
    `tensorboard`); `last` is the newest row (an empty dict before any). Close it when the run ends."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR) if tensorboard else None
        self.last: dict[str, Any] = {}
        self._jsonl: JsonlWriter | None = None
        self._tensorboard: TensorBoardWriter | None = None

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.workdir) if os.path.exists(self.path) else []

    def keep_up_to(self, step: int) -> None:
        """Drop the rows newer than `step` (on resume from the train state at `step`: they will be
        redone; -1 drops every row), from metrics.jsonl and the TensorBoard scalars, which are rewritten
        from the rows kept (one event file)."""
        kept = [row for row in self.rows() if row["step"] <= step]
        self.close()
        parts = [_split_row(row) for row in kept]
        self._jsonl = JsonlWriter(self.path, history=[(s, values) for s, values, _ in parts])
        if self.tensorboard_dir is not None:
            self._tensorboard = TensorBoardWriter(self.tensorboard_dir, history=[(s, tags) for s, _, tags in parts])
        self.last = kept[-1] if kept else {}

    def append(self, row: dict[str, Any]) -> None:
        """Log `row` ({"step": int, name: float, ...}) to both, flushed."""
        step, values, tags = _split_row(row)
        if self._jsonl is None:
            self._jsonl = JsonlWriter(self.path)
        self._jsonl.write_scalars(step, values)
        self._jsonl.flush()
        if self.tensorboard_dir is not None:
            if self._tensorboard is None:
                self._tensorboard = TensorBoardWriter(self.tensorboard_dir)
            self._tensorboard.write_scalars(step, tags)
            self._tensorboard.flush()
        self.last = row

    def close(self) -> None:
        for writer in (self._jsonl, self._tensorboard):
            if writer is not None:
                writer.close()
        self._jsonl = self._tensorboard = None
