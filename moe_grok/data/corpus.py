"""Training data grouped by domain -> `splits.EvalSplit` for next-token-prediction analysis.

Every loader returns an EvalSplit of N samples padded to S = seq_len tokens:

  tokens      [N, S] int32  token ids, right-padded with `pad_id` (default 1, OLMoE's pad id)
  mask        [N, S] int32  1 = real token, 0 = padding
  targets     [N, S] int32  tokens[:, t + 1] at position t (0 in the last column), from
                            `splits.next_token_targets`
  target_mask [N, S] int32  1 where both position t and t + 1 are real tokens
  groups      [N]    int32  index into group_names (one group = one data domain)

Sources:
  load_jsonl_text   JSONL of raw text, tokenized with a `tokenizers` tokenizer.json
  load_jsonl_ids    JSONL of pre-tokenized id lists
  load_npy_ids      one 2-D int .npy per group (+ optional lengths .npy or in-file pad id)
  load_olmo_memmap  OLMo-style flat token files (np.memmap, uint16/uint32), instances as
                    fixed chunks of the stream or from an explicit instance index
  make_lm_split     in-memory id lists per group (what the loaders share)
  load_split        any of the above from a config (configs/olmoe_grokking.py's `data`)

Common rules (all loaders):
  * Groups keep their order of first appearance (files in the order given, records in file
    order); samples keep file order. Same inputs + same seed -> identical split.
  * A sample longer than seq_len is truncated to its first seq_len tokens; the number of
    truncated samples is logged as one warning and reported in `LoadInfo.n_truncated`.
  * `max_samples_per_group=k` keeps k samples of each larger group, chosen without
    replacement by a generator seeded with (seed, crc32(group name)), so one group's choice
    does not depend on the other groups; chosen samples stay in file order. Sampling happens
    BEFORE tokenization / reading / dropping, so expensive work is done only for the chosen.
  * A sample with < 2 real tokens (after truncation) has no next-token target: with
    on_short="drop" (default) it is dropped and the count is logged and reported in
    `LoadInfo.n_dropped_short`; with on_short="error" it is a ValueError naming the sample.
  * Token ids must be integers in [0, vocab_size) when vocab_size is given (else in
    [0, 2**31)); a violation is a ValueError naming the sample (file:line / row / instance).
    Only the kept (post-truncation) tokens are checked.
  * An empty file, or a group left without samples, is a ValueError naming it.
Pass `return_info=True` to get `(split, LoadInfo)` with each row's provenance.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from moe_grok.data.splits import EvalSplit, next_token_targets

OLMOE_PAD_ID = 1  # allenai/OLMoE-1B-7B-0924 pad_token_id ("<|padding|>")
OLMOE_EOS_TOKEN = "<|endoftext|>"  # its eos token (id 50279)
_ID_LIMIT = 2**31  # token ids are stored as int32
_SHORT_POLICIES = ("drop", "error")

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """What a loader did. sample_ids / lengths / available are per row / per group."""

    sample_ids: tuple[str, ...]  # [N] provenance of each row, e.g. "a.jsonl:line 3"
    lengths: np.ndarray  # [N] int32 real tokens per row (after truncation)
    n_truncated: int  # rows that were longer than seq_len and cut
    n_dropped_short: int  # samples dropped for having < 2 tokens
    available: dict[str, int]  # group -> candidate samples before max_samples_per_group


# A materialized sample: (provenance label, ids [<= seq_len or full], original length).
_Sample = tuple[str, np.ndarray, int]


# ----------------------------------------------------------------------------------------
# Shared core
# ----------------------------------------------------------------------------------------
def _check_common(seq_len: int, pad_id: int, vocab_size: int | None, max_samples_per_group: int | None,
                  on_short: str) -> None:
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (one next-token target needs 2 tokens), got {seq_len!r}")
    if vocab_size is not None and (not isinstance(vocab_size, (int, np.integer)) or not 0 < vocab_size <= _ID_LIMIT):
        raise ValueError(f"vocab_size must be a positive integer <= 2**31, got {vocab_size!r}")
    limit = _ID_LIMIT if vocab_size is None else vocab_size
    if not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < limit:
        raise ValueError(f"pad_id {pad_id!r} must be an integer in [0, {limit})")
    if max_samples_per_group is not None and (not isinstance(max_samples_per_group, (int, np.integer))
                                              or max_samples_per_group < 1):
        raise ValueError(f"max_samples_per_group must be a positive integer or None, got {max_samples_per_group!r}")
    if on_short not in _SHORT_POLICIES:
        raise ValueError(f"on_short must be one of {_SHORT_POLICIES}, got {on_short!r}")


def _choose(n: int, k: int | None, seed: int, group: str) -> np.ndarray:
    """Sorted indices of the k (of n) candidates kept for `group`; all of them when k is None or >= n."""
    if k is None or k >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(group.encode("utf-8"))])
    return np.sort(rng.choice(n, size=k, replace=False))


def _as_ids(value: Any, label: str) -> np.ndarray:
    """A 1-D integer id array from a list / array, or ValueError naming the sample."""
    if isinstance(value, (str, bytes, Mapping)):
        raise ValueError(f"{label}: expected a list of integer token ids, got {type(value).__name__}")
    if isinstance(value, (list, tuple)) and any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                                for v in value):
        bad = next(v for v in value if isinstance(v, bool) or not isinstance(v, (int, np.integer)))
        raise ValueError(f"{label}: token ids must be integers, found {bad!r}")
    try:
        ids = np.asarray(value)
    except (OverflowError, ValueError) as e:
        raise ValueError(f"{label}: cannot read token ids ({e})") from None
    if ids.size == 0:
        return np.zeros((0,), np.int64)
    if ids.ndim != 1:
        raise ValueError(f"{label}: token ids must be a flat list, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{label}: token ids must be integers, got dtype {ids.dtype}")
    return ids


def _check_range(ids: np.ndarray, label: str, vocab_size: int | None) -> None:
    if ids.size == 0:
        return
    limit = _ID_LIMIT if vocab_size is None else vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        what = f"vocab_size {vocab_size}" if vocab_size is not None else "the int32 range"
        raise ValueError(f"{label}: token id {bad} outside [0, {limit}) ({what})")


def _assemble(groups: Sequence[tuple[str, Sequence[_Sample]]], seq_len: int, pad_id: int, vocab_size: int | None,
              on_short: str, available: dict[str, int], return_info: bool):
    """Truncate, validate, pad -> EvalSplit (and LoadInfo)."""
    if not groups:
        raise ValueError("no groups to load")
    rows, labels, group_ids, lengths = [], [], [], []
    n_truncated = n_short = 0
    short_examples: list[str] = []
    for g, (name, samples) in enumerate(groups):
        kept = 0
        for label, ids, full_length in samples:
            if full_length > seq_len:
                n_truncated += 1
            ids = ids[:seq_len]
            _check_range(ids, label, vocab_size)
            if len(ids) < 2:
                if on_short == "error":
                    raise ValueError(f"{label}: sample has {len(ids)} token(s); next-token prediction needs >= 2 "
                                     f"(on_short='drop' drops such samples)")
                n_short += 1
                if len(short_examples) < 3:
                    short_examples.append(label)
                continue
            rows.append(ids)
            labels.append(label)
            group_ids.append(g)
            lengths.append(len(ids))
            kept += 1
        if kept == 0:
            raise ValueError(f"group {name!r} has no sample with >= 2 tokens ({len(samples)} candidate(s) read); "
                             "every group needs at least one sample")
    if n_truncated:
        logging.warning("truncated %d of %d sample(s) to seq_len=%d tokens", n_truncated, len(rows) + n_short, seq_len)
    if n_short:
        logging.warning("dropped %d sample(s) with < 2 tokens (no next-token target), e.g. %s",
                       n_short, ", ".join(short_examples))
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i, ids in enumerate(rows):
        tokens[i, :len(ids)] = ids
        mask[i, :len(ids)] = 1
    targets, target_mask = next_token_targets(tokens, mask)
    split = EvalSplit(tokens, mask, targets, target_mask, np.asarray(group_ids, np.int32),
                      tuple(name for name, _ in groups))
    if not return_info:
        return split
    return split, LoadInfo(tuple(labels), np.asarray(lengths, np.int32), n_truncated, n_short, dict(available))


def make_lm_split(samples_by_group: Mapping[str, Sequence[Sequence[int]]], seq_len: int, *, pad_id: int = OLMOE_PAD_ID,
                  vocab_size: int | None = None, max_samples_per_group: int | None = None, seed: int = 0,
                  on_short: str = "drop", return_info: bool = False):
    """In-memory id lists per group -> EvalSplit (groups in mapping order, samples in list order).

    samples_by_group: group name -> list of 1-D integer id sequences (any lengths).
    Returns EvalSplit with arrays [N, seq_len] (or (EvalSplit, LoadInfo) with return_info).
    """
    _check_common(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    if not samples_by_group:
        raise ValueError("samples_by_group is empty: no groups to load")
    groups, available = [], {}
    for name, seqs in samples_by_group.items():
        if len(seqs) == 0:
            raise ValueError(f"group {name!r} has no samples")
        available[str(name)] = len(seqs)
        chosen = _choose(len(seqs), max_samples_per_group, seed, str(name))
        samples = []
        for i in chosen:
            label = f"{name}[{i}]"
            ids = _as_ids(seqs[i], label)
            samples.append((label, ids, len(ids)))
        groups.append((str(name), samples))
    return _assemble(groups, seq_len, pad_id, vocab_size, on_short, available, return_info)


# ----------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------
def _as_paths(paths: PathLike | Sequence[PathLike], what: str = "paths") -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError(f"{what}: no files given")
    return paths


def file_group_name(path: PathLike) -> str:
    """Group name of a file: its base name without directory and data suffixes
    ("data/open-web-math.jsonl.gz" -> "open-web-math")."""
    name = os.path.basename(os.fspath(path))
    for suffix in (".gz", ".jsonl", ".json", ".npy", ".bin"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _read_jsonl(path: str) -> Iterable[tuple[int, dict]]:
    """(line number, record) for every non-blank line; ValueError for bad JSON or an empty file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    count = 0
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:line {lineno}: invalid JSON ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:line {lineno}: expected a JSON object, got {type(record).__name__}")
            count += 1
            yield lineno, record
    if count == 0:
        raise ValueError(f"{path}: file is empty (no JSONL records)")


def _grouped_jsonl(paths: list[str], value_field: str, group_field: str | None, groups_from_files: bool,
                   groups: Sequence[str] | None) -> list[tuple[str, list[tuple[str, Any]]]]:
    """[(group name, [(label, record[value_field]), ...]), ...] in first-appearance order
    (or the order of `groups`, which also restricts the groups kept)."""
    if (group_field is None) == (not groups_from_files):
        raise ValueError("give exactly one of group_field (a group per record field value) and "
                         "groups_from_files=True (one group per file, named by the file stem)")
    by_group: dict[str, list[tuple[str, Any]]] = {}
    for path in paths:
        file_group = file_group_name(path) if groups_from_files else None
        for lineno, record in _read_jsonl(path):
            label = f"{path}:line {lineno}"
            if value_field not in record:
                raise ValueError(f"{label}: record has no field {value_field!r} (fields: {sorted(record)})")
            if groups_from_files:
                name = file_group
            else:
                if group_field not in record:
                    raise ValueError(f"{label}: record has no group field {group_field!r} (fields: {sorted(record)})")
                name = record[group_field]
                if isinstance(name, bool) or not isinstance(name, (str, int)) or name == "":
                    raise ValueError(f"{label}: group field {group_field!r} must be a non-empty string or an "
                                     f"integer, got {name!r}")
                name = str(name)
            by_group.setdefault(name, []).append((label, record[value_field]))
    if groups is None:
        return list(by_group.items())
    if len(set(groups)) != len(groups):
        raise ValueError(f"groups has duplicates: {list(groups)}")
    missing = [g for g in groups if g not in by_group]
    if missing:
        raise ValueError(f"group(s) {missing} not found in {paths}; found {sorted(by_group)}")
    return [(g, by_group[g]) for g in groups]


def load_jsonl_text(paths: PathLike | Sequence[PathLike], tokenizer_json: Any, seq_len: int, *,
                    text_field: str = "text", group_field: str | None = None, groups_from_files: bool = False,
                    groups: Sequence[str] | None = None, max_samples_per_group: int | None = None, seed: int = 0,
                    add_eos: bool = False, eos_token: str = OLMOE_EOS_TOKEN, add_special_tokens: bool = True,
                    pad_id: int = OLMOE_PAD_ID, vocab_size: int | None = None, on_short: str = "drop",
                    return_info: bool = False):
    """JSONL text files -> EvalSplit [N, seq_len] for next-token prediction.

    paths: one or more .jsonl (or .jsonl.gz) files, one JSON object per line.
    tokenizer_json: path of a HF `tokenizers` tokenizer.json (or a tokenizers.Tokenizer).
    Groups: exactly one of `group_field` (record[group_field] names the group) or
    `groups_from_files=True` (group = file stem; files with the same stem are merged).
    groups: optional subset / order of group names to keep.
    add_eos: append the id of `eos_token` to every text (before truncation), as OLMo's data.
    add_special_tokens: passed to Tokenizer.encode (its post-processor template, if any).
    """
    import tokenizers

    _check_common(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    paths = _as_paths(paths)
    if isinstance(tokenizer_json, tokenizers.Tokenizer):
        tokenizer = tokenizer_json
    else:
        if not os.path.exists(os.fspath(tokenizer_json)):
            raise FileNotFoundError(f"no such tokenizer file: {tokenizer_json}")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(os.fspath(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception that names no file
            raise ValueError(f"{tokenizer_json}: not a valid tokenizers tokenizer.json ({e})") from None
    eos_id = None
    if add_eos:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"add_eos: token {eos_token!r} is not in the tokenizer's vocabulary (set eos_token)")
    grouped = _grouped_jsonl(paths, text_field, group_field, groups_from_files, groups)
    out, available = [], {}
    for name, records in grouped:
        available[name] = len(records)
        chosen = [records[i] for i in _choose(len(records), max_samples_per_group, seed, name)]
        for label, text in chosen:
            if not isinstance(text, str):
                raise ValueError(f"{label}: field {text_field!r} must be a string, got {type(text).__name__}")
        encodings = tokenizer.encode_batch([text for _, text in chosen], add_special_tokens=add_special_tokens)
        samples = []
        for (label, _), enc in zip(chosen, encodings, strict=False):
            ids = list(enc.ids) + ([eos_id] if add_eos else [])
            samples.append((label, np.asarray(ids, np.int64), len(ids)))
        out.append((name, samples))
    return _assemble(out, seq_len, pad_id, vocab_size, on_short, available, return_info)


def load_jsonl_ids(paths: PathLike | Sequence[PathLike], seq_len: int, *, ids_field: str = "input_ids",
                   group_field: str | None = None, groups_from_files: bool = False,
                   groups: Sequence[str] | None = None, max_samples_per_group: int | None = None, seed: int = 0,
                   pad_id: int = OLMOE_PAD_ID, vocab_size: int | None = None, on_short: str = "drop",
                   return_info: bool = False):
    """Pre-tokenized JSONL (record[ids_field] = list of int token ids) -> EvalSplit [N, seq_len].

    Grouping as `load_jsonl_text`: exactly one of group_field / groups_from_files=True.
    """
    _check_common(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    grouped = _grouped_jsonl(_as_paths(paths), ids_field, group_field, groups_from_files, groups)
    out, available = [], {}
    for name, records in grouped:
        available[name] = len(records)
        samples = []
        for i in _choose(len(records), max_samples_per_group, seed, name):
            label, value = records[i]
            ids = _as_ids(value, label)
            samples.append((label, ids, len(ids)))
        out.append((name, samples))
    return _assemble(out, seq_len, pad_id, vocab_size, on_short, available, return_info)


# ----------------------------------------------------------------------------------------
# .npy id matrices
# ----------------------------------------------------------------------------------------
def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: cannot read {what} as a plain numeric .npy array ({e})") from None


def load_npy_ids(paths_by_group: Mapping[str, PathLike], seq_len: int, *,
                 lengths_by_group: Mapping[str, PathLike] | None = None, file_pad_id: int | None = None,
                 max_samples_per_group: int | None = None, seed: int = 0, pad_id: int = OLMOE_PAD_ID,
                 vocab_size: int | None = None, on_short: str = "drop", return_info: bool = False):
    """One .npy per group -> EvalSplit [N, seq_len].

    Each file holds a 2-D integer array [n, W]: row r is sample r. Its real length is
      * lengths_by_group[group] (a 1-D integer .npy [n], 0 <= length <= W) if given, else
      * W minus the trailing run of `file_pad_id` entries if file_pad_id is given, else
      * W (every entry is a real token).
    (lengths_by_group and file_pad_id are exclusive.) Files are memory-mapped; only the
    chosen rows are read. Groups are in mapping order.
    """
    _check_common(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    if not paths_by_group:
        raise ValueError("paths_by_group is empty: no groups to load")
    if lengths_by_group is not None and file_pad_id is not None:
        raise ValueError("give at most one of lengths_by_group and file_pad_id")
    if lengths_by_group is not None:
        extra = set(lengths_by_group) - set(paths_by_group)
        if extra:
            raise ValueError(f"lengths_by_group names groups without data files: {sorted(extra)}")
    out, available = [], {}
    for name, path in paths_by_group.items():
        path = os.fspath(path)
        data = _load_npy(path, "token ids")
        if data.ndim != 2:
            raise ValueError(f"{path} (group {name!r}): expected a 2-D [samples, tokens] array, got shape {data.shape}")
        if data.dtype.kind not in "iu":
            raise ValueError(f"{path} (group {name!r}): token ids must be integers, got dtype {data.dtype}")
        n, width = data.shape
        if n == 0 or width == 0:
            raise ValueError(f"{path} (group {name!r}): file is empty (shape {data.shape})")
        lengths = None
        if lengths_by_group is not None and name in lengths_by_group:
            lpath = os.fspath(lengths_by_group[name])
            lengths = np.asarray(_load_npy(lpath, "lengths"))
            if lengths.shape != (n,) or lengths.dtype.kind not in "iu":
                raise ValueError(f"{lpath}: lengths must be a 1-D integer array of shape ({n},) matching {path}, "
                                 f"got {lengths.dtype} {lengths.shape}")
            bad = np.flatnonzero((lengths < 0) | (lengths > width))
            if bad.size:
                raise ValueError(f"{lpath}: row {bad[0]} length {lengths[bad[0]]} outside [0, {width}]")
        available[name] = n
        samples = []
        for r in _choose(n, max_samples_per_group, seed, name):
            row = np.asarray(data[r])
            if lengths is not None:
                length = int(lengths[r])
            elif file_pad_id is not None:
                real = np.flatnonzero(row != file_pad_id)
                length = int(real[-1]) + 1 if real.size else 0
            else:
                length = width
            samples.append((f"{path}:row {r}", row[:min(length, seq_len)], length))
        out.append((str(name), samples))
    return _assemble(out, seq_len, pad_id, vocab_size, on_short, available, return_info)


# ----------------------------------------------------------------------------------------
# OLMo memory-mapped token files
# ----------------------------------------------------------------------------------------
_NPY_MAGIC = b"\x93NUMPY"


def open_token_file(path: PathLike, dtype=np.uint32) -> np.ndarray:
    """A flat token file as a read-only 1-D memmap (nothing is read into RAM).

    OLMo/Dolma files (often named .npy) are raw arrays without a header: read as `dtype`
    (uint16 or uint32). A real .npy (with header) is memory-mapped with its own dtype and
    must be 1-D integer.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"{path}: a .npy token file must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"{path}: file is empty (no tokens)")
        return arr
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"dtype must be uint16 or uint32 (OLMo token files), got {dtype}")
    if size == 0:
        raise ValueError(f"{path}: file is empty (no tokens)")
    if size % dtype.itemsize:
        raise ValueError(f"{path}: size {size} bytes is not a multiple of {dtype} ({dtype.itemsize} bytes); "
                         "wrong dtype?")
    return np.memmap(path, dtype=dtype, mode="r")


def _read_index(value: Any, what: str) -> np.ndarray:
    arr = np.asarray(_load_npy(os.fspath(value), what)) if isinstance(value, (str, os.PathLike)) else np.asarray(value)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what}: instance index must be integers, got dtype {arr.dtype}")
    if not (arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 2)):
        raise ValueError(f"{what}: instance index must be 1-D instance ids [n] or [n, 2] [start, end) token "
                         f"offsets, got shape {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{what}: instance index is empty")
    return arr.astype(np.int64)


def load_olmo_memmap(data_paths: PathLike | Sequence[PathLike] | Mapping[str, PathLike | Sequence[PathLike]],
                     seq_len: int, *, dtype=np.uint32, instance_length: int | None = None,
                     instances: Any = None, max_samples_per_group: int | None = None, seed: int = 0,
                     pad_id: int = OLMOE_PAD_ID, vocab_size: int | None = None, on_short: str = "drop",
                     return_info: bool = False):
    """OLMo-style memory-mapped token files -> EvalSplit [N, seq_len].

    data_paths: flat token files (raw uint16/uint32, see `open_token_file`), in OLMo's order.
      A sequence -> one group per file (group = file stem); a mapping group -> file(s) ->
      those groups (files concatenated in mapping order).
    Instances, numbered over the concatenation of all files in that order:
      * instances=None: OLMo's fixed chunks. File f contributes floor(n_tokens_f / L) chunks
        (L = instance_length, default seq_len; the remainder is dropped); global instance i
        is chunk i - (chunks of earlier files) of its file: tokens[j*L:(j+1)*L].
      * instances = array or .npy path: either [n] global instance ids (chunks as above) or
        [n, 2] [start, end) offsets into the concatenated token stream (an instance may not
        span two files). Each instance's group is the group of its file.
      * instances = mapping group -> (array or .npy path): the groups are the mapping's keys
        (data_paths must then be a sequence, not a mapping).
    Instances keep the index's order; duplicates in a group are an error. Only the chosen
    instances are read (at most seq_len tokens each); instances longer than seq_len count as
    truncated.
    """
    _check_common(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    length = seq_len if instance_length is None else instance_length
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"instance_length must be a positive integer, got {instance_length!r}")
    if isinstance(data_paths, Mapping):
        if isinstance(instances, Mapping):
            raise ValueError("give groups either by data_paths (a mapping) or by instances (a mapping), not both")
        if not data_paths:
            raise ValueError("data_paths is empty: no files given")
        files = [(os.fspath(p), str(g)) for g, ps in data_paths.items() for p in _as_paths(ps, f"group {g!r}")]
        file_groups = [str(g) for g in data_paths]
    else:
        files = [(p, file_group_name(p)) for p in _as_paths(data_paths, "data_paths")]
        file_groups = list(dict.fromkeys(g for _, g in files))
    arrays = [open_token_file(p, dtype) for p, _ in files]
    n_tokens = np.asarray([len(a) for a in arrays], np.int64)
    n_chunks = n_tokens // length
    token_start = np.concatenate([[0], np.cumsum(n_tokens)])
    chunk_start = np.concatenate([[0], np.cumsum(n_chunks)])

    def locate(index: np.ndarray, what: str) -> list[tuple[int, int, int, str]]:
        """Index rows -> (file, start, end, label) with offsets inside the file."""
        located = []
        if index.ndim == 1:
            bad = np.flatnonzero((index < 0) | (index >= chunk_start[-1]))
            if bad.size:
                raise ValueError(f"{what}: instance id {index[bad[0]]} (entry {bad[0]}) outside [0, {chunk_start[-1]})"
                                 f" = the number of {length}-token instances in the data files")
            f_of = np.searchsorted(chunk_start, index, side="right") - 1
            for i, f in zip(index, f_of, strict=False):
                j = int(i - chunk_start[f])
                located.append((int(f), j * length, (j + 1) * length, f"{files[f][0]}[instance {i}]"))
        else:
            for e, (a, b) in enumerate(index):
                f = int(np.searchsorted(token_start, a, side="right") - 1)
                if a < 0 or b <= a or a >= token_start[-1] or b > token_start[f + 1]:
                    raise ValueError(f"{what}: entry {e} offsets [{a}, {b}) are not a non-empty range inside one "
                                     f"data file (file boundaries at {token_start.tolist()})")
                lo, hi = int(a - token_start[f]), int(b - token_start[f])
                located.append((f, lo, hi, f"{files[f][0]}[tokens {lo}:{hi}]"))
        return located

    candidates: dict[str, list[tuple[int, int, int, str]]]
    if instances is None:
        candidates = {g: [] for g in file_groups}
        for f, (path, g) in enumerate(files):
            if n_chunks[f] == 0:
                logging.warning("%s: %d tokens, fewer than one %d-token instance", path, n_tokens[f], length)
            candidates[g].append(f)  # expanded lazily below: chunk counts can be huge
        groups_order = file_groups
    elif isinstance(instances, Mapping):
        if not instances:
            raise ValueError("instances is an empty mapping: no groups to load")
        candidates = {str(g): locate(_read_index(v, f"instances[{g!r}]"), f"instances[{g!r}]")
                      for g, v in instances.items()}
        groups_order = list(candidates)
    else:
        located = locate(_read_index(instances, "instances"), "instances")
        candidates = {g: [] for g in file_groups}
        for item in located:
            candidates[files[item[0]][1]].append(item)
        groups_order = file_groups

    out, available = [], {}
    for name in groups_order:
        if instances is None:
            group_files = candidates[name]
            counts = n_chunks[group_files]
            total = int(counts.sum())
            if total == 0:
                raise ValueError(f"group {name!r}: its file(s) {[files[f][0] for f in group_files]} hold no complete "
                                 f"{length}-token instance")
            offsets = np.concatenate([[0], np.cumsum(counts)])
            chosen = []
            for k in _choose(total, max_samples_per_group, seed, name):
                which = int(np.searchsorted(offsets, k, side="right") - 1)
                f, j = group_files[which], int(k - offsets[which])
                chosen.append((f, j * length, (j + 1) * length,
                               f"{files[f][0]}[instance {int(chunk_start[f]) + j}]"))
        else:
            items = candidates[name]
            if not items:
                raise ValueError(f"group {name!r}: the instance index selects no instance from its file(s)")
            seen: dict[tuple[int, int, int], str] = {}
            for f, a, b, label in items:
                if (f, a, b) in seen:
                    raise ValueError(f"group {name!r}: instance {label} is selected twice")
                seen[(f, a, b)] = label
            total = len(items)
            chosen = [items[k] for k in _choose(total, max_samples_per_group, seed, name)]
        available[name] = total
        samples = [(label, np.asarray(arrays[f][a:min(b, a + seq_len)]).astype(np.int64), b - a)
                   for f, a, b, label in chosen]
        out.append((name, samples))
    return _assemble(out, seq_len, pad_id, vocab_size, on_short, available, return_info)


# ----------------------------------------------------------------------------------------
# Config-driven entry point
# ----------------------------------------------------------------------------------------
FORMATS = ("jsonl_text", "jsonl_ids", "npy", "olmo_memmap")


def _path_list(value: Any) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [p.strip() for p in os.fspath(value).split(",") if p.strip()]
    return [os.fspath(p) for p in value]


DATA_CONFIG_KEYS = (
    "format", "paths", "seq_len", "tokenizer", "text_field", "add_eos", "eos_token", "add_special_tokens",
    "ids_field", "group_field", "groups_from_files", "max_samples_per_group", "seed", "pad_id", "vocab_size",
    "on_short", "lengths", "file_pad_id", "memmap_dtype", "instance_length", "instances")
"""Every key `load_split` reads; configs/olmoe_grokking.py's `data` declares each with a comment."""


def load_split(config: Any, return_info: bool = False):
    """EvalSplit from a `data` config (ml_collections.ConfigDict or mapping) holding every key of
    DATA_CONFIG_KEYS (configs/olmoe_grokking.py documents each). "Unset" is spelled so the key
    keeps its type on the command line: "" for paths and names, 0 for vocab_size /
    max_samples_per_group / instance_length, -1 for file_pad_id.
    Logs samples per group, truncated and dropped counts.
    """
    missing = [key for key in DATA_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"data config lacks key(s) {missing}; start from configs/olmoe_grokking.py's `data`")

    def get(key):
        return config[key]

    fmt = get("format")
    if fmt not in FORMATS:
        raise ValueError(f"data format must be one of {FORMATS}, got {fmt!r}")
    paths = _path_list(get("paths"))
    if not paths:
        raise ValueError("data config: no paths given")
    max_samples = get("max_samples_per_group")
    common = dict(max_samples_per_group=max_samples if max_samples and max_samples > 0 else None,
                  seed=int(get("seed")), pad_id=int(get("pad_id")),
                  vocab_size=get("vocab_size") or None, on_short=get("on_short"), return_info=True)
    seq_len = int(get("seq_len"))
    if fmt in ("jsonl_text", "jsonl_ids"):
        grouping = dict(group_field=get("group_field") or None, groups_from_files=bool(get("groups_from_files")))
        if fmt == "jsonl_text":
            if not get("tokenizer"):
                raise ValueError("data config: format jsonl_text needs `tokenizer` (a tokenizer.json path)")
            split, info = load_jsonl_text(paths, get("tokenizer"), seq_len, text_field=get("text_field"),
                                          add_eos=bool(get("add_eos")), eos_token=get("eos_token"),
                                          add_special_tokens=bool(get("add_special_tokens")), **grouping, **common)
        else:
            split, info = load_jsonl_ids(paths, seq_len, ids_field=get("ids_field"), **grouping, **common)
    elif fmt == "npy":
        names = [file_group_name(p) for p in paths]
        if len(set(names)) != len(names):
            raise ValueError(f"npy format: file stems must be distinct group names, got {names}")
        lengths = _path_list(get("lengths"))
        if lengths and len(lengths) != len(paths):
            raise ValueError(f"npy format: {len(lengths)} lengths file(s) for {len(paths)} data file(s)")
        file_pad_id = get("file_pad_id")
        split, info = load_npy_ids(dict(zip(names, paths, strict=False)), seq_len,
                                   lengths_by_group=dict(zip(names, lengths, strict=False)) if lengths else None,
                                   file_pad_id=None if file_pad_id is None or file_pad_id < 0 else int(file_pad_id),
                                   **common)
    else:
        split, info = load_olmo_memmap(paths, seq_len, dtype=np.dtype(get("memmap_dtype")),
                                       instance_length=get("instance_length") or None,
                                       instances=get("instances") or None, **common)
    counts = np.bincount(split.groups, minlength=len(split.group_names))
    logging.info("loaded %d samples of %d tokens: %s (truncated %d, dropped %d short)", len(split.tokens), seq_len,
                ", ".join(f"{g}={c}/{info.available[g]}" for g, c in zip(split.group_names, counts, strict=False)),
                info.n_truncated, info.n_dropped_short)
    return (split, info) if return_info else split


__all__ = [
    "DATA_CONFIG_KEYS", "FORMATS", "LoadInfo", "OLMOE_EOS_TOKEN", "OLMOE_PAD_ID", "file_group_name", "load_jsonl_ids",
    "load_jsonl_text", "load_npy_ids", "load_olmo_memmap", "load_split", "make_lm_split",
    "open_token_file",
]
