"""Each checkpoint's summary numbers, the scalars a dashboard plots against the checkpoint's step: per split
the mean loss, accuracy, routing entropy and pathway length, and per group its loss and accuracy.

Routing entropy and pathway length are the metric registry's (`registry.get(...).compute`, over every
sample of the split, with the analysis' tau and positions), so they equal the report's controls on the
same samples.
"""
from __future__ import annotations

import numpy as np

from moe_grok.analysis import registry
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.analysis.set_metrics import SetMetrics
from moe_grok.data.splits import EvalSplit

REGISTRY_SCALARS = ("routing_entropy", "pathway_length")


def checkpoint_scalars(stats: list[CheckpointStats], splits: dict[str, EvalSplit], options: AnalysisOptions,
                       positions: str | None = None) -> list[tuple[int, dict[str, float]]]:
    """[(step, {tag: value})] per checkpoint of `stats` (sorted by step), tags named as the toy trainer's
    metrics.jsonl evaluation keys under "eval/": `eval/<split>_loss` (nats, mean over samples),
    `eval/<split>_accuracy` (mean of the per-sample fraction of scored positions predicted exactly),
    `eval/<split>_routing_entropy` (nats), `eval/<split>_pathway_length` (experts per layer at
    options.tau), and `eval/<split>_loss/<group>`, `eval/<split>_accuracy/<group>` per group of the split.
    positions: "all" or "scored" routing (default options.positions[0])."""
    engine = SetMetrics(stats, options, positions or options.positions[0])
    result = []
    for index, checkpoint in enumerate(stats):
        scalars = {}
        for name, split in splits.items():
            loss, correct = checkpoint.splits[name]["loss"], checkpoint.splits[name]["correct"]
            scalars[f"eval/{name}_loss"] = float(np.mean(loss))
            scalars[f"eval/{name}_accuracy"] = float(np.mean(correct))
            every_row = np.arange(len(split))
            for metric in REGISTRY_SCALARS:
                scalars[f"eval/{name}_{metric}"] = registry.get(metric).compute(engine, name, every_row, index)
            for g, group in enumerate(split.group_names):
                in_group = split.groups == g
                if in_group.any():
                    scalars[f"eval/{name}_loss/{group}"] = float(np.mean(loss[in_group]))
                    scalars[f"eval/{name}_accuracy/{group}"] = float(np.mean(correct[in_group]))
        result.append((checkpoint.step, scalars))
    return result
