"""`load_split`: any loader of this package from a `data` config (moe_grok/configs/olmoe_grokking.py's `data`)."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import logging

from moe_grok.data.corpus.domains import file_group_name
from moe_grok.data.corpus.jsonl import load_jsonl_ids, load_jsonl_text
from moe_grok.data.corpus.npy import load_npy_ids
from moe_grok.data.corpus.olmo_memmap import load_olmo_memmap

FORMATS = ("jsonl_text", "jsonl_ids", "npy", "olmo_memmap")


def _path_list(value: Any) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [p.strip() for p in os.fspath(value).split(",") if p.strip()]
    return [os.fspath(p) for p in value]


DATA_CONFIG_KEYS = (
    "format", "paths", "seq_len", "tokenizer", "text_field", "add_eos", "eos_token", "add_special_tokens",
    "ids_field", "group_field", "groups_from_files", "max_samples_per_group", "seed", "pad_id", "vocab_size",
    "on_short", "lengths", "file_pad_id", "memmap_dtype", "instance_length", "instances")
"""Every key `load_split` reads; moe_grok/configs/olmoe_grokking.py's `data` declares each with a comment."""


def load_split(config: Any, return_info: bool = False):
    """EvalSplit from a `data` config (ml_collections.ConfigDict or mapping) holding every key of
    DATA_CONFIG_KEYS (moe_grok/configs/olmoe_grokking.py documents each). "Unset" is spelled so the key
    keeps its type on the command line: "" for paths and names, 0 for vocab_size /
    max_samples_per_group / instance_length, -1 for file_pad_id.
    Logs samples per group, truncated and dropped counts.
    """
    missing = [key for key in DATA_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"data config lacks key(s) {missing}; start from moe_grok/configs/olmoe_grokking.py's `data`")

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
    logging.info("loaded %d samples of %d tokens: %s (truncated %d, dropped %d short, %d repeated)",
                 len(split.tokens), seq_len,
                 ", ".join(f"{g}={c}/{info.available[g]}" for g, c in zip(split.group_names, counts, strict=False)),
                 info.n_truncated, info.n_dropped_short, info.n_duplicates)
    return (split, info) if return_info else split

