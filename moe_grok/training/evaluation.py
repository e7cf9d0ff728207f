"""A run's periodic evaluation: accuracies, losses and routing of `tasks.evaluation_splits`."""
from __future__ import annotations

import numpy as np

from moe_grok.analysis import pathways
from moe_grok.config import MoEConfig
from moe_grok.data.splits import EvalSplit
from moe_grok.extraction.routing import extract_splits, make_extractor

DEFAULT_PATHWAY_TAU = 0.7  # pathway threshold of the logged pathway length (the analysis' default tau)
LOGGED_SPLITS = {"train": ("train",), "test": ("test", "validation")}  # logged split: its evaluation splits
"""metrics.jsonl's "test" metrics are over all held-out pairs: both halves tasks.evaluation_splits cuts."""


def evaluation_extractor(model_config: MoEConfig):
    """make_extractor(model_config): the same function, compiled once per process and model, for every run and seed."""
    return make_extractor(model_config)


def mean_pathway_length(mean_weights: np.ndarray, tau: float) -> float:
    """Mean over samples and layers of the experts on the pathway at threshold `tau`.
    mean_weights: [N, L, E] routing weights."""
    return float(np.mean(pathways.pathway_lengths(mean_weights, tau)))


def evaluate(model_config: MoEConfig, params, splits: dict[str, EvalSplit], extractor, batch_size: int,
             pathway_tau: float = DEFAULT_PATHWAY_TAU) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """Run tasks.evaluation_splits' `splits` through `params` together (extract_splits, `batch_size`
    rows per batch) -> (metrics, extracted).

    metrics, per LOGGED_SPLITS split: loss (nats) and accuracy at the answer position (overall and per
    group), routing entropy (nats, token mean, averaged over layers and samples) and pathway length
    (experts per layer at tau = `pathway_tau`), as a flat dict of floats. extracted: extract_splits'
    per-sample outputs per evaluation split (what the analysis caches per checkpoint).
    """
    extracted = extract_splits(model_config, params,
                               {name: split.arrays() for name, split in splits.items()},
                               batch_size=batch_size, extractor=extractor, progress=False)
    group_names = splits["train"].group_names
    result = {}
    for logged, parts in LOGGED_SPLITS.items():
        groups = np.concatenate([splits[part].groups for part in parts])
        stats = {field: np.concatenate([extracted[part][field] for part in parts])
                 for field in ("loss", "correct", "routing_entropy", "mean_weights")}
        result[f"{logged}_loss"] = float(stats["loss"].mean())
        result[f"{logged}_accuracy"] = float(stats["correct"].mean())
        for g, name in enumerate(group_names):
            in_group = groups == g
            result[f"{logged}_accuracy/{name}"] = float(stats["correct"][in_group].mean())
            result[f"{logged}_loss/{name}"] = float(stats["loss"][in_group].mean())
        result[f"{logged}_routing_entropy"] = float(stats["routing_entropy"].mean())
        result[f"{logged}_pathway_length"] = mean_pathway_length(stats["mean_weights"], pathway_tau)
    return result, extracted
