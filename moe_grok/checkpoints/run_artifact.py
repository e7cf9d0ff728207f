"""A run's compact artifact: everything its analysis reads, in one compressed file, so the reports can be
re-derived (`analysis_inputs` -> pipeline.analyze_stats) without the checkpoints or any training.

One artifact (an .npz, written whole) holds, for C checkpoints in step order:
  steps                     [C] int64
  stats/<split>/<field>     [C, ...] float32: the split's STAT_FIELDS (checkpoints.cache.STAT_AXES) stacked, those
                            the analysis reads of it (`fields_read`): all of the training and held-out splits',
                            the test split's correctness and the validation split's loss
  router                    [C, L, E, D] float32: the router matrices (pathway consistency)
  params/<path>             [C, k] float32 / params/<path>#size [C] int64: the parameter sample (param_dynamics)
  groups/<split>            [N] int32: each sample's group index (one copy: the labels do not change)
  answers/<split>           [N] int64: each sample's answer, when the analysis measured answer-aligned routing
  embeddings/<split>        [N, F]: the pairing embeddings the analysis was given, when it was given any
  meta                      strict JSON text: the format, checkpoint names, group names, the split roles, the
                            analysis options, data notes and the run's resolved configuration
Values are stored as extracted (float32 kept bit for bit), so the re-derived reports equal the run's own byte
for byte. Each float32 array is stored as its 4 byte planes ([4, size] uint8: every value's lowest byte, then
the next...), which deflate compresses better than the interleaved bytes (about 10% smaller; the shapes are
in meta). The zip members carry a fixed date, so the same content gives the same bytes (and sha256).

A directory of artifacts has a manifest (`write_manifest`: strict JSON, each file's size and sha256, the
format, and a caller's record such as the protocol's run facts); `verify_manifest` checks the files against it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_grok import atomic_files, npy_files, strict_json
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.checkpoints.cache import STAT_FIELDS

ARTIFACT_FORMAT = 1  # bump when what an artifact holds, or how it is laid out, changes (or fields_read grows)
MANIFEST_FILE = "manifest.json"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no write time in the bytes


@dataclasses.dataclass(frozen=True)
class SplitLabels:
    """A split as the analysis reads it back from an artifact: each sample's group, no tokens.

    groups: [N] int32 index into group_names; sample_answers: [N] int64 each sample's answer, or None
    where the artifact stores none. Offers what analyze_stats uses of an EvalSplit (group_names,
    groups, rows, len, answers)."""

    groups: np.ndarray
    group_names: tuple[str, ...]
    sample_answers: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.groups)

    def answers(self) -> np.ndarray:
        """[N] int64 every sample's answer (EvalSplit.answers); ValueError where the artifact stores none."""
        if self.sample_answers is None:
            raise ValueError("this artifact stores no answers (written by a run without answer_aligned, or before "
                             "artifacts kept them): re-derive with --analysis=answer_aligned=false")
        return self.sample_answers

    def rows(self, group: str) -> np.ndarray:
        """Indices of the samples of `group` (ValueError naming the known groups otherwise)."""
        if group not in self.group_names:
            raise ValueError(f"no group {group!r}; groups are {list(self.group_names)}")
        return np.flatnonzero(self.groups == self.group_names.index(group))


@dataclasses.dataclass(frozen=True)
class AnalysisInputs:
    """What an artifact gives back: analyze_stats' arguments (see pipeline.analyze_stats) and the run's config."""

    stats: list[CheckpointStats]
    splits: dict[str, SplitLabels]
    roles: dict[str, str | None]  # train_split, test_split, held_out_split, validation_split
    embeddings: dict[str, np.ndarray | None]  # train_embeddings, test_embeddings
    options: AnalysisOptions
    data_notes: tuple[str, ...]
    config: dict[str, Any] | None  # the run's resolved configuration (JSON), when the writer gave one


def options_to_json(options: AnalysisOptions) -> dict[str, Any]:
    return strict_json.loads(strict_json.dumps(dataclasses.asdict(options)))


def options_from_json(values: dict[str, Any], overrides: dict[str, Any] | None = None) -> AnalysisOptions:
    """AnalysisOptions from `options_to_json`'s dict, with `overrides` (field: value) applied; lists become
    the tuples the fields hold. ValueError for an unknown field or an invalid value."""
    values = {**values, **(overrides or {})}
    fields = {f.name for f in dataclasses.fields(AnalysisOptions)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown analysis option(s) {unknown}; options are {sorted(fields)}")
    return AnalysisOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def fields_read(split: str, roles: dict[str, str | None]) -> tuple[str, ...]:
    """The STAT_FIELDS the analysis reads of `split` given the split roles (analyze_stats' train_split,
    test_split, held_out_split, validation_split): every field of the training and held-out splits,
    the test split's correctness (the Test@ groups, the accuracy) and the validation split's loss
    (its curve); nothing of any other split."""
    if split in (roles["train_split"], roles["held_out_split"]):
        return STAT_FIELDS
    return tuple(f for f, role in (("loss", "validation_split"), ("correct", "test_split")) if split == roles[role])


def _byte_planes(value: np.ndarray) -> np.ndarray:
    """[4, size] uint8: a float32 array's byte planes (little-endian), see the module doc."""
    return np.ascontiguousarray(value.astype("<f4").reshape(-1).view(np.uint8).reshape(-1, 4).T)


def _from_byte_planes(planes: np.ndarray, shape: list[int]) -> np.ndarray:
    return np.ascontiguousarray(planes.T).view("<f4").astype(np.float32).reshape(shape)


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed's layout (np.load reads it), written whole, with fixed member dates."""
    with atomic_files.writing(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def write_artifact(path: str, stats: Sequence[CheckpointStats], splits: dict[str, Any], roles: dict[str, str | None],
                   options: AnalysisOptions, embeddings: dict[str, np.ndarray | None] | None = None,
                   data_notes: Sequence[str] = (), config: dict[str, Any] | None = None) -> None:
    """Write the artifact of one run's analysis to `path` (see the module doc). stats: sorted by step;
    splits: EvalSplits (or SplitLabels) by name, each with `groups` [N] and `group_names`; roles: the
    split names analyze_stats was given (train_split, test_split, held_out_split, validation_split)."""
    stats = list(stats)
    if not stats:
        raise ValueError("an artifact needs at least one checkpoint")
    arrays: dict[str, np.ndarray] = {"steps": np.array([s.step for s in stats], np.int64)}
    for split in stats[0].splits:
        for field in fields_read(split, roles):
            arrays[f"stats/{split}/{field}"] = np.stack([s.splits[split][field] for s in stats])
    arrays["router"] = np.stack([s.router for s in stats])
    for key in stats[0].param_sample:
        arrays[f"params/{key}"] = np.stack([s.param_sample[key] for s in stats])
    for name, split in splits.items():
        arrays[f"groups/{name}"] = np.asarray(split.groups, np.int32)
        if options.answer_aligned:  # the answers the analysis read (answer-aligned routing)
            arrays[f"answers/{name}"] = np.asarray(split.answers(), np.int64)
    for name, value in (embeddings or {}).items():
        if value is not None:
            arrays[f"embeddings/{name}"] = np.asarray(value)
    planes = {name: list(value.shape) for name, value in arrays.items() if value.dtype == np.float32}
    arrays.update({name: _byte_planes(arrays[name]) for name in planes})
    meta = {"format": ARTIFACT_FORMAT, "checkpoints": [s.name for s in stats], "byte_planes": planes,
            "group_names": {name: list(split.group_names) for name, split in splits.items()},
            "roles": dict(roles), "options": options_to_json(options), "data_notes": list(data_notes),
            "config": config}
    arrays["meta"] = np.array(strict_json.dumps(meta, sort_keys=True))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_npz(path, arrays)


def read_artifact(path: str, option_overrides: dict[str, Any] | None = None) -> AnalysisInputs:
    """The analysis inputs stored at `path`, with `option_overrides` (AnalysisOptions field: value) applied.
    ValueError for another artifact format."""
    with npy_files.load_npz(path) as data:
        meta = strict_json.loads(str(data["meta"]))
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"{path}: artifact format {meta.get('format')!r}, this code reads {ARTIFACT_FORMAT}")
        arrays = {name: data[name] for name in data.files if name != "meta"}
    arrays.update({name: _from_byte_planes(arrays[name], shape) for name, shape in meta["byte_planes"].items()})
    steps = arrays["steps"]
    stored = {}  # split -> the fields stored of it (fields_read)
    for name in arrays:
        if name.startswith("stats/"):
            _, split, field = name.split("/")
            stored.setdefault(split, []).append(field)
    params = [name[len("params/"):] for name in arrays if name.startswith("params/")]
    stats = [CheckpointStats(int(step), meta["checkpoints"][c],
                             {s: {f: arrays[f"stats/{s}/{f}"][c] for f in fields} for s, fields in stored.items()},
                             arrays["router"][c], {key: arrays[f"params/{key}"][c] for key in params})
             for c, step in enumerate(steps)]
    splits = {name: SplitLabels(arrays[f"groups/{name}"], tuple(group_names), arrays.get(f"answers/{name}"))
              for name, group_names in meta["group_names"].items()}
    embeddings = {name: arrays.get(f"embeddings/{name}") for name in ("train", "test")}
    options = options_from_json(meta["options"], option_overrides)
    return AnalysisInputs(stats, splits, meta["roles"], embeddings, options, tuple(meta["data_notes"]), meta["config"])


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(directory: str) -> list[str]:
    """The artifacts below `directory`, as sorted paths relative to it."""
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, n), directory) for n in names
                  if n.endswith(".npz") and atomic_files.TMP_MARK not in n]  # not a writer's temporary file
    return sorted(found)


def write_manifest(directory: str, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write directory/manifest.json (strict JSON, whole): the format, every artifact's size (bytes) and
    sha256, their total, and `record` (the writer's facts, e.g. the protocol's run record). Returns it."""
    files = {name: {"bytes": os.path.getsize(os.path.join(directory, name)),
                    "sha256": _sha256(os.path.join(directory, name))} for name in artifact_files(directory)}
    manifest = {"format": ARTIFACT_FORMAT, "files": files, "total_bytes": sum(f["bytes"] for f in files.values()),
                "record": record}
    strict_json.dump(manifest, os.path.join(directory, MANIFEST_FILE), indent=1)
    return manifest


def verify_manifest(directory: str) -> dict[str, Any]:
    """directory/manifest.json, after checking its format and every listed file's size and sha256
    (ValueError naming the first file that differs or is missing)."""
    manifest = strict_json.load(os.path.join(directory, MANIFEST_FILE))
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{directory}: artifact format {manifest.get('format')!r}, this code reads {ARTIFACT_FORMAT}")
    for name, facts in manifest["files"].items():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise ValueError(f"{path}: listed in the manifest but missing")
        if os.path.getsize(path) != facts["bytes"] or _sha256(path) != facts["sha256"]:
            raise ValueError(f"{path}: size or sha256 differs from the manifest's")
    return manifest
