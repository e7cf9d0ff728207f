"""Checkpoint sources: where each checkpoint's (MoEConfig, params) come from, loaded lazily.

A spec names one checkpoint: a hub "repo@revision", a local HF directory, or a moe_grok
checkpoint directory (`model.checkpoint_io.save_params`, e.g. the convert launcher's output);
its training step comes from "step<N>" in the revision or directory name, or an explicit
"=<step>" suffix.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from moe_grok.config import MoEConfig
from moe_grok.model import checkpoint_io, hf


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """One checkpoint: its training step, a display name, and a loader -> (MoEConfig, params)."""

    step: int
    name: str
    load: Callable[[], tuple[MoEConfig, Any]]


def parse_checkpoint_spec(spec: str) -> tuple[str, str | None, int]:
    """"repo@revision" or a local path -> (path_or_repo, revision, step).

    The step comes from an explicit "=STEP" suffix, else from "step{S}" in the revision
    (OLMoE's "step245000-tokens1027B") or the directory name.
    """
    spec, _, explicit = spec.partition("=")
    path_or_repo, _, revision = spec.partition("@")
    if explicit:
        return path_or_repo, revision or None, int(explicit)
    found = re.search(r"step(\d+)", revision or os.path.basename(os.path.normpath(path_or_repo)))
    if found is None:
        raise ValueError(f"cannot tell the training step of checkpoint {spec!r}: name it 'step<N>...' "
                         f"or append '=<step>'")
    return path_or_repo, revision or None, int(found.group(1))


def load_checkpoint(path_or_repo: str, revision: str | None, dtype="bfloat16", mesh=None) -> tuple[MoEConfig, Any]:
    """(MoEConfig, params) of one checkpoint: a moe_grok checkpoint directory (orbax) or an HF one."""
    if revision is None and checkpoint_io.is_checkpoint_dir(path_or_repo):
        return checkpoint_io.restore_params(path_or_repo, mesh=mesh, dtype=dtype)
    return hf.load_hf(path_or_repo, revision, dtype, mesh)


def checkpoint_sources(specs: Sequence[str], dtype="bfloat16", mesh=None) -> list[CheckpointSource]:
    """CheckpointSources for specs such as "allenai/OLMoE-1B-7B-0924@step245000-tokens1027B",
    "/ckpts/step5000" (HF or moe_grok checkpoint directory) or "/ckpts/latest=1100000".
    Loading (and any hub download) happens lazily, one checkpoint at a time."""
    sources = []
    for spec in specs:
        path_or_repo, revision, step = parse_checkpoint_spec(spec)
        sources.append(CheckpointSource(
            step, spec, lambda p=path_or_repo, r=revision: load_checkpoint(p, r, dtype, mesh)))
    return sources
