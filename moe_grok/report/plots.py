"""Report plots (matplotlib's object API: no pyplot, the caller's backend and rcParams are never touched).

  analysis.png  per domain: accuracies and losses; every registered metric with plot="analysis"
                (distance, consistency, pathway length, routing entropy) of the memorized samples
                beside their controls
  distances.png per domain: every registered distance variant (plot="distances": character,
                length-normalized, token level) of the memorized samples beside their controls
  groups.png    per domain: every Pretrain@t* group's distance and consistency from t* on with its
                linear trend (the paper's Fig. 4) beside the group's held-out (dashed) and
                random-training (dotted) controls, and the pooled global panel with its quadratic fit
  pairs.png     per domain: each Pretrain@p group's training loss beside its paired Test@q group's
                accuracy (Fig. 2)
  per_layer.png per domain: pathway distance per layer over checkpoints (Fig. 5)
  sweeps.png    per domain: distance for every tau (E.1); share memorized and correlations per (eps, delta) (E.3)
  dynamics.png  relative weight change per 1k steps and stability per parameter family (Appendix D)

Every figure: 150 dpi, text of at least 9 pt, every axis labelled with its unit, legends beside
the axes (never over the data), log axes labelled with plain numbers.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from moe_grok import atomic_files
from moe_grok.analysis import registry

DPI = 150
FONT = 9  # pt: ticks, labels and legends
TITLE_FONT = 10
SET_STYLES = {"memorized": ("C0", "-"), "held_out": ("C1", "--"), "random_train": ("C2", ":")}
CONTROL_LINESTYLES = {"held_out": "--", "random_train": ":"}  # a Pretrain@ group's controls, in the group's color
STEP_LABEL = "training step"
WINDOW_NOTE = "shaded: correlation window"


def _grid(rows: int, cols: int, width: float = 5.6, height: float = 3.2) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cols * width, rows * height), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def _plain_log(axis) -> None:
    """Log scale with ticks at 1, 2, 5 x 10^k labelled as plain numbers (0.02, 5, 200), never 2x10^0."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _style(ax, title: str, ylabel: str, xlabel: str = STEP_LABEL, legend: bool = True, twin=None,
           window: dict | None = None, extra: tuple[list, list] = ([], [])) -> None:
    """Title, axis labels (with units) and ticks at readable sizes; the legend (of ax, its twin,
    `extra` (handles, labels) and the shaded correlation window of the domain `window`) beside the
    axes, outside the data."""
    ax.set_title(title, fontsize=TITLE_FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=FONT)
    handles, labels = ax.get_legend_handles_labels()
    handles, labels = handles + list(extra[0]), labels + list(extra[1])
    if twin is not None:
        twin.tick_params(labelsize=FONT)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if window is not None and _has_window(window):
        handles, labels = handles + [Patch(color="gray", alpha=0.15)], labels + ["correlation window"]
    unique = dict(zip(labels, handles, strict=True))  # one entry per label (panels of a row share their sets)
    if legend and unique:
        ax.legend(list(unique.values()), list(unique), fontsize=FONT, loc="upper left",
                  bbox_to_anchor=(1.13 if twin else 1.02, 1.0), borderaxespad=0.0, frameon=True)


def _has_window(domain: dict) -> bool:
    window = domain.get("window")
    return bool(window) and window["start_step"] >= 0


def _mark_window(ax, domain: dict) -> None:
    if _has_window(domain):
        ax.axvspan(domain["window"]["start_step"], domain["window"]["end_step"], color="gray", alpha=0.15)


def _distance_axis_label(report: dict[str, Any]) -> str:
    options = report.get("options", {})
    return registry.distance_axis_label(options.get("distance_level", "char"),
                                        options.get("distance_normalized", False))


def _axis_label(report: dict[str, Any], metric: registry.Metric) -> str:
    return _distance_axis_label(report) if metric.name == "distance" else metric.axis_label


def _set_lines(ax, steps, domain: dict, metric: str) -> None:
    for set_name, s in domain["sets"].items():
        if metric in s["curves"]:
            color, style = SET_STYLES.get(set_name, ("k", "-"))
            ax.plot(steps, np.asarray(s["curves"][metric], float), color=color, linestyle=style,
                    label=f"{set_name} (n={s['n']})")


def analysis_figure(report: dict[str, Any]) -> Figure:
    steps, domains = report["steps"], report["domains"]
    panels = registry.metrics(plot="analysis")
    fig, axes = _grid(len(domains), 1 + len(panels))
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        curves = d["curves"]
        row[0].plot(steps, curves["train_accuracy"], color="C0", label="train accuracy")
        if "test_accuracy" in curves:
            row[0].plot(steps, curves["test_accuracy"], color="C3", label="test accuracy")
        row[0].set_ylim(-0.05, 1.05)
        twin = row[0].twinx()
        twin.plot(steps, curves["train_loss"], color="k", alpha=0.5, label="train loss")
        if "validation_loss" in curves:
            twin.plot(steps, curves["validation_loss"], color="k", alpha=0.5, linestyle="--", label="validation loss")
        twin.set_yscale("log")
        _plain_log(twin.yaxis)
        twin.set_ylabel("loss (nats, log scale)", fontsize=FONT)
        _mark_window(row[0], d)
        _style(row[0], f"{name}: accuracy and loss", "accuracy (fraction correct)", twin=twin, window=d)
        shared: tuple[list, list] = ([], [])  # the row's metric panels share one legend, beside the last
        for ax, metric in zip(row[1:], panels, strict=False):
            _set_lines(ax, steps, d, metric.name)
            if metric.name == "distance":
                for pair, values in report["cross_domain_distance"].items():
                    if name in pair.split("|"):
                        ax.plot(steps, values, color="gray", linestyle="-.", label=f"cross-domain {pair}")
            _mark_window(ax, d)
            handles, labels = ax.get_legend_handles_labels()
            shared[0].extend(handles)
            shared[1].extend(labels)
            last = metric is panels[-1]
            _style(ax, f"{name}: {metric.title}", _axis_label(report, metric), legend=last,
                   window=d if last else None, extra=shared if last else ([], []))
    return fig


def distances_figure(report: dict[str, Any]) -> Figure:
    steps, domains = report["steps"], report["domains"]
    panels = registry.metrics(plot="distances")
    fig, axes = _grid(len(domains), max(1, len(panels)))
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        for ax, metric in zip(row, panels, strict=False):
            _set_lines(ax, steps, d, metric.name)
            _mark_window(ax, d)
            last = metric is panels[-1]  # the panels of a row show the same sets: one legend, beside the last
            _style(ax, f"{name}: {metric.title}", metric.axis_label, legend=last, window=d if last else None)
    return fig


def groups_figure(report: dict[str, Any]) -> Figure:
    steps = np.asarray(report["steps"], float)
    domains = report["domains"]
    metrics = [registry.get("distance"), registry.get("consistency")]
    fig, axes = _grid(len(domains) + 1, 2, width=6.4, height=3.6)
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        for ax, metric in zip(row, metrics, strict=False):
            shown_controls = set()
            for i, (group_name, g) in enumerate(d["pretrain_groups"].items()):
                after = steps >= g["step"]
                values = np.asarray(g["curves"][metric.name], float)
                color = f"C{i % 10}"
                ax.plot(steps, values, color=color, alpha=0.25)
                slope = g["trend_after_t_star"][metric.name]["slope"]
                slope_text = f", {slope:+.2g}/1k steps" if slope is not None and np.isfinite(slope) else ""
                ax.plot(steps[after], values[after], color=color, label=f"{group_name} (n={g['n']}{slope_text})")
                for control, curves in g["controls"].items():
                    ax.plot(steps[after], np.asarray(curves[metric.name], float)[after], color=color,
                            linestyle=CONTROL_LINESTYLES[control], alpha=0.7)
                    shown_controls.add(control)
            # One legend entry per control style, not per group: the group's color already says whose it is.
            for control in sorted(shown_controls):
                ax.plot([], [], color="gray", linestyle=CONTROL_LINESTYLES[control], label=f"{control} control")
            _style(ax, f"{name}: {metric.label} per Pretrain@t* group (bold: after t*)", _axis_label(report, metric))
    glob = report["global"]
    for ax, metric in zip(axes[-1], metrics, strict=False):
        values = np.asarray(glob["curves"][metric.name], float)
        ax.plot(steps, values, color="k", label=f"all memorized (n={glob['n']})")
        fit = glob["quadratic_fit"][metric.name]
        coefficients = np.asarray(fit["coefficients"], float)
        if np.all(np.isfinite(coefficients)):
            after = steps >= glob["from_step"]
            ax.plot(steps[after], np.polyval(coefficients, steps[after] / 1000.0), color="r", linestyle="--",
                    label=f"quadratic fit, R^2={fit['r2']:.2f}")
        _style(ax, f"all domains: {metric.label} of the memorized samples", _axis_label(report, metric))
    return fig


def pairs_figure(report: dict[str, Any]) -> Figure:
    steps = report["steps"]
    domains = report["domains"]
    most_pairs = max([len(d["pairs"]) for d in domains.values()] + [1])
    fig, axes = _grid(len(domains), 1, width=10.0, height=max(3.6, 0.24 * (most_pairs + 3)))
    for ax, (name, d) in zip(axes[:, 0], domains.items(), strict=False):
        twin = ax.twinx()
        handles, labels = [], []
        for i, pair in enumerate(d["pairs"]):
            color = f"C{i % 10}"
            line, = ax.plot(steps, d["pretrain_groups"][pair["pretrain"]]["curves"]["train_loss"], color=color)
            twin.plot(steps, d["test_groups"][pair["test"]]["accuracy"], color=color, linestyle="--")
            ax.axvline(pair["pretrain_step"], color=color, alpha=0.3)
            twin.axvline(pair["test_step"], color=color, alpha=0.3, linestyle="--")
            handles.append(line)
            labels.append(f"{pair['pretrain']} -> {pair['test']} (delay {pair['delay']:+d})")
        if d["pairs"]:
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
            handles += [Line2D([], [], color="gray"), Line2D([], [], color="gray", linestyle="--")]
            labels += ["solid: Pretrain@ training loss", "dashed: Test@ accuracy"]
        twin.set_ylim(-0.05, 1.05)
        twin.set_ylabel("Test@ group accuracy (fraction, dashed)", fontsize=FONT)
        title = f"{name}: paired groups (thin vertical lines: t* and the test onset)"
        _style(ax, title if d["pairs"] else f"{name}: no Pretrain@ / Test@ pairs",
               "Pretrain@ group training loss (nats, log)", twin=twin, extra=(handles, labels))
    return fig


def per_layer_figure(report: dict[str, Any]) -> Figure:
    domains = report["domains"]
    fig, axes = _grid(len(domains), 2, width=5.2)
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        for ax, (set_name, values) in zip(row, d["per_layer_distance"].items(), strict=False):
            values = np.asarray(values, float)  # [C, L]
            image = ax.imshow(values.T, aspect="auto", origin="lower", cmap="viridis",
                              extent=(report["steps"][0], report["steps"][-1], -0.5, values.shape[1] - 0.5))
            colorbar = fig.colorbar(image, ax=ax)
            colorbar.set_label("edit distance (characters)", fontsize=FONT)
            colorbar.ax.tick_params(labelsize=FONT)
            ax.set_yticks(range(values.shape[1]))
            _style(ax, f"{name}: per-layer pathway distance ({set_name})", "MoE layer (index)", legend=False)
            ax.grid(False)
        for ax in row[len(d["per_layer_distance"]):]:
            ax.set_visible(False)
    return fig


def sweeps_figure(report: dict[str, Any]) -> Figure:
    steps = report["steps"]
    domains = report["domains"]
    fig, axes = _grid(len(domains), 2, width=7.5, height=3.4)
    for row, (name, d) in zip(axes, domains.items(), strict=False):
        for tau, t in d.get("tau_sweep", {}).items():
            r = t["correlation"]["pearson_r"]
            r_text = f"{r:+.2f}" if r is not None and np.isfinite(r) else "n/a"
            row[0].plot(steps, np.asarray(t["distance"], float), label=f"tau={tau} (r={r_text})")
        _style(row[0], f"{name}: memorized distance per tau (E.1)", _distance_axis_label(report))
        sweep = d["eps_delta_sweep"]
        labels = [f"{r['delta']:g}\nx{r['eps_multiple']:g}" for r in sweep]
        x = np.arange(len(sweep))
        row[1].bar(x - 0.2, [r["share_before_end"] for r in sweep], 0.4, label="share memorized before T")
        if sweep and "distance_correlation" in sweep[0]:
            row[1].bar(x + 0.2, [r["distance_correlation"]["pearson_r"] for r in sweep], 0.4,
                       label="r(distance, test accuracy)")
        row[1].axhline(0.0, color="k", linewidth=0.8)
        row[1].set_xticks(x, labels)
        _style(row[1], f"{name}: (eps, delta) sweep (E.3)", "share (fraction) / Pearson r",
               xlabel="delta (nats, top line) and eps multiple (bottom line)")
    return fig


def dynamics_figure(report: dict[str, Any]) -> Figure:
    rows = report["parameter_dynamics"]
    fig, axes = _grid(1, 2, width=6.0)
    for family in sorted({r["family"] for r in rows}):
        mine = [r for r in rows if r["family"] == family]
        steps = [r["step_to"] for r in mine]
        axes[0, 0].plot(steps, [r["speed_per_1k_steps"] for r in mine], marker=".", label=family)
        axes[0, 1].plot(steps, [r["stability"] for r in mine], marker=".", label=family)
    if rows:
        axes[0, 0].set_yscale("log")
        _plain_log(axes[0, 0].yaxis)
    xlabel = "training step (end of the interval)"
    _style(axes[0, 0], "weight change speed", "relative weight change per 1k steps (log)", xlabel=xlabel)
    _style(axes[0, 1], "stability", "cos(W(t0), W(t1)) (cosine, -1 to 1)", xlabel=xlabel)
    return fig


FIGURES = {"analysis.png": analysis_figure, "distances.png": distances_figure, "groups.png": groups_figure,
           "pairs.png": pairs_figure, "per_layer.png": per_layer_figure, "sweeps.png": sweeps_figure,
           "dynamics.png": dynamics_figure}


def save(fig: Figure, path: str) -> str:
    """Write `fig` as a PNG at `path`, whole or not at all (written aside and renamed)."""
    with atomic_files.writing(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


def figure_writers(report: dict[str, Any]) -> dict[str, Callable[[str], None]]:
    """{file name: function drawing that figure into the PNG file at the path it is given} for
    every figure of FIGURES (each drawn only when written, so one figure is in memory at a time)."""
    def writer(make):
        return lambda path: make(report).savefig(path, dpi=DPI, format="png")
    return {name: writer(make) for name, make in FIGURES.items()}


def plot_report(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Every plot of the module docstring into out_dir, written as a set (atomic_files.write_files);
    returns {file name: path}."""
    writers = {os.path.join(out_dir, name): write for name, write in figure_writers(report).items()}
    atomic_files.write_files(writers)
    return {os.path.basename(path): path for path in writers}
