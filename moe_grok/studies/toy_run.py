"""A toy grokking run end to end: training (training.loop), then the same analysis pipeline as OLMoE."""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from moe_grok import pipeline
from moe_grok.analysis.groups import load_embeddings
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.checkpoints.cache import store_checkpoint_stats
from moe_grok.checkpoints.sources import CheckpointSource, directory_identity
from moe_grok.config import MoEConfig
from moe_grok.data import tasks
from moe_grok.model import params as params_lib
from moe_grok.training import loop

ANALYSIS_DIR = "analysis"  # below a run's workdir: analyze_run's cache/ and report/


def _checkpoint_identity(checkpoints_dir: str, step: int, model_config: MoEConfig) -> dict:
    """The step's orbax directory (file sizes, mtimes) and the MoEConfig."""
    step_dir = ocp.step.find_step_path(checkpoints_dir, ocp.step.standard_name_format(), step=step)
    return directory_identity(str(step_dir), model_config)


def run_checkpoint_sources(workdir: str) -> list[CheckpointSource]:
    """One CheckpointSource per saved params checkpoint of a run."""
    model_config = MoEConfig.load(workdir)
    checkpoints = loop.RunCheckpoints(workdir)
    abstract = params_lib.param_shapes(model_config)
    return [CheckpointSource(step, f"step {step}",
                             lambda step=step: (model_config, checkpoints.restore_params(step, abstract)),
                             lambda step=step: _checkpoint_identity(str(checkpoints.params.directory), step,
                                                                    model_config))
            for step in checkpoints.steps()]


def analysis_cache_writer(config: ml_collections.ConfigDict) -> loop.EvaluationCallback | None:
    """A training callback (loop.train_runs' on_evaluated_checkpoint) that stores each evaluated
    checkpoint's extraction as the entry analyze_run's cache would hold for it: the analysis then
    loads it instead of extracting that checkpoint again, and its report is the same. None when
    the evaluation and the analysis extract with different batch sizes (the batch size sets the
    float rounding, so the analysis must extract itself)."""
    if config.train.eval_batch_size != config.analysis.batch_size:
        logging.info("train.eval_batch_size %d != analysis.batch_size %d: the analysis extracts every checkpoint",
                     config.train.eval_batch_size, config.analysis.batch_size)
        return None

    def write(workdir: str, step: int, params, splits, extracted) -> None:
        cache_dir = os.path.join(workdir, ANALYSIS_DIR, "cache")
        try:
            model_config = MoEConfig.load(workdir)
            checkpoints_dir = os.path.join(os.path.abspath(workdir), loop.CHECKPOINTS_DIR)
            source = CheckpointSource(step, f"step {step}", lambda: (model_config, params),
                                      lambda: _checkpoint_identity(checkpoints_dir, step, model_config))
            store_checkpoint_stats(cache_dir, source, splits, extracted, model_config, params)
        except (OSError, ValueError) as e:  # the cache is optional: training goes on, the analysis extracts
            logging.warning("step %d of %s: the evaluation was not stored in %s (%s: %s); the analysis will "
                            "extract this checkpoint itself", step, workdir, cache_dir, type(e).__name__, e)

    return write


def analyze_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
                progress: bool = True, with_plots: bool = True) -> dict[str, Any]:
    """pipeline.run_pipeline over the run's checkpoints (cache in workdir/analysis/cache,
    report files in workdir/analysis/report), pairing groups by config.analysis.train_embeddings /
    test_embeddings when set. Returns the report."""
    options = AnalysisOptions.from_config(config.analysis)
    splits = tasks.evaluation_splits(tasks.make_dataset(loop.task_spec(config)))
    # Loaded and checked before any checkpoint is: a wrong file fails in seconds, not after the extraction.
    paths = {split: config.analysis.get(f"{split}_embeddings", "") for split in ("train", "test")}  # "" = by domain
    embeddings = {split: load_embeddings(path, split, len(splits[split])) if path else None
                  for split, path in paths.items()}
    return pipeline.run_pipeline(run_checkpoint_sources(workdir), splits,
                                 os.path.join(workdir, ANALYSIS_DIR), test_split="test", validation_split="validation",
                                 train_embeddings=embeddings["train"], test_embeddings=embeddings["test"],
                                 options=options, batch_size=config.analysis.batch_size, mesh=mesh, progress=progress,
                                 with_plots=with_plots)
