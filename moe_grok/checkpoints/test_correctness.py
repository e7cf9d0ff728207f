"""Test results per checkpoint, supplied by the user as CSVs (inputs of the analysis).

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


def _rows(path: str, columns: tuple[str, ...]):
    """(where, {column: stripped cell}) for every non-blank data row; ValueError naming the file
    (missing file, empty file, missing columns) or the line (too few cells)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: file is empty (expected a header {','.join(columns)})")
        header = [h.strip().lower() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
        index = {c: header.index(c) for c in columns}
        count = 0
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:line {reader.line_num}"
            if len(row) <= max(index.values()):
                raise ValueError(f"{where}: expected {len(header)} columns, got {len(row)}: {row}")
            count += 1
            yield where, {c: row[i].strip() for c, i in index.items()}
    if count == 0:
        raise ValueError(f"{path}: no data rows")


def _select_steps(path: str, all_steps: list[int], steps: Sequence[int] | None, what: str) -> list[int]:
    if steps is None:
        return all_steps
    wanted = sorted({int(s) for s in steps})
    absent = [s for s in wanted if s not in all_steps]
    if absent:
        raise ValueError(f"{path}: no {what} for checkpoint step(s) {absent}; file has steps {all_steps}")
    return wanted


def load_test_accuracy_csv(path: PathLike, *, steps: Sequence[int] | None = None,
                           ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """CSV with columns step,group,accuracy (one row per checkpoint and group; extra columns
    ignored) -> (steps [C] int64 ascending, {group: accuracy [C] float64}).

    Validation (ValueError naming the line): numeric integer steps, non-empty group,
    accuracy a finite number in [0, 1], no duplicate (step, group), and every group has a
    row for every step in the file. steps: if given, keep exactly these checkpoint steps
    (returned ascending); a step missing from the file is an error.
    """
    path = os.fspath(path)
    values: dict[str, dict[int, float]] = {}
    first_line: dict[tuple[str, int], str] = {}
    for where, cells in _rows(path, ("step", "group", "accuracy")):
        step, group, text = _parse_step(cells["step"], where), cells["group"], cells["accuracy"]
        if not group:
            raise ValueError(f"{where}: empty group")
        try:
            acc = float(text)
        except ValueError:
            raise ValueError(f"{where}: accuracy {text!r} is not a number") from None
        if not (math.isfinite(acc) and 0.0 <= acc <= 1.0):
            raise ValueError(f"{where}: accuracy {text} outside [0, 1]")
        if (group, step) in first_line:
            raise ValueError(f"{where}: duplicate row for group {group!r} step {step} "
                             f"(first at {first_line[group, step].rsplit(':', 1)[-1]})")
        first_line[group, step] = where
        values.setdefault(group, {})[step] = acc
    all_steps = sorted({s for per in values.values() for s in per})
    for group, per in values.items():
        absent = [s for s in all_steps if s not in per]
        if absent:
            raise ValueError(f"{path}: group {group!r} has no row for step(s) {absent[:10]}"
                             f"{' ...' if len(absent) > 10 else ''}; every group needs every step")
    all_steps = _select_steps(path, all_steps, steps, "accuracy")
    return (np.asarray(all_steps, np.int64),
            {g: np.asarray([per[s] for s in all_steps], np.float64) for g, per in values.items()})


def _parse_correct(text: str, where: str) -> bool:
    value = text.lower()
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
    values: dict[tuple[str, str], dict[int, bool]] = {}
    for where, cells in _rows(path, ("step", "group", "sample", "correct")):
        step, key = _parse_step(cells["step"], where), (cells["group"], cells["sample"])
        if not key[0] or not key[1]:
            raise ValueError(f"{where}: empty group or sample")
        per = values.setdefault(key, {})
        if step in per:
            raise ValueError(f"{where}: duplicate row for group {key[0]!r} sample {key[1]!r} step {step}")
        per[step] = _parse_correct(cells["correct"], where)
    all_steps = sorted({s for per in values.values() for s in per})
    for (group, sample), per in values.items():
        absent = [s for s in all_steps if s not in per]
        if absent:
            raise ValueError(f"{path}: group {group!r} sample {sample!r} has no row for step(s) {absent[:10]}")
    all_steps = _select_steps(path, all_steps, steps, "correctness")
    correct: dict[str, list] = {}
    rows: dict[str, list] = {}
    for row_index, ((group, _), per) in enumerate(values.items()):
        correct.setdefault(group, []).append([per[s] for s in all_steps])
        rows.setdefault(group, []).append(row_index)
    return (np.asarray(all_steps, np.int64), {g: np.asarray(c, bool).T for g, c in correct.items()},
            {g: np.asarray(r, np.int64) for g, r in rows.items()})
