"""OLMo-style flat token files (np.memmap, uint16/uint32): instances as fixed chunks of the
token stream or from an explicit instance index."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from moe_grok import npy_files
from moe_grok.data.corpus.assemble import OLMOE_PAD_ID, assemble_split, check_loader_args
from moe_grok.data.corpus.domains import PathLike, as_path_list, check_distinct_files, choose_samples, file_group_name
from moe_grok.data.corpus.npy import load_npy_array

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
        arr = npy_files.load_npy(path, mmap_mode="r")
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
    if isinstance(value, (str, os.PathLike)):
        value = load_npy_array(os.fspath(value), what)
    arr = np.asarray(value)
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
    check_loader_args(seq_len, pad_id, vocab_size, max_samples_per_group, on_short)
    length = seq_len if instance_length is None else instance_length
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"instance_length must be a positive integer, got {instance_length!r}")
    files, file_groups = _files_and_groups(data_paths, instances)
    stream = _TokenStream.open(files, dtype, length)
    if instances is None:
        candidates = stream.chunk_candidates(file_groups)
    elif isinstance(instances, Mapping):
        if not instances:
            raise ValueError("instances is an empty mapping: no groups to load")
        candidates = {str(g): stream.locate(_read_index(v, f"instances[{g!r}]"), f"instances[{g!r}]")
                      for g, v in instances.items()}
    else:
        candidates = {g: [] for g in file_groups}
        for instance in stream.locate(_read_index(instances, "instances"), "instances"):
            candidates[files[instance[0]][1]].append(instance)

    out, available = [], {}
    for name, group_candidates in candidates.items():
        if instances is None:
            available[name], chosen = stream.choose_chunks(name, group_candidates, max_samples_per_group, seed)
        else:
            available[name], chosen = _choose_indexed(name, group_candidates, max_samples_per_group, seed)
        out.append((name, [(label, stream.read(f, a, min(b, a + seq_len)), b - a) for f, a, b, label in chosen]))
    return assemble_split(out, seq_len, pad_id, vocab_size, on_short, available, return_info)


# An instance located in the token files: (file index, start, end token offset inside that file, label).
Instance = tuple[int, int, int, str]


def _files_and_groups(data_paths, instances) -> tuple[list[tuple[str, str]], list[str]]:
    """[(file path, its group), ...] in OLMo's order, and the groups in order of first appearance."""
    if isinstance(data_paths, Mapping):
        if isinstance(instances, Mapping):
            raise ValueError("give groups either by data_paths (a mapping) or by instances (a mapping), not both")
        if not data_paths:
            raise ValueError("data_paths is empty: no files given")
        files = [(os.fspath(p), str(g)) for g, ps in data_paths.items() for p in as_path_list(ps, f"group {g!r}")]
        check_distinct_files([p for p, _ in files], "data_paths")
        return files, [str(g) for g in data_paths]
    files = [(p, file_group_name(p)) for p in as_path_list(data_paths, "data_paths")]
    return files, list(dict.fromkeys(g for _, g in files))


@dataclasses.dataclass(frozen=True)
class _TokenStream:
    """The token files, memory-mapped, seen as one stream cut into `length`-token chunks (OLMo's instances).

    token_start [files + 1] / chunk_start [files + 1]: the first token / chunk of each file in the stream."""

    files: list[tuple[str, str]]  # (path, group)
    arrays: list[np.ndarray]  # [n_tokens_f] per file
    length: int  # tokens per chunk
    n_tokens: np.ndarray  # [files] int64
    n_chunks: np.ndarray  # [files] int64 complete chunks (the remainder is dropped)
    token_start: np.ndarray
    chunk_start: np.ndarray

    @classmethod
    def open(cls, files: list[tuple[str, str]], dtype, length: int) -> _TokenStream:
        arrays = [open_token_file(p, dtype) for p, _ in files]
        n_tokens = np.asarray([len(a) for a in arrays], np.int64)
        n_chunks = n_tokens // length
        return cls(files, arrays, length, n_tokens, n_chunks, np.concatenate([[0], np.cumsum(n_tokens)]),
                   np.concatenate([[0], np.cumsum(n_chunks)]))

    def chunk_candidates(self, groups: list[str]) -> dict[str, list[int]]:
        """Group -> indices of its files (their chunks are enumerated only for the chosen: counts can be huge)."""
        candidates: dict[str, list[int]] = {g: [] for g in groups}
        for f, (path, g) in enumerate(self.files):
            if self.n_chunks[f] == 0:
                logging.warning("%s: %d tokens, fewer than one %d-token instance", path, self.n_tokens[f], self.length)
            candidates[g].append(f)
        return candidates

    def locate(self, index: np.ndarray, what: str) -> list[Instance]:
        """Index rows ([n] global chunk ids or [n, 2] stream offsets) -> instances with offsets inside a file."""
        located = []
        if index.ndim == 1:
            bad = np.flatnonzero((index < 0) | (index >= self.chunk_start[-1]))
            if bad.size:
                raise ValueError(f"{what}: instance id {index[bad[0]]} (entry {bad[0]}) outside "
                                 f"[0, {self.chunk_start[-1]}) = the number of {self.length}-token instances in the "
                                 "data files")
            f_of = np.searchsorted(self.chunk_start, index, side="right") - 1
            for i, f in zip(index, f_of, strict=False):
                j = int(i - self.chunk_start[f])
                located.append((int(f), j * self.length, (j + 1) * self.length, f"{self.files[f][0]}[instance {i}]"))
            return located
        for e, (a, b) in enumerate(index):
            f = int(np.searchsorted(self.token_start, a, side="right") - 1)
            if a < 0 or b <= a or a >= self.token_start[-1] or b > self.token_start[f + 1]:
                raise ValueError(f"{what}: entry {e} offsets [{a}, {b}) are not a non-empty range inside one "
                                 f"data file (file boundaries at {self.token_start.tolist()})")
            lo, hi = int(a - self.token_start[f]), int(b - self.token_start[f])
            located.append((f, lo, hi, f"{self.files[f][0]}[tokens {lo}:{hi}]"))
        return located

    def choose_chunks(self, group: str, group_files: list[int], k: int | None, seed: int
                      ) -> tuple[int, list[Instance]]:
        """(chunks available to the group, the k chosen as instances) from the chunks of its files."""
        counts = self.n_chunks[group_files]
        total = int(counts.sum())
        if total == 0:
            raise ValueError(f"group {group!r}: its file(s) {[self.files[f][0] for f in group_files]} hold no "
                             f"complete {self.length}-token instance")
        offsets = np.concatenate([[0], np.cumsum(counts)])
        chosen = []
        for c in choose_samples(total, k, seed, group):
            which = int(np.searchsorted(offsets, c, side="right") - 1)
            f, j = group_files[which], int(c - offsets[which])
            chosen.append((f, j * self.length, (j + 1) * self.length,
                           f"{self.files[f][0]}[instance {int(self.chunk_start[f]) + j}]"))
        return total, chosen

    def read(self, file: int, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of one file as int64 (only these are read from disk)."""
        return np.asarray(self.arrays[file][start:end]).astype(np.int64)


def _choose_indexed(group: str, items: list[Instance], k: int | None, seed: int) -> tuple[int, list[Instance]]:
    """(instances the index gives the group, the k chosen); an instance selected twice is an error."""
    if not items:
        raise ValueError(f"group {group!r}: the instance index selects no instance from its file(s)")
    seen: dict[tuple[int, int, int], str] = {}
    for f, a, b, label in items:
        if (f, a, b) in seen:
            raise ValueError(f"group {group!r}: instance {label} is selected twice")
        seen[(f, a, b)] = label
    return len(items), [items[c] for c in choose_samples(len(items), k, seed, group)]
