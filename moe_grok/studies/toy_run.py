"""A toy grokking run end to end: training (training.loop), handing its evaluations to the analysis cache, then
the same analysis pipeline as OLMoE."""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from moe_grok import pipeline, strict_json
from moe_grok.analysis.groups import load_embeddings
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.checkpoints.cache import store_checkpoint_stats
from moe_grok.checkpoints.sources import CheckpointSource, directory_identity
from moe_grok.config import MoEConfig
from moe_grok.data import tasks
from moe_grok.model import params as params_lib
from moe_grok.monitor.training_callback import monitor_callbacks
from moe_grok.training.callbacks import Callback, RunState
from moe_grok.training.checkpointing import RunCheckpoints
from moe_grok.training.run_config import task_spec

ANALYSIS_DIR = "analysis"  # below a run's workdir: analyze_run's cache/ and report/
ARTIFACTS_DIR = "artifacts"  # below a run's (or a protocol's) workdir: the compact artifacts and their manifest


def artifact_path(artifacts_dir: str, seed: int) -> str:
    """Where a seed's artifact (checkpoints.run_artifact) goes in an artifacts directory: seed_<seed>.npz."""
    return os.path.join(artifacts_dir, f"seed_{seed}.npz")


def _checkpoint_identity(checkpoints_dir: str, step: int, model_config: MoEConfig) -> dict:
    """The step's orbax directory (file sizes, mtimes) and the MoEConfig."""
    step_dir = ocp.step.find_step_path(checkpoints_dir, ocp.step.standard_name_format(), step=step)
    return directory_identity(str(step_dir), model_config)


def run_checkpoint_sources(workdir: str) -> list[CheckpointSource]:
    """One CheckpointSource per saved params checkpoint of a run."""
    model_config = MoEConfig.load(workdir)
    checkpoints = RunCheckpoints(workdir)
    abstract = params_lib.param_shapes(model_config)
    return [CheckpointSource(step, f"step {step}",
                             lambda step=step: (model_config, checkpoints.restore_params(step, abstract)),
                             lambda step=step: _checkpoint_identity(str(checkpoints.params.directory), step,
                                                                    model_config))
            for step in checkpoints.steps()]


@dataclasses.dataclass
class AnalysisCacheWriter:
    """A training callback that stores each evaluated checkpoint's extraction (`state.extracted`) as
    the entry analyze_run's cache would hold for it: the analysis then loads it instead of
    extracting that checkpoint again, and its report is the same. Only checkpoints written at this
    step are stored (a resume's redone steps keep their entries). Build it with
    `analysis_cache_callbacks`, which checks that the evaluation and the analysis batch alike."""

    every_steps: int | None  # the evaluation's cadence (config.train.eval_every)
    at_end: bool = True
    before_checkpoint: bool = False  # runs after the checkpoint is saved: it stores only checkpoints written now
    name: str = "analysis_cache_writer"
    _mesh_warned: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def on_step(self, state: RunState) -> None:
        if state.extracted is None or not state.checkpoint_written:
            return
        if state.mesh is not None:
            # A mesh changes the evaluation's float rounding: its outputs are not what the analysis computes.
            if not self._mesh_warned.is_set():
                self._mesh_warned.set()
                logging.warning("training on a mesh: evaluations are not stored in the analysis cache "
                                "(the analysis extracts itself)")
            return
        cache_dir = os.path.join(state.workdir, ANALYSIS_DIR, "cache")
        try:
            model_config = MoEConfig.load(state.workdir)
            checkpoints_dir = str(state.checkpoints.params.directory)
            params, step = state.params, state.step
            source = CheckpointSource(step, f"step {step}", lambda: (model_config, params),
                                      lambda: _checkpoint_identity(checkpoints_dir, step, model_config))
            store_checkpoint_stats(cache_dir, source, state.splits, state.extracted, model_config, params)
        except (OSError, ValueError) as e:  # the cache is optional: training goes on, the analysis extracts
            logging.warning("step %d of %s: the evaluation was not stored in %s (%s: %s); the analysis will "
                            "extract this checkpoint itself", state.step, state.workdir, cache_dir,
                            type(e).__name__, e)


def analysis_cache_callbacks(config: ml_collections.ConfigDict) -> list[Callback]:
    """[AnalysisCacheWriter] for loop.train / multiseed.train's `callbacks`, or [] when the evaluation
    and the analysis extract with different batch sizes (the batch size sets the float rounding, so
    the analysis must extract itself)."""
    if config.train.eval_batch_size != config.analysis.batch_size:
        logging.info("train.eval_batch_size %d != analysis.batch_size %d: the analysis extracts every checkpoint",
                     config.train.eval_batch_size, config.analysis.batch_size)
        return []
    return [AnalysisCacheWriter(config.train.eval_every)]


def training_callbacks(config: ml_collections.ConfigDict, make_writers=None) -> list[Callback]:
    """The toy run's own training callbacks: the analysis cache writer (`analysis_cache_callbacks`)
    and, when config.monitor.enabled, the pathway monitor at the evaluation cadence
    (monitor.training_callback; make_writers: its scalar writers per seed, see MonitorCallback)."""
    return [*analysis_cache_callbacks(config), *monitor_callbacks(config, make_writers)]


HELD_OUT_SPLITS = ("validation", "test")  # tasks.evaluation_splits' halves of the held-out pairs


def held_out_split(config: ml_collections.ConfigDict) -> str:
    """The split whose samples are the held-out control of every metric: config.analysis.held_out_split,
    "validation" (default: independent of the test split that defines the accuracy) or "test"."""
    name = config.analysis.get("held_out_split", "validation")
    if name not in HELD_OUT_SPLITS:
        raise ValueError(f"analysis.held_out_split must be one of {HELD_OUT_SPLITS}, got {name!r}")
    return name


PAIRING_EMBEDDINGS = ("", "operands")  # analysis.pairing_embedding: files (or by domain), or from the task


def pairing_embeddings(config: ml_collections.ConfigDict, splits: dict) -> dict[str, np.ndarray | None]:
    """{"train": [N_train, d] or None, "test": [N_test, d] or None}, the per-sample embeddings that pair
    Pretrain@t* with Test@t# groups: with analysis.pairing_embedding = "operands", tasks.operand_embeddings
    of each split's sequences; otherwise the .npy files analysis.train_embeddings / test_embeddings
    ("" = none: groups then share only their domain and pair in chronological order)."""
    kind = config.analysis.get("pairing_embedding", "")
    if kind not in PAIRING_EMBEDDINGS:
        raise ValueError(f"analysis.pairing_embedding must be one of {PAIRING_EMBEDDINGS}, got {kind!r}")
    paths = {split: config.analysis.get(f"{split}_embeddings", "") for split in ("train", "test")}
    if kind == "operands":
        if any(paths.values()):
            raise ValueError("analysis.pairing_embedding='operands' and embedding files both given: choose one")
        return {split: tasks.operand_embeddings(splits[split].tokens, config.task.p) for split in paths}
    # Loaded and checked before any checkpoint is: a wrong file fails in seconds, not after the extraction.
    return {split: load_embeddings(path, split, len(splits[split])) if path else None for split, path in paths.items()}


def analyze_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
                progress: bool = True, with_plots: bool = True, artifact: str | None = None) -> dict[str, Any]:
    """pipeline.run_pipeline over the run's checkpoints (cache in workdir/analysis/cache,
    report files in workdir/analysis/report), pairing groups by config.analysis.train_embeddings /
    test_embeddings when set. Returns the report. No TensorBoard files: training's workdir/tensorboard
    holds the same numbers at every evaluation. artifact: write the run's compact artifact (with the
    resolved config) to this path; pipeline.rederive gives the report back from it."""
    options = AnalysisOptions.from_config(config.analysis)
    splits = tasks.evaluation_splits(tasks.make_dataset(task_spec(config)))
    embeddings = pairing_embeddings(config, splits)
    return pipeline.run_pipeline(run_checkpoint_sources(workdir), splits,
                                 os.path.join(workdir, ANALYSIS_DIR), test_split="test", validation_split="validation",
                                 held_out_split=held_out_split(config),
                                 train_embeddings=embeddings["train"], test_embeddings=embeddings["test"],
                                 options=options, batch_size=config.analysis.batch_size, mesh=mesh, progress=progress,
                                 with_plots=with_plots, tensorboard=False, artifact_path=artifact,
                                 artifact_config=strict_json.to_strict(config.copy_and_resolve_references().to_dict())
                                 if artifact else None)
