"""A training workdir's guards: the run's identity, a writer lock, and the train config's validation.

A run's identity is everything that changes its trajectory (task and split, model, optimizer,
every training hyperparameter, seed). It is recorded in ``run.json`` when the run starts; a
later invocation on the same workdir resumes only if its identity is the same, so a different
seed or split can never continue (or be reported as) another run. ``steps`` and the evaluation
and checkpoint cadence are not part of it: a run may be extended.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

from moe_grok import strict_json
from moe_grok.config import FIELDS_ADDED_LATER, MoEConfig
from moe_grok.locking import DirectoryLock
from moe_grok.training.optimizer import OPTIMIZER_DEFAULTS

IDENTITY_FILE = "run.json"
LOCK_FILE = "train.lock"
NOT_IDENTITY = ("steps", "eval_every", "checkpoint_every", "eval_batch_size")  # keys that leave the trajectory
# Identity fields added after runs were recorded without them: the value those runs trained with.
ADDED_IDENTITY_FIELDS = {**{f"model.{name}": value for name, value in FIELDS_ADDED_LATER.items()},
                         **{f"train.{name}": value for name, value in OPTIMIZER_DEFAULTS.items()}}


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_at_least(value, low: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low


def validate_train_config(train: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming every bad key of ``config.train`` (before any work starts)."""
    problems = [f"{key} must be a positive integer, got {train[key]!r}"
                for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_batch_size")
                if not _positive_int(train[key])]
    if not isinstance(train.warmup_steps, int) or train.warmup_steps < 0:
        problems.append(f"warmup_steps must be an integer >= 0, got {train.warmup_steps!r}")
    if not isinstance(train.seed, int) or train.seed < 0:
        problems.append(f"seed must be an integer >= 0, got {train.seed!r}")
    if not (_finite_at_least(train.learning_rate, 0.0) and train.learning_rate > 0):
        problems.append(f"learning_rate must be a finite number > 0, got {train.learning_rate!r}")
    if not (_finite_at_least(train.adam_eps, 0.0) and train.adam_eps > 0):
        problems.append(f"adam_eps must be a finite number > 0, got {train.adam_eps!r}")
    for key in ("weight_decay", "aux_loss_coef", "z_loss_coef", "grad_clip_norm"):
        if not _finite_at_least(train[key], 0.0):
            problems.append(f"{key} must be a finite number >= 0, got {train[key]!r}")
    for key in ("b1", "b2", "label_smoothing"):
        if not (_finite_at_least(train[key], 0.0) and train[key] < 1):
            problems.append(f"{key} must be in [0, 1), got {train[key]!r}")
    decay_steps = train.get("cosine_decay_steps", 0)
    if not (isinstance(decay_steps, int) and not isinstance(decay_steps, bool)
            and (decay_steps == 0 or decay_steps > train.warmup_steps)):
        problems.append(f"cosine_decay_steps must be 0 (constant) or an integer > warmup_steps, got {decay_steps!r}")
    if not isinstance(train.router_weight_decay, bool):
        problems.append(f"router_weight_decay must be a bool, got {train.router_weight_decay!r}")
    if problems:
        raise ValueError("invalid config.train: " + "; ".join(problems))


def run_identity(config: ml_collections.ConfigDict, model_config: MoEConfig) -> dict[str, Any]:
    """{"task": ..., "model": ..., "train": ...}: what makes two runs the same run (JSON-able)."""
    train = {k: v for k, v in config.train.to_dict().items() if k not in NOT_IDENTITY}
    return json.loads(json.dumps({"task": config.task.to_dict(), "model": json.loads(model_config.to_json()),
                                  "train": train}))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'key: recorded -> wanted' for every field that differs (missing fields shown as <absent>)."""
    old, new = flatten(recorded), flatten(wanted)
    return [f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key, "<absent>") != new.get(key, "<absent>")]


def check_or_record_identity(workdir: str, identity: dict[str, Any], started: bool) -> None:
    """Record ``identity`` in a new run's workdir, or check that it equals the recorded one.

    started: the workdir already holds training output (checkpoints or a train state); such a
    workdir without an identity record cannot be resumed safely. Raises ValueError naming the
    differing fields.
    """
    path = os.path.join(workdir, IDENTITY_FILE)
    if not os.path.exists(path):
        if started:
            raise ValueError(f"{workdir} holds training output but no {IDENTITY_FILE} (written by an older "
                             "moe_grok?): its run cannot be identified; use a new workdir")
        strict_json.dump(identity, path, indent=2, sort_keys=True)
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the run identity {path}: {e}") from e
    differences = identity_differences({**ADDED_IDENTITY_FIELDS, **flatten(recorded)}, identity)
    if differences:
        raise ValueError(f"{workdir} holds a different run ({path}); differing fields (recorded -> this config): "
                         + "; ".join(differences) + ". Use a new workdir, or the recorded config to resume it")


def workdir_lock(workdir: str) -> DirectoryLock:
    """The training writer lock, ``workdir/train.lock``: a second trainer of the workdir is refused."""
    return DirectoryLock(workdir, LOCK_FILE, activity="trained", directory_kind="workdir")
