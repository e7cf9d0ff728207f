"""A toy grokking run end to end: training (training.loop), then the same analysis pipeline as OLMoE."""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from moe_grok import pipeline
from moe_grok.analysis.analyze import AnalysisOptions
from moe_grok.analysis.groups import load_embeddings
from moe_grok.analysis.sources import CheckpointSource, directory_identity
from moe_grok.config import MoEConfig
from moe_grok.data import tasks
from moe_grok.data.splits import EvalSplit
from moe_grok.model import params as params_lib
from moe_grok.training import loop


def run_checkpoint_sources(workdir: str) -> list[CheckpointSource]:
    """One CheckpointSource per saved params checkpoint of a run."""
    model_config = MoEConfig.load(workdir)
    checkpoints = loop.RunCheckpoints(workdir)
    abstract = params_lib.param_shapes(model_config)

    def identity(step: int) -> dict:  # the step's orbax directory (file sizes, mtimes) and the MoEConfig
        step_dir = ocp.step.find_step_path(checkpoints.params.directory, ocp.step.standard_name_format(), step=step)
        return directory_identity(str(step_dir), model_config)

    return [CheckpointSource(step, f"step {step}",
                             lambda step=step: (model_config, checkpoints.restore_params(step, abstract)),
                             lambda step=step: identity(step))
            for step in checkpoints.steps()]


def task_splits(data: tasks.AlgorithmicDataset, validation_share: float = 0.5) -> dict[str, EvalSplit]:
    """Splits scored at the answer position, groups = operations: "train", and the held-out pairs
    cut in two by a seeded draw per operation: "validation" (scored by loss only: Table 1's
    validation loss) and "test" (accuracy, Test@ groups, the held-out control)."""
    def split_of(inputs, answers, groups):
        targets, target_mask = loop.answer_targets(inputs, answers)
        return EvalSplit(inputs, np.ones_like(inputs), targets, target_mask, groups, data.group_names)

    held_out = np.zeros(len(data.test_targets), bool)
    for group in range(len(data.group_names)):
        rows = np.flatnonzero(data.test_groups == group)
        rng = np.random.default_rng([data.spec.seed, group, 1])
        held_out[rng.choice(rows, int(round(validation_share * rows.size)), replace=False)] = True
    inputs, answers, groups = (np.asarray(a) for a in (data.test_inputs, data.test_targets, data.test_groups))
    return {"train": split_of(np.asarray(data.train_inputs), np.asarray(data.train_targets),
                              np.asarray(data.train_groups)),
            "test": split_of(inputs[~held_out], answers[~held_out], groups[~held_out]),
            "validation": split_of(inputs[held_out], answers[held_out], groups[held_out])}


def analyze_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
                progress: bool = True, with_plots: bool = True) -> dict[str, Any]:
    """pipeline.run_pipeline over the run's checkpoints (cache in workdir/analysis/cache,
    report files in workdir/analysis/report), pairing groups by config.analysis.train_embeddings /
    test_embeddings when set. Returns the report."""
    options = AnalysisOptions.from_config(config.analysis)
    splits = task_splits(tasks.make_dataset(loop.task_spec(config)))
    # Loaded and checked before any checkpoint is: a wrong file fails in seconds, not after the extraction.
    paths = {split: config.analysis.get(f"{split}_embeddings", "") for split in ("train", "test")}  # "" = by domain
    embeddings = {split: load_embeddings(path, split, len(splits[split])) if path else None
                  for split, path in paths.items()}
    return pipeline.run_pipeline(run_checkpoint_sources(workdir), splits,
                                 os.path.join(workdir, "analysis"), test_split="test", validation_split="validation",
                                 train_embeddings=embeddings["train"], test_embeddings=embeddings["test"],
                                 options=options, batch_size=config.analysis.batch_size, mesh=mesh, progress=progress,
                                 with_plots=with_plots)
