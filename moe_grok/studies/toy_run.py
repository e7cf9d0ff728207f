"""A toy grokking run end to end: training (training.loop), then the same analysis pipeline as OLMoE."""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from moe_grok import pipeline
from moe_grok.analysis.analyze import AnalysisOptions
from moe_grok.analysis.sources import CheckpointSource
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
    return [CheckpointSource(step, f"step {step}",
                             lambda step=step: (model_config, checkpoints.restore_params(step, abstract)))
            for step in checkpoints.steps()]


def task_splits(data: tasks.AlgorithmicDataset) -> dict[str, EvalSplit]:
    """Train and test splits scored at the answer position, groups = operations."""
    splits = {}
    for split in ("train", "test"):
        inputs = np.asarray(getattr(data, f"{split}_inputs"))
        targets, target_mask = loop.answer_targets(inputs, getattr(data, f"{split}_targets"))
        splits[split] = EvalSplit(inputs, np.ones_like(inputs), targets, target_mask,
                                  np.asarray(getattr(data, f"{split}_groups")), data.group_names)
    return splits


def analyze_run(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
                progress: bool = True) -> dict[str, Any]:
    """pipeline.run_pipeline over the run's checkpoints (cache in workdir/analysis/cache,
    report files in workdir/analysis/report). Returns the report."""
    data = tasks.make_dataset(loop.task_spec(config))
    return pipeline.run_pipeline(run_checkpoint_sources(workdir), task_splits(data),
                                 os.path.join(workdir, "analysis"), test_split="test",
                                 options=AnalysisOptions.from_config(config.analysis),
                                 batch_size=config.analysis.batch_size, mesh=mesh, progress=progress)
