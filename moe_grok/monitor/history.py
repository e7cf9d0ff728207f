"""A monitor's stored history: one file per monitored step, written whole, so that a monitor resumes
and the post-hoc report can be built from it (`pathway_monitor.report_from_history`).

directory/monitor.json   what the monitor watches (probe sets and their roles, analysis options), strict JSON
directory/step_<step>.npz that step's statistics, float32: per probe "split/<probe>/<field>" for the
                         fields of checkpoints.cache.STAT_FIELDS given at that step, "router" [L, E, D]
                         and "param/<path>" (the parameter sample, when given)
"""
from __future__ import annotations

import os
import re

import numpy as np

from moe_grok import atomic_files, npy_files, strict_json
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.checkpoints.cache import STAT_FIELDS

META_FILE = "monitor.json"
HISTORY_FORMAT = 1  # bump when what a step file holds changes
_STEP_FILE = re.compile(r"^step_(\d{10})\.npz$")
# a field absent from a step file: (the field it defaults to, or None for NaN)
FIELD_DEFAULTS = {"scored_mean_weights": "mean_weights", "scored_routing_entropy": "routing_entropy",
                  "correct": None}


def checkpoint_name(step: int) -> str:
    """The name of a monitored step, as the analysis of saved checkpoints names it."""
    return f"step {step}"


def complete_fields(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every STAT_FIELDS entry of one probe: absent scored fields are the unscored ones (the same
    arrays), an absent "correct" is NaN ([N] float32: unknown)."""
    out = dict(fields)
    for field, default in FIELD_DEFAULTS.items():
        if field not in out:
            out[field] = out[default] if default else np.full(len(out["loss"]), np.nan, np.float32)
    return {field: out[field] for field in STAT_FIELDS}


def _stored_fields(fields: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields worth storing: not those that equal their default (see complete_fields)."""
    out = {}
    for field in STAT_FIELDS:
        default = FIELD_DEFAULTS.get(field, "")
        if default and fields[field] is fields[default]:
            continue
        if default is None and np.all(np.isnan(fields[field])):
            continue
        out[field] = fields[field]
    return out


class MonitorHistory:
    """The step files and monitor.json of one directory (created if needed)."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        atomic_files.remove_stale_temporaries(directory)  # left by a killed writer

    @property
    def meta_path(self) -> str:
        return os.path.join(self.directory, META_FILE)

    def read_meta(self) -> dict | None:
        """monitor.json's content, or None when there is none yet."""
        return strict_json.load(self.meta_path) if os.path.exists(self.meta_path) else None

    def write_meta(self, meta: dict) -> None:
        strict_json.dump({"format": HISTORY_FORMAT, **meta}, self.meta_path, indent=1, sort_keys=True)

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, f"step_{step:010d}.npz")

    def steps(self) -> list[int]:
        """The stored steps, ascending."""
        return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, os.listdir(self.directory)) if m)

    def write(self, stats: CheckpointStats) -> None:
        """Store one step's statistics (replacing a stored entry of that step), whole or not at all."""
        arrays = {f"split/{probe}/{field}": np.asarray(values, np.float32)
                  for probe, fields in stats.splits.items() for field, values in _stored_fields(fields).items()}
        arrays["router"] = np.asarray(stats.router, np.float32)
        arrays.update({f"param/{path}": np.asarray(values) for path, values in stats.param_sample.items()})
        with atomic_files.writing(self.step_path(stats.step)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def remove_after(self, step: int) -> None:
        """Remove the entries of steps after `step` (a resumed run redoes them)."""
        for stored in self.steps():
            if stored > step:
                os.remove(self.step_path(stored))

    def read(self, step: int) -> CheckpointStats:
        """The stored statistics of `step`; ValueError naming the file if it cannot be read."""
        path = self.step_path(step)
        try:
            with npy_files.load_npz(path) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"monitor history file {path} cannot be read ({type(e).__name__}: {e})") from e
        splits: dict[str, dict[str, np.ndarray]] = {}
        params: dict[str, np.ndarray] = {}
        for name, values in arrays.items():
            kind, _, rest = name.partition("/")
            if kind == "split":
                probe, _, field = rest.rpartition("/")
                splits.setdefault(probe, {})[field] = values
            elif kind == "param":
                params[rest] = values
        return CheckpointStats(step, checkpoint_name(step), {p: complete_fields(f) for p, f in splits.items()},
                               arrays["router"], params)

    def read_all(self) -> list[CheckpointStats]:
        """Every stored step's statistics, ascending."""
        return [self.read(step) for step in self.steps()]
