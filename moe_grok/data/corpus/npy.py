"""2-D .npy id matrices, one file per domain (row = sample; optional lengths file or in-file pad id)."""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from moe_grok import npy_files
from moe_grok.data.corpus.assemble import OLMOE_PAD_ID, assemble_split, check_loader_args
from moe_grok.data.corpus.domains import PathLike, choose_samples


def load_npy_array(path: str, what: str) -> np.ndarray:
    """A plain numeric .npy, memory-mapped; `what` names its role in the error messages."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return npy_files.load_npy(path, mmap_mode="r")
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
    check_loader_args(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
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
        data = load_npy_array(path, "token ids")
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
            lengths = np.asarray(load_npy_array(lpath, "lengths"))
            if lengths.shape != (n,) or lengths.dtype.kind not in "iu":
                raise ValueError(f"{lpath}: lengths must be a 1-D integer array of shape ({n},) matching {path}, "
                                 f"got {lengths.dtype} {lengths.shape}")
            bad = np.flatnonzero((lengths < 0) | (lengths > width))
            if bad.size:
                raise ValueError(f"{lpath}: row {bad[0]} length {lengths[bad[0]]} outside [0, {width}]")
        available[name] = n
        samples = []
        for r in choose_samples(n, max_samples_per_group, seed, name):
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
    return assemble_split(out, seq_len, pad_id, vocab_size, on_short, available, return_info)

