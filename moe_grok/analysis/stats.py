"""Per-checkpoint statistics: every split's per-sample routing, loss and correctness, cached.

`collect_checkpoint_stats` runs every split through every checkpoint once
(`extraction.routing.extract_dataset`) and caches each checkpoint's results as an atomic .npz,
so an interrupted run resumes without recomputing finished checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from moe_grok.analysis.sources import CheckpointSource
from moe_grok.data.splits import EvalSplit
from moe_grok.extraction.routing import extract_dataset, make_extractor
from moe_grok.model.params import router_matrices

STAT_FIELDS = ("mean_weights", "loss", "correct")


@dataclasses.dataclass(frozen=True)
class CheckpointStats:
    """What one checkpoint gives: per split {mean_weights [N, L, E], loss [N], correct [N]},
    and the router matrices [L, E, D] (float32) for pathway consistency."""

    step: int
    name: str
    splits: dict[str, dict[str, np.ndarray]]
    router: np.ndarray


def _cache_path(cache_dir: str, step: int) -> str:
    return os.path.join(cache_dir, f"step_{step:010d}.npz")


def _load_cached(path: str, fingerprints: dict[str, str], source: CheckpointSource
                 ) -> tuple[CheckpointStats, dict] | None:
    """(stats, architecture) from a cache file made for the same data, else None."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        if json.loads(str(data["fingerprints"])) != fingerprints:
            return None  # cached for other data: recompute
        splits = {split: {f: data[f"{split}/{f}"] for f in STAT_FIELDS} for split in fingerprints}
        stats = CheckpointStats(source.step, source.name, splits, data["router"])
        return stats, json.loads(str(data["architecture"]))


def _save_cached(path: str, stats: CheckpointStats, fingerprints: dict[str, str], architecture: dict) -> None:
    """Process 0 writes (multi-host runs need the cache directory on a shared filesystem)."""
    import jax

    if jax.process_index() != 0:
        return
    arrays = {f"{split}/{f}": v[f] for split, v in stats.splits.items() for f in STAT_FIELDS}
    tmp = path + ".tmp.npz"
    np.savez(tmp, router=stats.router, fingerprints=json.dumps(fingerprints),
             architecture=json.dumps(architecture), name=stats.name, **arrays)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache file


def collect_checkpoint_stats(sources: Sequence[CheckpointSource], splits: dict[str, EvalSplit], cache_dir: str,
                             batch_size: int = 32, mesh=None, progress: bool = True) -> list[CheckpointStats]:
    """Run every split through every checkpoint (cached per checkpoint). Sorted by step.

    Raises ValueError if a checkpoint's architecture differs from the first one's; the
    checkpoints finished before it stay cached on disk.
    """
    if not sources:
        raise ValueError("no checkpoints given")
    steps = [s.step for s in sources]
    if len(set(steps)) != len(steps):
        raise ValueError(f"duplicate checkpoint steps: {sorted(steps)}")
    os.makedirs(cache_dir, exist_ok=True)
    fingerprints = {name: split.fingerprint() for name, split in splits.items()}
    reference_arch, reference_name, extractor = None, None, None
    results = []
    for source in tqdm(sorted(sources, key=lambda s: s.step), desc="checkpoints", disable=not progress):
        path = _cache_path(cache_dir, source.step)
        cached = _load_cached(path, fingerprints, source)
        if cached is None:
            config, params = source.load()
            arch = config.architecture()
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
        extractor = extractor or make_extractor(config, mesh)
        per_split = {}
        for split_name, split in splits.items():
            if split.tokens.shape[1] > config.max_seq_len:
                raise ValueError(f"split {split_name!r} has sequences of {split.tokens.shape[1]} tokens, longer than "
                                 f"the model's limit {config.max_seq_len}; truncate them (seq_len flag)")
            out = extract_dataset(config, params, split.tokens, split.mask, split.targets, split.target_mask,
                                  batch_size=batch_size, mesh=mesh, extractor=extractor,
                                  progress=f"step {source.step} {split_name}" if progress else False)
            per_split[split_name] = {f: out[f] for f in STAT_FIELDS}
        stats = CheckpointStats(source.step, source.name, per_split, np.asarray(router_matrices(params), np.float32))
        _save_cached(path, stats, fingerprints, arch)
        results.append(stats)
        del params
    return results

