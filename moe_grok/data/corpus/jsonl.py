"""JSONL files: raw text (tokenized with a `tokenizers` tokenizer.json) or pre-tokenized id lists."""
from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from moe_grok.data.corpus.assemble import OLMOE_EOS_TOKEN, OLMOE_PAD_ID, as_token_ids, assemble_split, check_loader_args
from moe_grok.data.corpus.domains import PathLike, as_path_list, choose_samples, file_group_name


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_jsonl(path: str) -> Iterable[tuple[int, dict]]:
    """(line number, record) for every non-blank line; ValueError naming the file (and line) for
    bad JSON, a byte that is not UTF-8, a truncated or invalid .gz file, or an empty file.

    Lines are read as bytes and decoded one by one, so a decoding error names its line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    count = 0
    lineno = 0
    with _open_binary(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines, None)
            except EOFError:  # gzip: the stream ends before its end marker
                raise ValueError(f"{path}: truncated gzip file (cut after line {lineno})") from None
            except (gzip.BadGzipFile, zlib.error) as e:
                raise ValueError(f"{path}: not a valid gzip file ({e}); a plain JSONL file must not end in .gz"
                                 ) from None
            if raw is None:
                break
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:line {lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1}); JSONL files must be UTF-8") from None
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

    check_loader_args(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    paths = as_path_list(paths)
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
        chosen = [records[i] for i in choose_samples(len(records), max_samples_per_group, seed, name)]
        for label, text in chosen:
            if not isinstance(text, str):
                raise ValueError(f"{label}: field {text_field!r} must be a string, got {type(text).__name__}")
        encodings = tokenizer.encode_batch([text for _, text in chosen], add_special_tokens=add_special_tokens)
        samples = []
        for (label, _), enc in zip(chosen, encodings, strict=False):
            ids = list(enc.ids) + ([eos_id] if add_eos else [])
            samples.append((label, np.asarray(ids, np.int64), len(ids)))
        out.append((name, samples))
    return assemble_split(out, seq_len, pad_id, vocab_size, on_short, available, return_info)


def load_jsonl_ids(paths: PathLike | Sequence[PathLike], seq_len: int, *, ids_field: str = "input_ids",
                   group_field: str | None = None, groups_from_files: bool = False,
                   groups: Sequence[str] | None = None, max_samples_per_group: int | None = None, seed: int = 0,
                   pad_id: int = OLMOE_PAD_ID, vocab_size: int | None = None, on_short: str = "drop",
                   return_info: bool = False):
    """Pre-tokenized JSONL (record[ids_field] = list of int token ids) -> EvalSplit [N, seq_len].

    Grouping as `load_jsonl_text`: exactly one of group_field / groups_from_files=True.
    """
    check_loader_args(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    grouped = _grouped_jsonl(as_path_list(paths), ids_field, group_field, groups_from_files, groups)
    out, available = [], {}
    for name, records in grouped:
        available[name] = len(records)
        samples = []
        for i in choose_samples(len(records), max_samples_per_group, seed, name):
            label, value = records[i]
            ids = as_token_ids(value, label)
            samples.append((label, ids, len(ids)))
        out.append((name, samples))
    return assemble_split(out, seq_len, pad_id, vocab_size, on_short, available, return_info)

