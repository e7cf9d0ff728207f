"""The per-checkpoint statistics cache: every split's per-sample routing, loss and correctness.

`collect_checkpoint_stats` runs every split through every checkpoint once
(`extraction.routing.extract_splits`) and caches each checkpoint's results as an .npz written
aside and renamed (`atomic_files`; temporary files of killed writers are removed on the next
collection), so an interrupted run resumes without recomputing finished checkpoints. `store_checkpoint_stats`
writes an entry from outputs extracted elsewhere (training's evaluation).

A cache entry (cache_dir/step_<step>.npz) is used only when its key equals the current one:
the cache format, the stored fields, the data fingerprints and the checkpoint's identity
(`CheckpointSource.identity`: resolved path, revision, file sizes/mtimes, config hash, dtype
and every other MoEConfig setting). A stale entry (another key, or an older format) is
recomputed with a warning naming the file and the differing fields; a corrupt one (unreadable
zip, bad CRC, missing array, wrong dtype or shape) is renamed *.corrupt-<time> and recomputed.
"""
from __future__ import annotations

import datetime
import os
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from moe_grok import atomic_files, npy_files, strict_json
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.analysis.param_dynamics import parameter_sample
from moe_grok.checkpoints.sources import CheckpointSource
from moe_grok.config import MoEConfig
from moe_grok.data.splits import EvalSplit
from moe_grok.extraction.routing import extract_splits, make_extractor
from moe_grok.model.params import router_matrices
from moe_grok.writers.progress import track

# What each split stores per field: its axes (N samples, L layers, E experts); all float32, as extracted.
STAT_AXES = {"mean_weights": "NLE", "scored_mean_weights": "NLE", "routing_entropy": "NL",
             "scored_routing_entropy": "NL", "loss": "N", "correct": "N"}
STAT_FIELDS = tuple(STAT_AXES)
# Bump when what an entry holds, or how it is computed, changes: older entries then count as stale.
CACHE_FORMAT = 3
_DIFFS_SHOWN = 6  # differing key fields named in a stale-entry warning


class CorruptCacheEntry(ValueError):
    """A cache file that cannot be read back as what `collect_checkpoint_stats` wrote."""


def _cache_path(cache_dir: str, step: int) -> str:
    return os.path.join(cache_dir, f"step_{step:010d}.npz")


def entry_key(source: CheckpointSource, fingerprints: dict[str, str]) -> dict[str, Any]:
    """Everything a cache entry's content depends on (JSON-able); equal keys = same content."""
    identity = source.identity() if source.identity is not None else {"name": source.name}
    return {"format": CACHE_FORMAT, "fields": list(STAT_FIELDS), "data": fingerprints,
            "checkpoint": strict_json.loads(strict_json.dumps(identity))}  # JSON round trip: tuples -> lists, as stored


def key_differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """'field: stored -> current' for every leaf where two keys differ (dotted paths; at each level
    plain fields such as a path or dtype come before nested ones such as per-file stats)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        names = sorted(set(stored) | set(current), key=lambda n: (isinstance(stored.get(n), dict)
                                                                  or isinstance(current.get(n), dict), str(n)))
        return [diff for name in names for diff in key_differences(
            stored.get(name), current.get(name), f"{prefix}.{name}" if prefix else str(name))]
    if stored == current:
        return []
    short = [r if len(r) <= 60 else r[:57] + "..." for r in (repr(stored), repr(current))]
    return [f"{prefix}: {short[0]} -> {short[1]}"]


def expected_arrays(architecture: dict, split_sizes: dict[str, int]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{array name: (shape, dtype)} of the arrays an entry holds (param samples apart), for a model
    of this `MoEConfig.architecture()` and splits of these sizes."""
    # Routing arrays count the MoE layers only (MoEConfig.num_moe_layers, named where dense layers exist).
    layers = architecture.get("num_moe_layers", architecture["num_layers"])
    experts, hidden = architecture["num_experts"], architecture["hidden_size"]
    expected = {"router": ((layers, experts, hidden), "float32")}
    for split, n in split_sizes.items():
        sizes = {"N": n, "L": layers, "E": experts}
        expected.update({f"{split}/{field}": (tuple(sizes[a] for a in axes), "float32")
                         for field, axes in STAT_AXES.items()})
    return expected


def _check_array(path: str, name: str, value: np.ndarray, shape: tuple[int, ...] | None, dtype: str) -> np.ndarray:
    if value.dtype != np.dtype(dtype) or (shape is not None and value.shape != shape):
        raise CorruptCacheEntry(f"{path}: array {name!r} is {value.dtype}{list(value.shape)}, expected "
                                f"{dtype}{list(shape) if shape is not None else ''}")
    return value


def _read_entry(path: str, key: dict[str, Any], source: CheckpointSource, split_sizes: dict[str, int]
                ) -> tuple[CheckpointStats, dict] | None:
    """(stats, architecture) from the entry at `path` if its key equals `key`; None if stale.

    Raises CorruptCacheEntry (or the zip / numpy error) for an unreadable or malformed entry.
    """
    with npy_files.load_npz(path) as data:
        if "key" not in data.files:
            logging.warning("cache entry %s has an older format (no key); recomputing %s", path, source.name)
            return None
        differences = key_differences(strict_json.loads(str(data["key"])), key)
        if differences:
            more = f" (and {len(differences) - _DIFFS_SHOWN} more)" if len(differences) > _DIFFS_SHOWN else ""
            logging.warning("cache entry %s was made for another checkpoint, data or settings; recomputing %s. "
                            "Differences: %s%s", path, source.name, "; ".join(differences[:_DIFFS_SHOWN]), more)
            return None
        architecture = strict_json.loads(str(data["architecture"]))
        arrays = {name: _check_array(path, name, data[name], shape, dtype)
                  for name, (shape, dtype) in expected_arrays(architecture, split_sizes).items()}
        sample = {}
        for name in data.files:
            if name.startswith("params/"):
                is_size = name.endswith("#size")
                sample[name[len("params/"):]] = _check_array(path, name, data[name], () if is_size else None,
                                                             "int64" if is_size else "float32")
        if not sample:
            raise CorruptCacheEntry(f"{path}: no parameter samples")
        splits = {split: {f: arrays[f"{split}/{f}"] for f in STAT_FIELDS} for split in split_sizes}
        return CheckpointStats(source.step, source.name, splits, arrays["router"], sample), architecture


def _move_aside(path: str, err: Exception) -> None:
    """Keep a corrupt entry for inspection as <path>.corrupt-<time> (process 0 renames it)."""
    import jax

    aside = f"{path}.corrupt-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S.%f')}"
    if jax.process_index() == 0:
        os.replace(path, aside)
    logging.warning("cache entry %s is corrupt (%s: %s); moved it to %s and recomputing", path,
                    type(err).__name__, err, aside)


def _load_cached(path: str, key: dict[str, Any], source: CheckpointSource, split_sizes: dict[str, int]
                 ) -> tuple[CheckpointStats, dict] | None:
    """(stats, architecture) of a valid entry with this key, else None (stale or corrupt: see module doc)."""
    if not os.path.exists(path):
        return None
    try:
        return _read_entry(path, key, source, split_sizes)
    except (CorruptCacheEntry, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as err:
        # KeyError: a missing array; ValueError: bad JSON, a pickled object, a malformed .npy header.
        _move_aside(path, err)
        return None


def _save_cached(path: str, stats: CheckpointStats, key: dict[str, Any], architecture: dict) -> None:
    """Process 0 writes (multi-host runs need the cache directory on a shared filesystem)."""
    import jax

    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {f"{split}/{f}": v[f] for split, v in stats.splits.items() for f in STAT_FIELDS}
    arrays.update({f"params/{k}": v for k, v in stats.param_sample.items()})
    # Written aside (<entry>.<pid>-<thread>.tmp.npz: two writers never share one) and renamed: a killed run
    # never leaves a half-written entry; a full disk raises WriteError naming the entry and removes the
    # temporary file.
    with atomic_files.writing(path) as tmp:
        np.savez(tmp, router=stats.router, key=strict_json.dumps(key), architecture=strict_json.dumps(architecture),
                 name=stats.name, **arrays)


def _prepare_cache_dir(cache_dir: str) -> None:
    """Make cache_dir and remove the temporary entries of writers that no longer run (a kill between the
    write and the rename, or a disk that filled up before the temporary file could be removed); process 0
    only: the others never write to the run's directories."""
    import jax

    if jax.process_index() != 0:
        return
    os.makedirs(cache_dir, exist_ok=True)
    for path in atomic_files.remove_stale_temporaries(cache_dir, prefix="step_"):
        logging.warning("removed %s, a temporary cache entry left by a writer that no longer runs", path)


def _check_processes_agree(cached: bool, path: str) -> None:
    """RuntimeError on every process unless all of them found the entry at `path` usable, or none did:
    a process that extracts a checkpoint while another reads it from the cache would wait in the
    extraction's collectives for ever (one all-gather of a flag per checkpoint; nothing with one process)."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    found = np.asarray(multihost_utils.process_allgather(np.int32(cached))).reshape(-1)
    if found.min() != found.max():
        raise RuntimeError(f"cache entry {path} was read by process(es) {np.flatnonzero(found).tolist()} but not by "
                           f"{np.flatnonzero(found == 0).tolist()}: out_dir must be one directory that every process "
                           "reads (a shared filesystem), written by process 0 (docs/multihost.md)")


def _checkpoint_stats(source: CheckpointSource, extracted: dict[str, dict[str, np.ndarray]], params
                      ) -> CheckpointStats:
    per_split = {name: {f: np.asarray(out[f]) for f in STAT_FIELDS} for name, out in extracted.items()}
    return CheckpointStats(source.step, source.name, per_split, np.asarray(router_matrices(params), np.float32),
                           parameter_sample(params))


def store_checkpoint_stats(cache_dir: str, source: CheckpointSource, splits: dict[str, EvalSplit],
                           extracted: dict[str, dict[str, np.ndarray]], model_config: MoEConfig, params) -> None:
    """Write the cache entry `collect_checkpoint_stats` would write for `source`, from outputs
    extracted elsewhere (training's evaluation of the checkpoint it has just saved), so that
    checkpoint is not extracted again.

    extracted: `extract_splits`' outputs for exactly `splits` (same names, rows and order) through
    `source`'s params; ValueError if the names or sizes differ. The entry is then what the
    analysis would compute itself when it extracts with the same batch size (which sets the float
    rounding) and mesh.
    """
    sizes = {name: len(split) for name, split in splits.items()}
    got = {name: len(out["loss"]) for name, out in extracted.items()}
    if got != sizes:
        raise ValueError(f"extracted splits {got} are not the splits {sizes} (name: samples)")
    fingerprints = {name: split.fingerprint() for name, split in splits.items()}
    _save_cached(_cache_path(cache_dir, source.step), _checkpoint_stats(source, extracted, params),
                 entry_key(source, fingerprints), model_config.architecture())


def collect_checkpoint_stats(sources: Sequence[CheckpointSource], splits: dict[str, EvalSplit], cache_dir: str,
                             batch_size: int = 32, mesh=None, progress: bool = True) -> list[CheckpointStats]:
    """Run every split through every checkpoint (cached per checkpoint, see the module doc). Sorted by step.

    Raises ValueError if a checkpoint's architecture differs from the first one's; the
    checkpoints finished before it stay cached on disk.
    """
    if not sources:
        raise ValueError("no checkpoints given")
    steps = [s.step for s in sources]
    if len(set(steps)) != len(steps):
        raise ValueError(f"duplicate checkpoint steps: {sorted(steps)}")
    _prepare_cache_dir(cache_dir)
    fingerprints = {name: split.fingerprint() for name, split in splits.items()}
    split_sizes = {name: len(split) for name, split in splits.items()}
    unidentified = [s.name for s in sources if s.identity is None]
    if unidentified:
        logging.warning("checkpoint sources %s state no identity: their cache entries are matched by name only",
                        unidentified[:5])
    reference_arch, reference_name, extractor = None, None, None
    results = []
    for source in track(sorted(sources, key=lambda s: s.step), desc="checkpoints", unit="checkpoint",
                        enabled=progress):
        path = _cache_path(cache_dir, source.step)
        cached = _load_cached(path, entry_key(source, fingerprints), source, split_sizes)
        _check_processes_agree(cached is not None, path)
        if cached is None:
            model_config, params = source.load()
            arch = model_config.architecture()
        else:
            stats, arch = cached
        if reference_arch is None:
            reference_arch, reference_name = arch, source.name
        elif arch != reference_arch:
            diff = {k: (reference_arch.get(k), arch[k]) for k in arch if arch[k] != reference_arch.get(k)}
            raise ValueError(f"checkpoint {source.name} (step {source.step}) differs in architecture from "
                             f"{reference_name}: {diff}; finished checkpoints stay cached in {cache_dir}")
        if cached is not None:
            results.append(stats)
            continue
        extractor = extractor or make_extractor(model_config, mesh)  # cached: compiled once
        for split_name, split in splits.items():
            if split.tokens.shape[1] > model_config.max_seq_len:
                raise ValueError(f"split {split_name!r} has sequences of {split.tokens.shape[1]} tokens, longer than "
                                 f"the model's limit {model_config.max_seq_len}; truncate them (seq_len flag)")
        extracted = extract_splits(model_config, params,
                                   {name: split.arrays() for name, split in splits.items()},
                                   batch_size=batch_size, mesh=mesh, extractor=extractor,
                                   progress=f"step {source.step}" if progress else False)
        stats = _checkpoint_stats(source, extracted, params)
        # The identity is read again after loading: a hub checkpoint's commit and files are known only now.
        _save_cached(path, stats, entry_key(source, fingerprints), arch)
        results.append(stats)
        del params
    return results
