"""Report plots (matplotlib's object API: no pyplot, the caller's backend is never switched).

  analysis.png  per domain: accuracies and losses; distance, consistency, pathway length and
                routing entropy of the memorized samples beside their controls
  distances.png per domain: every distance variant (character, length-normalized, token level) of the
                memorized samples beside their held-out and random-training controls
  groups.png    per domain: every Pretrain@t* group's distance and consistency from t* on with its
                linear trend (the paper's Fig. 4) beside the group's held-out (dashed) and
                random-training (dotted) controls, and the pooled global panel with its quadratic fit
  pairs.png     per domain: each Pretrain@p group's training loss beside its paired Test@q group's
                accuracy (Fig. 2)
  per_layer.png per domain: pathway distance per layer over checkpoints (Fig. 5)
  sweeps.png    per domain: distance for every tau (E.1); share memorized and correlations per (eps, delta) (E.3)
  dynamics.png  relative weight change per 1k steps and stability per parameter family (Appendix D)
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from matplotlib.figure import Figure

SET_STYLES = {"memorized": ("C0", "-"), "held_out": ("C1", "--"), "random_train": ("C2", ":")}
CONTROL_LINESTYLES = {"held_out": "--", "random_train": ":"}  # a Pretrain@ group's controls, in the group's color
DISTANCE_PANELS = (  # (curve, title, y label)
    ("distance_char", "character distance (paper)", "edit distance (characters)"),
    ("distance_char_normalized", "length-normalized distance", "edit distance / longer pathway"),
    ("distance_token", "token-level distance", "edit distance (experts)"),
)


def _grid(rows: int, cols: int, width: float = 4.2, height: float = 3.0):
    fig = Figure(figsize=(cols * width, rows * height))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def _save(fig: Figure, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _finish(ax, title: str, ylabel: str = "") -> None:
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def _mark_window(ax, domain: dict) -> None:
    window = domain.get("window")
    if window and window["start_step"] >= 0:
        ax.axvspan(window["start_step"], window["end_step"], color="gray", alpha=0.1)


def plot_analysis(report: dict[str, Any], path: str) -> str:
    steps, domains = report["steps"], report["domains"]
    fig, axes = _grid(len(domains), 5)
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        curves = d["curves"]
        row[0].plot(steps, curves["train_accuracy"], label="train accuracy")
        if "test_accuracy" in curves:
            row[0].plot(steps, curves["test_accuracy"], label="test accuracy")
        twin = row[0].twinx()
        twin.plot(steps, curves["train_loss"], color="k", alpha=0.4, label="train loss")
        if "validation_loss" in curves:
            twin.plot(steps, curves["validation_loss"], color="k", alpha=0.4, linestyle="--", label="val loss")
        twin.set_yscale("log")
        twin.tick_params(labelsize=7)
        _finish(row[0], f"{name}: accuracy (loss: grey, log)")
        for ax, metric, title in ((row[1], "distance", "pathway distance"), (row[2], "consistency", "consistency"),
                                  (row[3], "pathway_length", "experts / layer"),
                                  (row[4], "routing_entropy", "routing entropy (nats)")):
            for set_name, s in d["sets"].items():
                color, style = SET_STYLES[set_name]
                ax.plot(steps, s["curves"][metric], color=color, linestyle=style, label=f"{set_name} (n={s['n']})")
            if metric == "distance":
                for pair, values in report["cross_domain_distance"].items():
                    if name in pair.split("|"):
                        ax.plot(steps, values, color="gray", linestyle="-.", label=f"cross {pair}")
            _mark_window(ax, d)
            _finish(ax, f"{name}: {title}")
    for ax in axes[-1]:
        ax.set_xlabel("training step (shaded: correlation window)", fontsize=8)
    return _save(fig, path)


def plot_distances(report: dict[str, Any], path: str) -> str:
    steps, domains = report["steps"], report["domains"]
    fig, axes = _grid(len(domains), len(DISTANCE_PANELS))
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        for ax, (metric, title, ylabel) in zip(row, DISTANCE_PANELS, strict=False):
            for set_name, s in d["sets"].items():
                color, style = SET_STYLES[set_name]
                ax.plot(steps, s["curves"][metric], color=color, linestyle=style, label=f"{set_name} (n={s['n']})")
            _mark_window(ax, d)
            _finish(ax, f"{name}: {title}", ylabel)
    for ax in axes[-1]:
        ax.set_xlabel("training step (shaded: correlation window)", fontsize=8)
    return _save(fig, path)


def plot_groups(report: dict[str, Any], path: str) -> str:
    steps = np.asarray(report["steps"], float)
    domains = report["domains"]
    fig, axes = _grid(len(domains) + 1, 2, width=5.0)
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        for ax, metric in zip(row, ("distance", "consistency"), strict=False):
            shown_controls = set()
            for i, (group_name, g) in enumerate(d["pretrain_groups"].items()):
                after = steps >= g["step"]
                values = np.asarray(g["curves"][metric], float)
                color = f"C{i % 10}"
                ax.plot(steps, values, color=color, alpha=0.25)
                trend = g["trend_after_t_star"][metric]
                ax.plot(steps[after], values[after], color=color, label=f"{group_name} (n={g['n']}, "
                        f"{trend['slope']:+.2g}/1k)" if np.isfinite(trend["slope"]) else f"{group_name} (n={g['n']})")
                for control, curves in g["controls"].items():
                    ax.plot(steps[after], np.asarray(curves[metric], float)[after], color=color,
                            linestyle=CONTROL_LINESTYLES[control], alpha=0.7)
                    shown_controls.add(control)
            # One legend entry per control style, not per group: the group's color already says whose it is.
            for control in sorted(shown_controls):
                ax.plot([], [], color="gray", linestyle=CONTROL_LINESTYLES[control], label=f"{control} control")
            _finish(ax, f"{name}: {metric} per Pretrain@t* group (bold: after t*)")
    glob = report["global"]
    for ax, metric in zip(axes[-1], ("distance", "consistency"), strict=False):
        values = np.asarray(glob["curves"][metric], float)
        ax.plot(steps, values, color="k", label=f"all memorized (n={glob['n']})")
        fit = glob["quadratic_fit"][metric]
        if np.all(np.isfinite(fit["coefficients"])):
            after = steps >= glob["from_step"]
            ax.plot(steps[after], np.polyval(fit["coefficients"], steps[after] / 1000.0), color="r", linestyle="--",
                    label=f"quadratic fit, R^2={fit['r2']:.2f}")
        _finish(ax, f"global: {metric}")
        ax.set_xlabel("training step", fontsize=8)
    return _save(fig, path)


def plot_pairs(report: dict[str, Any], path: str) -> str:
    steps = report["steps"]
    domains = report["domains"]
    fig, axes = _grid(len(domains), 1, width=8)
    for ax, (name, d) in zip(axes[:, 0], domains.items(), strict=False):
        twin = ax.twinx()
        for i, pair in enumerate(d["pairs"]):
            color = f"C{i % 10}"
            ax.plot(steps, d["pretrain_groups"][pair["pretrain"]]["curves"]["train_loss"], color=color,
                    label=f"{pair['pretrain']} train loss")
            twin.plot(steps, d["test_groups"][pair["test"]]["accuracy"], color=color, linestyle="--",
                      label=f"{pair['test']} accuracy (delay {pair['delay']:+d})")
            ax.axvline(pair["pretrain_step"], color=color, alpha=0.3)
            twin.axvline(pair["test_step"], color=color, alpha=0.3, linestyle="--")
        ax.set_yscale("log")
        twin.set_ylim(-0.05, 1.05)
        twin.tick_params(labelsize=7)
        if twin.get_legend_handles_labels()[0]:
            twin.legend(fontsize=6, loc="center right")
        _finish(ax, f"{name}: paired groups (solid: Pretrain@ training loss, log; dashed: Test@ accuracy)")
    return _save(fig, path)


def plot_per_layer(report: dict[str, Any], path: str) -> str:
    domains = report["domains"]
    fig, axes = _grid(len(domains), 2, width=5)
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        for ax, (set_name, values) in zip(row, d["per_layer_distance"].items(), strict=False):
            values = np.asarray(values, float)  # [C, L]
            image = ax.imshow(values.T, aspect="auto", origin="lower", cmap="viridis",
                              extent=(report["steps"][0], report["steps"][-1], -0.5, values.shape[1] - 0.5))
            fig.colorbar(image, ax=ax)
            ax.set_ylabel("layer", fontsize=8)
            _finish(ax, f"{name}: per-layer distance ({set_name})", "layer")
    return _save(fig, path)


def plot_sweeps(report: dict[str, Any], path: str) -> str:
    steps = report["steps"]
    domains = report["domains"]
    fig, axes = _grid(len(domains), 2)
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        for tau, t in d.get("tau_sweep", {}).items():
            row[0].plot(steps, t["distance"], label=f"tau={tau} (r={t['correlation']['pearson_r']:+.2f})")
        _finish(row[0], f"{name}: memorized distance per tau (E.1)")
        sweep = d["eps_delta_sweep"]
        labels = [f"d={r['delta']}\nx{r['eps_multiple']}" for r in sweep]
        x = np.arange(len(sweep))
        row[1].bar(x - 0.2, [r["share_before_end"] for r in sweep], 0.4, label="share memorized before T")
        if sweep and "distance_correlation" in sweep[0]:
            row[1].bar(x + 0.2, [r["distance_correlation"]["pearson_r"] for r in sweep], 0.4,
                       label="r(distance, test acc)")
        row[1].set_xticks(x, labels, fontsize=6)
        _finish(row[1], f"{name}: (eps multiple, delta) sweep (E.3)")
    return _save(fig, path)


def plot_dynamics(report: dict[str, Any], path: str) -> str:
    rows = report["parameter_dynamics"]
    fig, axes = _grid(1, 2)
    for family in sorted({r["family"] for r in rows}):
        mine = [r for r in rows if r["family"] == family]
        steps = [r["step_to"] for r in mine]
        axes[0, 0].plot(steps, [r["speed_per_1k_steps"] for r in mine], marker=".", label=family)
        axes[0, 1].plot(steps, [r["stability"] for r in mine], marker=".", label=family)
    axes[0, 0].set_yscale("log")
    _finish(axes[0, 0], "relative weight change per 1k steps")
    _finish(axes[0, 1], "stability: cos(W(t0), W(t1))")
    return _save(fig, path)


def plot_report(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Every plot of the module docstring into out_dir; returns {file name: path}."""
    makers = {"analysis.png": plot_analysis, "distances.png": plot_distances, "groups.png": plot_groups,
              "pairs.png": plot_pairs, "per_layer.png": plot_per_layer, "sweeps.png": plot_sweeps,
              "dynamics.png": plot_dynamics}
    return {name: make(report, os.path.join(out_dir, name)) for name, make in makers.items()}
