"""Test results per checkpoint, supplied by the user (inputs of the analysis).

Test samples (MATH, HumanEval, ...) are evaluated elsewhere, by a benchmark harness, at every
checkpoint. Two CSV forms: step,group,accuracy gives each domain's accuracy curve;
step,group,sample,correct gives per-sample correctness, hence Test@t# groups and pairing.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence

import numpy as np

PathLike = str | os.PathLike

# ----------------------------------------------------------------------------------------
def _parse_step(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: step {text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ValueError(f"{where}: step {text!r} must be a non-negative integer")
    return int(value)


def load_test_accuracy_csv(path: PathLike, *, steps: Sequence[int] | None = None,
                           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """CSV with columns step,group,accuracy (one row per checkpoint and group; extra columns
    ignored) -> (steps [C] int64 ascending, {group: accuracy [C] float64}) for analysis.analyze.

    Validation (ValueError naming the line): numeric integer steps, non-empty group,
    accuracy a finite number in [0, 1], no duplicate (step, group), and every group has a
    row for every step in the file. steps: if given, keep exactly these checkpoint steps
    (returned ascending); a step missing from the file is an error.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: file is empty (expected a header step,group,accuracy)")
        header = [h.strip().lower() for h in header]
        missing = [c for c in ("step", "group", "accuracy") if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        col = {c: header.index(c) for c in ("step", "group", "accuracy")}
        values: dict[str, dict[int, float]] = {}
        first_line: dict[tuple[str, int], int] = {}
        for row in reader:
            where = f"{path}:line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(col.values()):
                raise ValueError(f"{where}: expected {len(header)} columns, got {len(row)}: {row}")
            step = _parse_step(row[col["step"]].strip(), where)
            group = row[col["group"]].strip()
            if not group:
                raise ValueError(f"{where}: empty group")
            text = row[col["accuracy"]].strip()
            try:
                acc = float(text)
            except ValueError:
                raise ValueError(f"{where}: accuracy {text!r} is not a number") from None
            if not (math.isfinite(acc) and 0.0 <= acc <= 1.0):
                raise ValueError(f"{where}: accuracy {text} outside [0, 1]")
            if (group, step) in first_line:
                raise ValueError(f"{where}: duplicate row for group {group!r} step {step} "
                                 f"(first at line {first_line[group, step]})")
            first_line[group, step] = reader.line_num
            values.setdefault(group, {})[step] = acc
    if not values:
        raise ValueError(f"{path}: no data rows")
    all_steps = sorted({s for per in values.values() for s in per})
    for group, per in values.items():
        absent = [s for s in all_steps if s not in per]
        if absent:
            raise ValueError(f"{path}: group {group!r} has no row for step(s) {absent[:10]}"
                             f"{' ...' if len(absent) > 10 else ''}; every group needs every step")
    if steps is not None:
        wanted = sorted({int(s) for s in steps})
        absent = [s for s in wanted if s not in values[next(iter(values))]]
        if absent:
            raise ValueError(f"{path}: no accuracy for checkpoint step(s) {absent}; file has steps {all_steps}")
        all_steps = wanted
    return (np.asarray(all_steps, np.int64),
            {g: np.asarray([per[s] for s in all_steps], np.float64) for g, per in values.items()})




def _parse_correct(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "1.0"):
        return True
    if value in ("0", "false", "0.0"):
        return False
    raise ValueError(f"{where}: correct {text!r} must be 0/1 or true/false")


def load_test_correctness_csv(path: PathLike, *, steps: Sequence[int] | None = None,
                              ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-sample test correctness: a CSV with columns step,group,sample,correct (one row per
    checkpoint, group and test sample; correct 0/1 or true/false) -> (steps [C] ascending,
    {group: correct [C, n_group] bool}, {group: rows [n_group]}) where rows index the samples in
    the order they first appear in the file (the row order of a test-embeddings .npy).

    Validation (ValueError naming the line): as load_test_accuracy_csv, plus every sample of a
    group has a row for every step. steps: keep exactly these checkpoint steps.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    values: dict[tuple[str, str], dict[int, bool]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in ("step", "group", "sample", "correct") if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        col = {c: header.index(c) for c in ("step", "group", "sample", "correct")}
        for row in reader:
            where = f"{path}:line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(col.values()):
                raise ValueError(f"{where}: expected {len(header)} columns, got {len(row)}: {row}")
            step = _parse_step(row[col["step"]].strip(), where)
            key = (row[col["group"]].strip(), row[col["sample"]].strip())
            if not key[0] or not key[1]:
                raise ValueError(f"{where}: empty group or sample")
            per = values.setdefault(key, {})
            if step in per:
                raise ValueError(f"{where}: duplicate row for group {key[0]!r} sample {key[1]!r} step {step}")
            per[step] = _parse_correct(row[col["correct"]], where)
    if not values:
        raise ValueError(f"{path}: no data rows")
    all_steps = sorted({s for per in values.values() for s in per})
    for (group, sample), per in values.items():
        absent = [s for s in all_steps if s not in per]
        if absent:
            raise ValueError(f"{path}: group {group!r} sample {sample!r} has no row for step(s) {absent[:10]}")
    if steps is not None:
        wanted = sorted({int(s) for s in steps})
        absent = [s for s in wanted if s not in all_steps]
        if absent:
            raise ValueError(f"{path}: no correctness for checkpoint step(s) {absent}; file has steps {all_steps}")
        all_steps = wanted
    correct: dict[str, list] = {}
    rows: dict[str, list] = {}
    for row_index, ((group, _), per) in enumerate(values.items()):
        correct.setdefault(group, []).append([per[s] for s in all_steps])
        rows.setdefault(group, []).append(row_index)
    return (np.asarray(all_steps, np.int64), {g: np.asarray(c, bool).T for g, c in correct.items()},
            {g: np.asarray(r, np.int64) for g, r in rows.items()})
