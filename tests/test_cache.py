"""The per-checkpoint statistics cache: entries keyed by checkpoint identity, settings, data and
format; stale entries recomputed with a warning, corrupt ones moved aside and recomputed."""
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from moe_grok.checkpoints import cache as cache_lib
from moe_grok.checkpoints import sources as sources_lib
from moe_grok.config import toy
from moe_grok.data.splits import EvalSplit, next_token_targets
from moe_grok.model import checkpoint_io, hf
from moe_grok.model import params as params_lib

from hf_reference import save_hf_model

STEP = 400
ENTRY = f"step_{STEP:010d}.npz"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two tiny HF checkpoints with different weights, a 4-sample split, and a valid entry for /a."""
    root = tmp_path_factory.mktemp("cache")
    save_hf_model(root / "a", seed=0)
    save_hf_model(root / "b", seed=1)
    tokens = np.random.default_rng(0).integers(0, 96, (4, 6)).astype(np.int32)
    mask = np.ones_like(tokens)
    split = EvalSplit(tokens, mask, *next_token_targets(tokens, mask), np.array([0, 0, 1, 1]), ("x", "y"))
    reference = _collect(root, "a", str(root / "reference"), split)
    return root, split, reference


def _collect(root, name, cache_dir, split, dtype="float32", moe_impl="dense"):
    """Stats of checkpoint root/name as step 400 ("dense": the expert dispatch that compiles fastest)."""
    sources = sources_lib.checkpoint_sources([f"{root / name}={STEP}"], dtype=dtype, moe_impl=moe_impl)
    return cache_lib.collect_checkpoint_stats(sources, {"train": split}, cache_dir, batch_size=4, progress=False)[0]


def _assert_same(a, b):
    for field in cache_lib.STAT_FIELDS:
        np.testing.assert_array_equal(a.splits["train"][field], b.splits["train"][field], err_msg=field)
    np.testing.assert_array_equal(a.router, b.router)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_dtype_change_recomputes(workspace, tmp_path, caplog):
    """olmoe_grokking.py with dtype float32, then bfloat16, on one out_dir: the second is a bfloat16 result."""
    root, split, float32 = workspace
    cache = str(tmp_path / "cache")
    shutil.copytree(root / "reference", cache)
    bfloat16 = _collect(root, "a", cache, split, dtype="bfloat16")
    fresh = _collect(root, "a", str(tmp_path / "fresh"), split, dtype="bfloat16")
    _assert_same(bfloat16, fresh)
    assert not np.allclose(bfloat16.splits["train"]["loss"], float32.splits["train"]["loss"], rtol=0, atol=1e-6)
    (message,) = [m for m in _warnings(caplog) if ENTRY in m]
    assert os.path.join(cache, ENTRY) in message and "checkpoint.model_config.dtype: 'float32' -> 'bfloat16'" in message


def test_swapped_checkpoint_path_recomputes(workspace, tmp_path, caplog):
    """--config.checkpoints=/a=400, then /b=400: /b's stats, not /a's under /b's name."""
    root, split, from_a = workspace
    cache = str(tmp_path / "cache")
    shutil.copytree(root / "reference", cache)
    from_b = _collect(root, "b", cache, split)
    _assert_same(from_b, _collect(root, "b", str(tmp_path / "fresh"), split))
    assert from_b.name == f"{root / 'b'}={STEP}"
    assert not np.allclose(from_b.splits["train"]["loss"], from_a.splits["train"]["loss"])
    (message,) = [m for m in _warnings(caplog) if ENTRY in m]
    assert "checkpoint.path" in message and str(root / "b") in message


def test_rewritten_checkpoint_recomputes(workspace, tmp_path, caplog):
    """New weights at the same path (same sizes, newer mtime) are new statistics."""
    root, split, _ = workspace
    shutil.copytree(root / "a", tmp_path / "a")
    cache = str(tmp_path / "cache")
    _collect(tmp_path, "a", cache, split)
    save_hf_model(tmp_path / "a", seed=1)  # b's weights
    rewritten = _collect(tmp_path, "a", cache, split)
    b = _collect(root, "b", str(tmp_path / "fresh"), split)
    for field in cache_lib.STAT_FIELDS:
        np.testing.assert_allclose(rewritten.splits["train"][field], b.splits["train"][field], atol=1e-6)
    assert any("checkpoint.files.model.safetensors" in m for m in _warnings(caplog))


def test_unchanged_checkpoint_is_reused(workspace, tmp_path, monkeypatch, caplog):
    root, split, reference = workspace
    cache = str(tmp_path / "cache")
    shutil.copytree(root / "reference", cache)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached checkpoint was loaded again")

    monkeypatch.setattr(hf, "load_hf", refuse)
    _assert_same(_collect(root, "a", cache, split), reference)
    assert not _warnings(caplog)


def test_identity_names_every_setting(workspace, tmp_path):
    """dtype, moe_impl and revision are part of an HF checkpoint's identity; a moe_grok
    checkpoint's identity follows its files, and a hub one not yet downloaded has no commit."""
    root, split, _ = workspace
    base = sources_lib.checkpoint_identity(str(root / "a"), None, "float32", "dense")
    assert base == sources_lib.checkpoint_identity(str(root / "a") + "/", None, "float32", "dense")
    changed = {"moe_impl": sources_lib.checkpoint_identity(str(root / "a"), None, "float32", "ragged"),
               "dtype": sources_lib.checkpoint_identity(str(root / "a"), None, "bfloat16", "dense")}
    for field, identity in changed.items():
        (difference,) = cache_lib.key_differences(base, identity)
        assert difference.startswith(f"model_config.{field}:")

    model_config = toy(vocab_size=8, num_layers=1, hidden_size=8, head_dim=4, num_heads=2, num_kv_heads=2,
                       num_experts=2, num_experts_per_tok=1, expert_intermediate_size=8)
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), params_lib.param_shapes(model_config))
    directory = str(tmp_path / "converted")
    checkpoint_io.save_params(directory, model_config, params)
    saved = sources_lib.checkpoint_identity(directory, None, "float32")
    assert saved["kind"] == "moe_grok" and saved["files"] == sources_lib.checkpoint_identity(directory, None)["files"]
    some_file = next(os.path.join(d, f) for d, _, files in os.walk(os.path.join(directory, "params")) for f in files)
    os.utime(some_file, ns=(0, os.stat(some_file).st_mtime_ns + 1))  # rewritten in place
    assert any(d.startswith("files.") for d in cache_lib.key_differences(
        saved, sources_lib.checkpoint_identity(directory, None, "float32")))

    hub = sources_lib.checkpoint_identity("no-such-org/no-such-model", "step5", "float32")
    assert hub == {"kind": "hub", "repo": "no-such-org/no-such-model", "revision": "step5", "commit": None,
                   "model_config": None}


def test_converted_checkpoint_gives_the_hf_directorys_stats(workspace, tmp_path):
    """experiments/convert_checkpoint.py's output, as a checkpoint spec, is the same source as its HF directory."""
    root, split, reference = workspace
    launcher = os.path.join(os.path.dirname(__file__), "..", "experiments", "convert_checkpoint.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, launcher, f"--hf_path={root / 'a'}", f"--out={tmp_path / 'converted'}",
                             "--dtype=float32"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    converted = _collect(tmp_path, "converted", str(tmp_path / "cache"), split)
    assert converted.step == reference.step
    _assert_same(converted, reference)


def test_older_format_entry_is_stale_not_fatal(workspace, tmp_path, caplog):
    """An entry written before entries had keys (step + data fingerprint only) is recomputed."""
    root, split, reference = workspace
    cache = tmp_path / "cache"
    cache.mkdir()
    arrays = {f"train/{f}": np.zeros_like(v) for f, v in reference.splits["train"].items()}
    np.savez(cache / ENTRY, router=np.zeros_like(reference.router), name="old",
             fingerprints=json.dumps({"train": split.fingerprint()}), architecture=json.dumps({}), **arrays)
    _assert_same(_collect(root, "a", str(cache), split), reference)
    assert any("older format" in m and ENTRY in m for m in _warnings(caplog))
    with np.load(cache / ENTRY) as data:
        assert json.loads(str(data["key"]))["format"] == cache_lib.CACHE_FORMAT


def _rewrite(path, drop=(), **changes):
    """Rewrite the entry with some arrays replaced (a valid zip, a valid key) or dropped."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files if name not in drop}
    arrays.update(changes)
    np.savez(path, **arrays)


def _flip_byte_in_router(path):
    """Corrupt one byte of the stored router array's data: the zip member's CRC no longer matches."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("router.npy")
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(f.read(4), np.uint16)
        f.seek(info.header_offset + 30 + int(name_length) + int(extra_length) + info.file_size - 4)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _overwrite_with_garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY garbage")


def _cast(path, name, dtype=None, rows=None):
    value = np.load(path)[name]
    _rewrite(path, **{name: value[:rows] if dtype is None else value.astype(dtype)})


CORRUPTIONS = {
    "truncated": _truncate,
    "bad_crc": _flip_byte_in_router,
    "router_float16": lambda path: _cast(path, "router", np.float16),
    "loss_int": lambda path: _cast(path, "train/loss", np.int64),
    "weights_wrong_shape": lambda path: _cast(path, "train/mean_weights", rows=2),
    "missing_array": lambda path: _rewrite(path, drop=("train/correct",)),
    "not_a_zip": _overwrite_with_garbage,
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_entry_is_moved_aside_and_recomputed(workspace, tmp_path, caplog, corruption):
    root, split, reference = workspace
    cache = str(tmp_path / "cache")
    shutil.copytree(root / "reference", cache)
    path = os.path.join(cache, ENTRY)
    CORRUPTIONS[corruption](path)
    _assert_same(_collect(root, "a", cache, split), reference)
    (aside,) = glob.glob(path + ".corrupt-*")
    assert os.path.exists(path)  # recomputed
    (message,) = [m for m in _warnings(caplog) if "corrupt" in m]
    assert path in message and aside in message


def test_cached_arrays_match_what_extraction_produces(workspace):
    """The dtypes/shapes a cache entry is validated against are those of a fresh extraction."""
    root, split, reference = workspace
    with np.load(root / "reference" / ENTRY) as data:
        architecture = json.loads(str(data["architecture"]))
    expected = cache_lib.expected_arrays(architecture, {"train": len(split)})
    fresh = {"router": reference.router, **{f"train/{f}": v for f, v in reference.splits["train"].items()}}
    assert {name: (v.shape, v.dtype.name) for name, v in fresh.items()} == expected


def test_source_without_identity_is_matched_by_name(workspace, tmp_path, caplog):
    root, split, reference = workspace
    loaded = []

    def load():
        loaded.append(1)
        return sources_lib.load_checkpoint(str(root / "a"), None, "float32", moe_impl="dense")

    cache = str(tmp_path / "cache")
    for name in ("mine", "mine", "renamed"):
        source = sources_lib.CheckpointSource(STEP, name, load)
        cache_lib.collect_checkpoint_stats([source], {"train": split}, cache, batch_size=4, progress=False)
    assert len(loaded) == 2  # the second call reused the first; a new name recomputes
    assert any("state no identity" in m for m in _warnings(caplog))
    assert any("checkpoint.name: 'mine' -> 'renamed'" in m for m in _warnings(caplog))


def test_other_data_recomputes(workspace, tmp_path, caplog):
    root, split, _ = workspace
    cache = str(tmp_path / "cache")
    shutil.copytree(root / "reference", cache)
    fewer = split.subset(np.arange(3))
    assert len(_collect(root, "a", cache, fewer).splits["train"]["loss"]) == 3
    (message,) = [m for m in _warnings(caplog) if ENTRY in m]
    assert f"data.train: '{split.fingerprint()}' -> '{fewer.fingerprint()}'" in message


def test_bad_checkpoint_specs_are_named(workspace, tmp_path):
    root, split, _ = workspace
    shutil.copytree(root / "a", tmp_path / "no_config")
    os.remove(tmp_path / "no_config" / "config.json")
    cases = {f"{root / 'a'}@main=1": "is a local directory; revision='main'",
             f"{tmp_path / 'no_config'}=1": "no config.json in .*no_config"}
    for spec, message in cases.items():
        with pytest.raises(hf.CheckpointError, match=message):
            cache_lib.collect_checkpoint_stats(sources_lib.checkpoint_sources([spec]), {"train": split},
                                              str(tmp_path / "cache"), progress=False)
    with pytest.raises(ValueError, match=r"duplicate checkpoint steps: \[1, 1\]"):
        cache_lib.collect_checkpoint_stats(sources_lib.checkpoint_sources([f"{root / 'a'}=1", f"{root / 'b'}=1"]),
                                          {"train": split}, str(tmp_path / "cache"), progress=False)
