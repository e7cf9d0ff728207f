"""npy_files: no two threads parse a .npy header at once (CPython's AST race, gh-106905), and every
.npy / .npz read in the package goes through it."""
import ast
import concurrent.futures
import os
import re
import threading
import time

import numpy as np
import pytest

from moe_grok import npy_files

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "moe_grok")


@pytest.fixture
def overlap_counter(monkeypatch):
    """Patches ast.literal_eval (numpy parses headers with it) to record the most threads inside it at
    once, each staying 5 ms so that unserialized readers overlap."""
    real = ast.literal_eval
    state = {"inside": 0, "most": 0}
    guard = threading.Lock()

    def literal_eval(node_or_string):
        with guard:
            state["inside"] += 1
            state["most"] = max(state["most"], state["inside"])
        try:
            time.sleep(0.005)
            return real(node_or_string)
        finally:
            with guard:
                state["inside"] -= 1

    monkeypatch.setattr(ast, "literal_eval", literal_eval)
    return state


def _files(tmp_path):
    npz, npy = str(tmp_path / "arrays.npz"), str(tmp_path / "array.npy")
    np.savez(npz, **{f"a{i}": np.arange(10 * (i + 1), dtype=np.float32) for i in range(6)})
    np.save(npy, np.arange(12, dtype=np.int64).reshape(3, 4))
    return npz, npy


def _read_npz(opener, path):
    with opener(path) as data:
        return {name: data[name] for name in data.files}


def test_plain_numpy_reads_overlap_in_threads(tmp_path, overlap_counter):
    """The detector works: numpy's own reads from 8 threads parse headers concurrently."""
    npz, _ = _files(tmp_path)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: _read_npz(lambda p: np.load(p, allow_pickle=False), npz), range(8)))
    assert overlap_counter["most"] > 1


def test_npy_files_reads_never_overlap(tmp_path, overlap_counter):
    npz, npy = _files(tmp_path)

    def read(index):
        if index % 2:
            return _read_npz(npy_files.load_npz, npz)
        return {"npy": npy_files.load_npy(npy, mmap_mode="r" if index % 4 else None)}

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, range(16)))
    assert overlap_counter["most"] == 1
    np.testing.assert_array_equal(results[1]["a5"], np.arange(60, dtype=np.float32))
    np.testing.assert_array_equal(results[2]["npy"], np.arange(12).reshape(3, 4))
    with npy_files.load_npz(npz) as data:
        assert "a0" in data and "b" not in data


def test_no_direct_np_load_in_the_package():
    direct = []
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "npy_files.py":
                with open(path) as f:
                    direct += [f"{path}:{i + 1}" for i, line in enumerate(f) if re.search(r"\bnp\.load\(", line)]
    assert not direct, f"read through moe_grok.npy_files instead: {direct}"
