"""Report plots (matplotlib's object API: no pyplot, the caller's backend is never switched)."""
from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure


def plot_report(report: dict[str, Any], path: str) -> None:
    """Four panels vs step, one line per group: accuracies, train loss, pathway distance, consistency."""
    steps = report["steps"]
    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2, sharex=True)
    panels = [("accuracy", ("train_accuracy", "test_accuracy")), ("train loss (nats)", ("train_loss", "train_loss_memorized")),
              ("pathway edit distance (memorized)", ("pathway_distance",)),
              ("pathway consistency (memorized)", ("pathway_consistency",))]
    colors = [f"C{i}" for i in range(10)]
    for ax, (title, curves) in zip(axes.flat, panels):
        for gi, (name, g) in enumerate(report["groups"].items()):
            color = colors[gi % len(colors)]
            for ci, curve in enumerate(curves):
                if curve in g["curves"]:
                    ax.plot(steps, g["curves"][curve], color=color, linestyle=("-", "--")[ci],
                            label=f"{name}: {curve}")
            for key, style in (("memorization_step_median", ":"), ("test_onset_step", "-.")):
                value = g.get(key)
                if value is not None and np.isfinite(value) and value >= 0:
                    ax.axvline(value, color=color, linestyle=style, alpha=0.5)
        if curves == ("pathway_distance",):
            for pair, values in report.get("cross_group_distance", {}).items():
                ax.plot(steps, values, color="gray", linestyle=":", label=f"control {pair}")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if "loss" in title:
            ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("training step (dotted: median memorization step, dash-dot: test onset)")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

