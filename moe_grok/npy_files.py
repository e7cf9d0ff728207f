"""Reading .npy / .npz files from several threads at once: every read in moe_grok goes through here.

numpy parses each array's header with `ast.literal_eval`, and CPython's AST constructor keeps its
recursion depth in per-interpreter state: two threads parsing at the same moment can raise
SystemError("AST constructor recursion depth mismatch") (cpython gh-106905; seen on CPython 3.11.7
when a protocol run's analysis threads read checkpoint-cache entries and artifacts together). Each
open and each array read here holds one process-wide lock, so no two threads parse a header at
once; the arrays' data is read under it too (reads are a small share of the analysis time).
"""
from __future__ import annotations

import threading

import numpy as np

_READ_LOCK = threading.Lock()


def load_npy(path: str, mmap_mode: str | None = None) -> np.ndarray:
    """np.load of a plain .npy (no pickles) under the lock; with mmap_mode only the header is read."""
    with _READ_LOCK:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


class NpzReader:
    """An open .npz (no pickles): `files` lists its arrays, `reader[name]` reads one under the lock.
    Use as a context manager, or call close()."""

    def __init__(self, path: str):
        with _READ_LOCK:
            self._npz = np.load(path, allow_pickle=False)

    @property
    def files(self) -> list[str]:
        return self._npz.files

    def __contains__(self, name: str) -> bool:
        return name in self._npz.files

    def __getitem__(self, name: str) -> np.ndarray:
        with _READ_LOCK:
            return self._npz[name]

    def close(self) -> None:
        self._npz.close()

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load_npz(path: str) -> NpzReader:
    """An NpzReader of `path` (raises what np.load raises for a missing or malformed file)."""
    return NpzReader(path)
