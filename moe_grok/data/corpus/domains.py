"""Data domains (= groups of an EvalSplit): a file's domain name, the file list, which samples of a domain are kept."""
from __future__ import annotations

import os
import zlib
from collections.abc import Sequence

import numpy as np

PathLike = str | os.PathLike


def choose_samples(n: int, k: int | None, seed: int, group: str) -> np.ndarray:
    """Sorted indices of the k (of n) candidates kept for `group`; all of them when k is None or >= n."""
    if k is None or k >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(group.encode("utf-8"))])
    return np.sort(rng.choice(n, size=k, replace=False))


def as_path_list(paths: PathLike | Sequence[PathLike], what: str = "paths") -> list[str]:
    """One path or several -> a non-empty list of path strings (ValueError naming `what` when empty)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError(f"{what}: no files given")
    check_distinct_files(paths, what)
    return paths


def check_distinct_files(paths: Sequence[str], what: str = "paths") -> None:
    """ValueError naming a file listed twice (the same file under two spellings too): its samples
    would be doubled and paired with their own copies (distance 0), the random controls moved."""
    seen: dict[str, str] = {}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            same = f" ({seen[key]!r} and {path!r})" if seen[key] != path else ""
            raise ValueError(f"{what}: file {path!r} is listed twice{same}; list each data file once")
        seen[key] = path


def file_group_name(path: PathLike) -> str:
    """Group name of a file: its base name without directory and data suffixes
    ("data/open-web-math.jsonl.gz" -> "open-web-math")."""
    name = os.path.basename(os.fspath(path))
    for suffix in (".gz", ".jsonl", ".json", ".npy", ".bin"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


