"""Per-group analysis of checkpoint statistics: memorization, pathway metrics, onsets, correlations."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from moe_grok.analysis import grokking, metrics
from moe_grok.analysis.stats import CheckpointStats
from moe_grok.extraction import pathways

# ----------------------------------------------------------------------------------------
# Per-group analysis
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """Every choice of the analysis (docs/method.md); `from_config` reads them from a config's `analysis`."""

    tau: float = 0.7  # pathway cumulative-weight threshold
    delta: float = 0.05  # memorization: |loss(t) - loss(T)| <= delta nats from t* on
    target_fraction: tuple[float, float] = (0.20, 0.25)  # eps calibration target share
    eps: float | None = None  # fixed eps for every group instead of calibration
    distance_level: str = "char"  # "char" (paper) or "token"
    distance_normalized: bool = False  # divide edit distance by the longer pathway length
    max_pairs: int | None = 2000  # pairs sampled per group distance (None = all)
    seed: int = 0  # pair sampling and control-sample seed
    onset_threshold: float = 0.8  # group test-accuracy onset level

    @classmethod
    def from_config(cls, config) -> "AnalysisOptions":
        """From an ml_collections `analysis` section holding every field (extra keys such as
        batch_size are ignored); ValueError names missing fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"analysis config lacks {missing}; declare every AnalysisOptions field")
        values = {n: config[n] for n in names}
        values["target_fraction"] = tuple(values["target_fraction"])
        if values["max_pairs"] is not None and values["max_pairs"] <= 0:
            values["max_pairs"] = None
        return cls(**values)


def analysis_config(**overrides) -> ml_collections.ConfigDict:
    """An `analysis` config section declaring every AnalysisOptions field (its defaults, then
    `overrides`); unset eps is a float placeholder so `--config.analysis.eps=0.3` works."""
    fields = {f.name: f.default for f in dataclasses.fields(AnalysisOptions)}
    fields["eps"] = config_dict.placeholder(float)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def _pathways(weights: np.ndarray, options: AnalysisOptions) -> list:
    """[n, L, E] routing -> pathways in the form options.distance_level compares."""
    return (pathways.pathway_strings(weights, options.tau) if options.distance_level == "char"
            else pathways.pathway_tokens(weights, options.tau))


def _group_curves(stats: list[CheckpointStats], split: str, rows: np.ndarray, options: AnalysisOptions,
                  ) -> dict[str, np.ndarray]:
    """Pathway distance, consistency and complexity over checkpoints for samples `rows`."""
    distance, complexity = [], []
    for s in stats:
        weights = s.splits[split]["mean_weights"][rows]
        strings = _pathways(weights, options)
        distance.append(metrics.group_pathway_distance(strings, options.distance_level, options.distance_normalized,
                                                       options.max_pairs, options.seed, on_small="nan"))
        complexity.append(float(np.mean(np.asarray(metrics.pathway_complexity(weights, s.router)))))
    complexity = np.asarray(complexity)
    return {"pathway_distance": np.asarray(distance), "pathway_complexity": complexity,
            "pathway_consistency": 1.0 - complexity}


def analyze(stats: list[CheckpointStats], train_split: str, groups: np.ndarray, group_names: Sequence[str],
            test_accuracy: dict[str, np.ndarray] | None = None, options: AnalysisOptions = AnalysisOptions(),
            ) -> dict[str, Any]:
    """The per-group report. `groups` [N_train] labels the train split's samples.

    test_accuracy: group name -> [checkpoints] accuracy (from a test split or a user CSV);
    without it, onsets, delays and correlations are omitted.
    """
    steps = np.array([s.step for s in stats])
    loss = np.stack([s.splits[train_split]["loss"] for s in stats])  # [C, N]
    correct = np.stack([s.splits[train_split]["correct"] for s in stats])
    report: dict[str, Any] = {"steps": steps.tolist(), "options": dataclasses.asdict(options), "groups": {}}
    memorized_rows: dict[str, np.ndarray] = {}
    for g, name in enumerate(group_names):
        rows = np.flatnonzero(groups == g)
        if rows.size == 0:
            raise ValueError(f"group {name!r} has no training samples")
        group_loss = loss[:, rows]
        if options.eps is None:
            calibration = grokking.calibrate_eps(group_loss, options.target_fraction)
            eps, eps_note = calibration.eps, ("" if calibration.in_target_range else
                                              "eps could not hit the target memorized fraction exactly")
        else:
            eps, eps_note = options.eps, "fixed eps"
        mem_steps = grokking.memorization_steps(group_loss, steps, eps, options.delta)
        memorized = rows[mem_steps >= 0]
        entry: dict[str, Any] = {
            "n_train": int(rows.size), "eps": float(eps), "eps_note": eps_note,
            "n_memorized": int(memorized.size),
            "memorization_step_median": float(np.median(mem_steps[mem_steps >= 0])) if memorized.size else float("nan"),
            "curves": {"train_loss": group_loss.mean(1), "train_loss_memorized": loss[:, memorized].mean(1)
                       if memorized.size else np.full(len(steps), np.nan),
                       "train_accuracy": correct[:, rows].mean(1)},
        }
        if memorized.size >= 2:
            entry["curves"].update(_group_curves(stats, train_split, memorized, options))
        if test_accuracy is not None and name in test_accuracy:
            acc = np.asarray(test_accuracy[name], np.float64)
            entry["curves"]["test_accuracy"] = acc
            onset = grokking.accuracy_onset(acc, steps, options.onset_threshold)
            entry["test_onset_step"] = int(onset)
            entry["grokking_delay"] = grokking.grokking_delay(onset, entry["memorization_step_median"])
            start = grokking.sustained_rise_start(acc)
            entry["rise_start_step"] = int(steps[start]) if start >= 0 else -1
            entry["correlations"] = {
                metric: grokking.metric_correlations(entry["curves"][metric], acc, max(start, 0))
                for metric in ("pathway_distance", "pathway_consistency", "train_loss", "train_loss_memorized")
                if metric in entry["curves"]}
        entry["curves"] = {k: np.asarray(v, np.float64).tolist() for k, v in entry["curves"].items()}
        report["groups"][name] = entry
        memorized_rows[name] = memorized
    report["cross_group_distance"] = _cross_group_curves(stats, train_split, memorized_rows, options)
    return report


def _cross_group_curves(stats: list[CheckpointStats], split: str, rows_by_group: dict[str, np.ndarray],
                        options: AnalysisOptions) -> dict[str, list[float]]:
    """The paper's control: mean distance between memorized samples of two different groups,
    per checkpoint, for every pair of groups ("a|b" -> [checkpoints])."""
    names = [n for n, rows in rows_by_group.items() if rows.size]
    curves = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            curves[f"{a}|{b}"] = [metrics.cross_group_distance(
                _pathways(s.splits[split]["mean_weights"][rows_by_group[a]], options),
                _pathways(s.splits[split]["mean_weights"][rows_by_group[b]], options),
                options.distance_level, options.distance_normalized, options.max_pairs, options.seed)
                for s in stats]
    return curves

