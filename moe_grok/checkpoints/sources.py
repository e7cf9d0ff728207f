"""Checkpoint sources: where each checkpoint's (MoEConfig, params) come from, loaded lazily.

A spec names one checkpoint: a hub "repo@revision", a local HF directory, or a moe_grok
checkpoint directory (`model.checkpoint_io.save_params`, e.g. the convert launcher's output);
its training step comes from "step<N>" in the revision or directory name, or an explicit
"=<step>" suffix.

Every source can also state its identity without loading weights: a JSON-able dict of what
makes its parameters what they are (resolved path, hub revision and commit, the checkpoint
files' sizes and mtimes, a hash of the small config file, and the MoEConfig it loads with,
dtype and moe_impl included). The statistics cache (`checkpoints.cache`) keys entries by it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

from moe_grok import sharding
from moe_grok.config import CONFIG_FILE, MoEConfig
from moe_grok.model import checkpoint_io, hf


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """One checkpoint: its training step, a display name, a loader -> (MoEConfig, params), and
    `identity` -> a JSON-able dict that changes whenever the loaded parameters or the numerics
    settings would (None: the cache can match its entry by name only)."""

    step: int
    name: str
    load: Callable[[], tuple[MoEConfig, Any]]
    identity: Callable[[], dict[str, Any]] | None = None


def parse_checkpoint_spec(spec: str) -> tuple[str, str | None, int]:
    """"repo@revision" or a local path -> (path_or_repo, revision, step).

    The step comes from an explicit "=STEP" suffix, else from "step{S}" in the revision
    (OLMoE's "step245000-tokens1027B") or the directory name.
    """
    full_spec = spec
    spec, has_step, explicit = spec.partition("=")
    path_or_repo, _, revision = spec.partition("@")
    if has_step:
        # int() alone would name neither the spec nor the rule ("invalid literal for int()"), and
        # would accept "-5", a step no training run has (its cache entry would be step_-000000005).
        if not re.fullmatch(r"\s*\d+\s*", explicit):
            raise ValueError(f"checkpoint spec {full_spec!r}: the step after '=' must be a non-negative integer, "
                             f"got {explicit!r}")
        if not path_or_repo:
            raise ValueError(f"checkpoint spec {full_spec!r} names no checkpoint before '='")
        return path_or_repo, revision or None, int(explicit)
    found = re.search(r"step(\d+)", revision or os.path.basename(os.path.normpath(path_or_repo)))
    if found is None:
        raise ValueError(f"cannot tell the training step of checkpoint {spec!r}: name it 'step<N>...' "
                         f"or append '=<step>'")
    return path_or_repo, revision or None, int(found.group(1))


def load_checkpoint(path_or_repo: str, revision: str | None, dtype="bfloat16", mesh=None,
                    moe_impl: str | None = None) -> tuple[MoEConfig, Any]:
    """(MoEConfig, params) of one checkpoint: a moe_grok checkpoint directory (orbax) or an HF one.

    moe_impl: the expert dispatch to run it with (None: the checkpoint's own, "auto" for HF).
    """
    if revision is None and checkpoint_io.is_checkpoint_dir(path_or_repo):
        sharding.check_expert_axis(mesh, MoEConfig.load(path_or_repo).num_experts, path_or_repo)
        model_config, params = checkpoint_io.restore_params(path_or_repo, mesh=mesh, dtype=dtype)
        return (model_config if moe_impl is None else model_config.replace(moe_impl=moe_impl)), params
    if mesh is not None:  # the experts must split over the mesh: checked on config.json, before any weight is read
        ckpt_dir = hf.resolve_checkpoint_dir(path_or_repo, revision)
        sharding.check_expert_axis(mesh, hf.hf_model_config(ckpt_dir).num_experts,
                                   path_or_repo + (f"@{revision}" if revision else ""))
    return hf.load_hf(path_or_repo, revision, dtype, mesh, **({} if moe_impl is None else {"moe_impl": moe_impl}))


# ----------------------------------------------------------------------------------------
# Identity: what the cache compares, read from file metadata and small config files only
# ----------------------------------------------------------------------------------------
def file_sha256(path: str) -> str:
    """Hex SHA-256 of a (small) file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def file_stats(directory: str, names: Sequence[str] | None = None) -> dict[str, list[int]]:
    """{path relative to directory: [size bytes, mtime ns]} of `names`, or of every file below
    `directory` (symlinks followed, as hub snapshots link to their blobs)."""
    if names is None:
        names = sorted(os.path.relpath(os.path.join(root, f), directory)
                       for root, _, files in os.walk(directory, followlinks=True) for f in files)
    stats = {}
    for name in names:
        st = os.stat(os.path.join(directory, name))
        stats[name] = [st.st_size, st.st_mtime_ns]
    return stats


def model_settings(model_config: MoEConfig) -> dict[str, Any]:
    """Every MoEConfig field (architecture and numerics: dtype, moe_impl, chunk sizes, eps...)."""
    return model_config.settings()


def directory_identity(directory: str, model_config: MoEConfig) -> dict[str, Any]:
    """Identity of a checkpoint stored as every file below `directory` (an orbax checkpoint step),
    loaded with `model_config`."""
    return {"kind": "directory", "path": os.path.realpath(directory), "files": file_stats(directory),
            "model_config": model_settings(model_config)}


def _hf_dir_identity(ckpt_dir: str, dtype, moe_impl: str | None) -> dict[str, Any]:
    """A local HF checkpoint: config.json (hash) and every top-level *.safetensors / *.json (stats)."""
    names = sorted(n for n in os.listdir(ckpt_dir)
                   if n.endswith((".safetensors", ".json")) and os.path.isfile(os.path.join(ckpt_dir, n)))
    model_config = hf.hf_model_config(ckpt_dir, dtype=_dtype_name(dtype),
                                      **({} if moe_impl is None else {"moe_impl": moe_impl}))
    return {"kind": "hf", "path": os.path.realpath(ckpt_dir), "files": file_stats(ckpt_dir, names),
            "config_sha256": file_sha256(os.path.join(ckpt_dir, "config.json")),
            "model_config": model_settings(model_config)}


def _local_hub_snapshot(repo: str, revision: str | None) -> str | None:
    """The hub snapshot directory of repo@revision if it is already in the local hub cache."""
    try:
        import huggingface_hub

        return huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=["*.json", "*.safetensors"],
                                                 local_files_only=True)
    except Exception:  # not cached (or huggingface_hub missing): the identity says so with commit None
        return None


def _dtype_name(dtype) -> str:
    """"bfloat16", jnp.float32, np.dtype(...) -> the dtype's name, as the loaders name it."""
    return jnp.dtype(dtype).name


def checkpoint_identity(path_or_repo: str, revision: str | None, dtype="bfloat16", moe_impl: str | None = None
                        ) -> dict[str, Any]:
    """Identity of what `load_checkpoint(path_or_repo, revision, dtype, moe_impl=moe_impl)` would load,
    without loading it.

    A hub checkpoint is named by its commit (content-addressed, so not by file paths or mtimes);
    one not yet in the local hub cache has commit None and no model_config (the identity read
    after its download, which the cache stores, has both).
    """
    if revision is None and checkpoint_io.is_checkpoint_dir(path_or_repo):
        model_config = MoEConfig.load(path_or_repo).replace(dtype=_dtype_name(dtype))
        if moe_impl is not None:
            model_config = model_config.replace(moe_impl=moe_impl)
        identity = directory_identity(os.path.join(path_or_repo, "params"), model_config)
        return {**identity, "kind": "moe_grok", "path": os.path.realpath(path_or_repo),
                "config_sha256": file_sha256(os.path.join(path_or_repo, CONFIG_FILE))}
    if os.path.isdir(path_or_repo):
        return {**_hf_dir_identity(path_or_repo, dtype, moe_impl), "revision": revision}
    snapshot = _local_hub_snapshot(path_or_repo, revision)
    identity = {"kind": "hub", "repo": path_or_repo, "revision": revision, "commit": None, "model_config": None}
    if snapshot is not None:
        local = _hf_dir_identity(snapshot, dtype, moe_impl)
        identity.update(commit=os.path.basename(os.path.normpath(snapshot)), model_config=local["model_config"])
    return identity


def checkpoint_sources(specs: Sequence[str], dtype="bfloat16", mesh=None, moe_impl: str | None = None
                       ) -> list[CheckpointSource]:
    """CheckpointSources for specs such as "allenai/OLMoE-1B-7B-0924@step245000-tokens1027B",
    "/ckpts/step5000" (HF or moe_grok checkpoint directory) or "/ckpts/latest=1100000".
    Loading (and any hub download) happens lazily, one checkpoint at a time; dtype and moe_impl
    as in `load_checkpoint`."""
    sources = []
    seen: dict[tuple[str, str | None], str] = {}
    for spec in specs:
        path_or_repo, revision, step = parse_checkpoint_spec(spec)
        # One checkpoint under two steps would add two identical points to every curve and correlation.
        where = (os.path.realpath(path_or_repo) if os.path.isdir(path_or_repo) else path_or_repo, revision)
        if where in seen:
            raise ValueError(f"checkpoint specs {seen[where]!r} and {spec!r} name the same checkpoint; each "
                             "checkpoint may appear once (under one step)")
        seen[where] = spec
        sources.append(CheckpointSource(
            step, spec, lambda p=path_or_repo, r=revision: load_checkpoint(p, r, dtype, mesh, moe_impl),
            lambda p=path_or_repo, r=revision: checkpoint_identity(p, r, dtype, moe_impl)))
    return sources
