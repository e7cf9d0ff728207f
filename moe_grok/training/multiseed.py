"""All seeds of one config trained together, one complete run directory per seed.

Layout: ``workdir/run.json`` (the config's identity with the list of seeds), ``workdir/train.lock``,
and ``workdir/seed_<s>/`` holding exactly what a single-seed run of seed s holds (see
training.loop), so every per-run tool (analysis, resuming one seed alone) works on it. Seed s
here equals `loop.train` of seed s bitwise: both run the same compiled step (training.loop).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections

from moe_grok.training import loop, run_dir
from moe_grok.training.callbacks import Callback
from moe_grok.training.run_config import model_config_of, task_spec


def seed_workdir(workdir: str, seed: int) -> str:
    """The run directory of `seed` inside a multi-seed workdir."""
    return os.path.join(workdir, f"seed_{seed}")


def train(config: ml_collections.ConfigDict, workdir: str, seeds, mesh: jax.sharding.Mesh | None = None,
          stop_at: int | None = None, progress: bool = True,
          callbacks: Sequence[Callback] = ()) -> list[str]:
    """Train (or resume) `config` for every seed in `seeds` together; returns the seed workdirs.

    `config.train.seed` is ignored (each run gets its seed). A re-run must name the same seeds and
    identity (run.json); steps may grow. stop_at: stop after this many steps (tests: a kill).
    callbacks: see loop.train_runs.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct integers >= 0 (at least one), got {seeds}")
    run_dir.validate_train_config(config.train)
    model_config = model_config_of(config, task_spec(config))
    identity = run_dir.run_identity(config, model_config)
    identity["train"]["seed"] = seeds
    os.makedirs(workdir, exist_ok=True)
    with run_dir.workdir_lock(workdir):
        started = any(os.path.isdir(seed_workdir(workdir, s)) for s in seeds)
        run_dir.check_or_record_identity(workdir, identity, started)
        runs = [(seed, seed_workdir(workdir, seed)) for seed in seeds]
        loop.train_runs(config, runs, mesh, stop_at, progress, callbacks)
    return [path for _, path in runs]

