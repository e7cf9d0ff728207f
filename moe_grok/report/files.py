"""Report files: summary.json, per_checkpoint.csv, table.csv / table.txt (and the plots)."""
from __future__ import annotations

import csv
import json
import os
from typing import Any

from moe_grok.report.plots import plot_report


def format_table(report: dict[str, Any]) -> str:
    """Table-1-style text: per group, memorization/onset/delay and r of each metric with test accuracy."""
    header = (f"{'group':<14}{'memorized':>10}{'mem step':>10}{'onset':>8}{'delay':>8}"
              f"{'r(dist) P/S':>16}{'r(consist) P/S':>17}{'r(loss) P/S':>16}")
    lines = [header, "-" * len(header)]

    def pair(corr, metric):
        c = corr.get(metric)
        return "      n/a" if c is None else f"{c['pearson_r']:+.2f}/{c['spearman_r']:+.2f}"

    for name, g in report["groups"].items():
        corr = g.get("correlations", {})
        lines.append(f"{name:<14}{g['n_memorized']:>5}/{g['n_train']:<4}{g['memorization_step_median']:>10.0f}"
                     f"{g.get('test_onset_step', -1):>8}{g.get('grokking_delay', float('nan')):>8.0f}"
                     f"{pair(corr, 'pathway_distance'):>16}{pair(corr, 'pathway_consistency'):>17}"
                     f"{pair(corr, 'train_loss'):>16}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """summary.json, per_checkpoint.csv, table.csv/.txt and analysis.png in out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in
             ("summary.json", "per_checkpoint.csv", "table.csv", "table.txt", "analysis.png")}
    with open(paths["summary.json"], "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(paths["per_checkpoint.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        curve_names = sorted({c for g in report["groups"].values() for c in g["curves"]})
        writer.writerow(["step", "group", *curve_names])
        for name, g in report["groups"].items():
            for i, step in enumerate(report["steps"]):
                writer.writerow([step, name, *(g["curves"].get(c, [""] * len(report["steps"]))[i] for c in curve_names)])
    with open(paths["table.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        metric_names = ("pathway_distance", "pathway_consistency", "train_loss", "train_loss_memorized")
        writer.writerow(["group", "n_train", "n_memorized", "eps", "memorization_step_median", "test_onset_step",
                         "grokking_delay", "rise_start_step",
                         *(f"{m}_{s}" for m in metric_names for s in ("pearson_r", "spearman_r", "n"))])
        for name, g in report["groups"].items():
            corr = g.get("correlations", {})
            writer.writerow([name, g["n_train"], g["n_memorized"], g["eps"], g["memorization_step_median"],
                             g.get("test_onset_step", ""), g.get("grokking_delay", ""), g.get("rise_start_step", ""),
                             *(corr.get(m, {}).get(s, "") for m in metric_names for s in ("pearson_r", "spearman_r", "n"))])
    with open(paths["table.txt"], "w") as f:
        f.write(format_table(report) + "\n")
    plot_report(report, paths["analysis.png"])
    return paths

