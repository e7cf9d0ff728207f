"""The toy protocol's output: its results page (markdown: every quantity per arm, the verdicts of
docs/protocol.md, Table 1 across seeds, seed by seed) and its figures, from the results dict of
`protocol.run` (the same dict results.json holds)."""
from __future__ import annotations

import os
import re
import shutil
import textwrap
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moe_grok import atomic_files
from moe_grok.studies import protocol_stats

Quantities = tuple[tuple[str, str, str], ...]  # (key of seed_measurements, label, verdict side or "")
FIGURE_DPI = 150


def write_pages(results: dict[str, Any], quantities: Quantities, workdir: str, name: str, docs_dir: str = "") -> None:
    """<name>_results.md and <name>_{accuracy,effects}.png into `workdir`, and when `docs_dir` is set the page
    (paths relative to workdir) into docs_dir and the figures into docs_dir/figures/."""
    page = markdown(results, quantities)
    atomic_files.write_text(os.path.join(workdir, f"{name}_results.md"), page)
    figures = [plot_accuracy(results, os.path.join(workdir, f"{name}_accuracy.png")),
               plot_effects(results, quantities, os.path.join(workdir, f"{name}_effects.png"))]
    if docs_dir:
        os.makedirs(os.path.join(docs_dir, "figures"), exist_ok=True)
        atomic_files.write_text(os.path.join(docs_dir, f"{name}_results.md"), page.replace(workdir + "/", ""))
        for figure in figures:
            with atomic_files.writing(os.path.join(docs_dir, "figures", os.path.basename(figure))) as tmp:
                shutil.copyfile(figure, tmp)


def _cell(summary: dict) -> str:
    if summary["n"] == 0:
        return "n/a"
    low, high = summary["ci95"]
    interval = f" [{low:+.3g}, {high:+.3g}]" if np.isfinite(low) else ""
    return f"{summary['mean']:+.3g}{interval} (n={summary['n']})"


_CELL = re.compile(r"^(?P<mean>\S+)(?: \[(?P<low>\S+), (?P<high>\S+)\])? \(n=(?P<n>\d+)\)$")


def _parse_cell(cell: str) -> dict[str, Any]:
    """_cell's text back to {"mean", "ci95", "n"} (to its 3 significant digits)."""
    if cell == "n/a":
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    match = _CELL.match(cell)
    if match is None:
        raise ValueError(f"not a results-page cell: {cell!r}")
    low, high = (float(match[k]) if match[k] is not None else float("nan") for k in ("low", "high"))
    return {"mean": float(match["mean"]), "ci95": [low, high], "n": int(match["n"])}


def summaries_from_page(page: str, quantities: Quantities) -> dict[str, Any]:
    """The all-token summaries a results page (`markdown`) shows -> a results dict that plot_effects can
    draw: {"arms": {arm: {"positions": {"all": {"summary": {key: {"mean", "ci95", "n"}}}}}}}. For redrawing
    the effects figure of a protocol run whose workdir is gone; values keep the page's 3 digits."""
    lines = page.splitlines()
    start = lines.index("## Routing averaged over all tokens (the paper)")
    header = lines[start + 2]
    arms = [a.strip() for a in header.strip("|").split("|")[1:]]
    table = lines[start + 4:lines.index("", start + 4)]
    summaries: dict[str, dict[str, Any]] = {arm: {} for arm in arms}
    for key, label, _ in quantities:
        prefix = f"| {label} | "
        row = next((line for line in table if line.startswith(prefix)), None)
        if row is None:
            raise ValueError(f"the page has no row {label!r}")
        cells = row[len(prefix):].removesuffix(" |").split(" | ")
        for arm, cell in zip(arms, cells, strict=True):
            summaries[arm][key] = _parse_cell(cell)
    return {"arms": {arm: {"positions": {"all": {"summary": summary}}} for arm, summary in summaries.items()}}


def verdict_name(metric: str) -> str:
    """A protocol metric's name in the verdicts, with its orientation where the paper leaves it open."""
    return protocol_stats.ORIENTED_NAMES.get(metric, metric)


def hypothesis_verdicts(results: dict[str, Any], positions: str) -> dict[str, str]:
    """docs/protocol.md's criteria applied to the aggregated numbers."""
    out = {}
    for arm, r in results["arms"].items():
        if positions not in r["positions"]:
            continue
        v = r["positions"][positions]["verdicts"]
        for metric in protocol_stats.METRICS:
            trend, versus_control = v[f"h1_{metric}_slope"], v[f"h1_{metric}_slope_minus_held_out"]
            h1 = "confirmed" if trend == versus_control == "confirmed" else (
                "refuted" if trend == "refuted" else "inconclusive")
            out[f"{arm}: H1 ({verdict_name(metric)})"] = h1
            out[f"{arm}: H2 ({verdict_name(metric)})"] = v[f"h2_{metric}_signed_margin_over_loss"]
            out[f"{arm}: H2 sign ignored ({verdict_name(metric)})"] = v[f"h2_{metric}_margin_over_loss"]
        if len(r["positions"][positions]["per_seed"]) and "mixture" in arm:
            spread = [m["onset_spread_checkpoints"] for m in r["positions"][positions]["per_seed"]]
            wide = np.mean([np.isfinite(s) and s >= 3 for s in spread])  # share of ALL seeds
            for metric in protocol_stats.METRICS:
                alignment = v[f"h3_{metric}_alignment"]
                out[f"{arm}: H3 ({verdict_name(metric)})"] = (
                    "confirmed" if alignment == "confirmed" and wide >= 0.5 else
                    "refuted" if alignment == "refuted" else "inconclusive")
    out.update(registered_verdicts(results, positions))
    return out


def registered_verdicts(results: dict[str, Any], positions: str) -> dict[str, str]:
    """Round 4's primary (and exploratory) criterion over arms, where the config registers its arms
    (`registered`: metrics, grokking_arms, late_arms, control_arms): a late arm counts as grokking
    when at least 6 of its seeds grok (docs/protocol.md, "Round 4")."""
    registered = results.get("registered")
    if not registered:
        return {}
    arms = {a: r for a, r in results["arms"].items() if positions in r["positions"]}
    late = [a for a in registered["late_arms"] if a in arms and sum(
        m["groks"] == 1.0 for m in arms[a]["positions"][positions]["per_seed"]) >= protocol_stats.LATE_PILOT_GROKKED]
    grokking = [a for a in (*registered["grokking_arms"], *late) if a in arms]
    controls = [a for a in registered["control_arms"] if a in arms]
    out = {}
    for metric in registered["metrics"]:
        margins = {a: arms[a]["positions"][positions]["verdicts"][f"h2_{metric}_signed_margin_over_loss"]
                   for a in (*grokking, *controls)}
        name = "H4" if metric == registered["metrics"][0] else "exploratory"
        out[f"{name} ({verdict_name(metric)}; grokking arms {', '.join(grokking)}; controls {', '.join(controls)})"] = (
            protocol_stats.h4_verdict(margins, grokking, controls))
    return out


def markdown(results: dict[str, Any], quantities: Quantities) -> str:
    """The generated results page: per routing view, every quantity (`quantities`: protocol.QUANTITIES) per
    arm, the verdicts, Table 1."""
    arms = list(results["arms"])
    lines = [f"# Toy protocol ({results['name']}): generated results", "",
             f"Generated by `{results['command']}` on {results['date']} ({results['minutes']:.1f} min in its last "
             "invocation: a resumed run counts only that one). "
             "Cells: mean [95% CI] (n = seeds with a value); intervals stay in range: Fisher's z for correlations, "
             "Wilson for shares of seeds, the t interval clipped to the range for bounded differences and shares "
             "of samples. docs/protocol.md defines every quantity.", ""]
    views = sorted({p for r in results["arms"].values() for p in r["positions"]},
                   key=lambda p: (p != "all", p))
    for positions in views:
        view = "all tokens (the paper)" if positions == "all" else f"{positions} positions"
        lines += [f"## Routing averaged over {view}",
                  "", "| quantity | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for key, label, _ in quantities:
            cells = [_cell(results["arms"][a]["positions"][positions]["summary"][key])
                     if positions in results["arms"][a]["positions"] else "" for a in arms]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Verdicts (criteria of docs/protocol.md):", ""]
        lines += [f"- {name}: **{verdict}**" for name, verdict in hypothesis_verdicts(results, positions).items()]
        lines += ["", "Table 1 across seeds (windowed Pearson r with test accuracy; mean [95% CI] through "
                  "Fisher's z):", "",
                  "| row | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        rows = list(dict.fromkeys(row for r in results["arms"].values() if positions in r["positions"]
                                  for row in r["positions"][positions]["table1"]))  # every arm's rows, in order
        for row in rows:
            cells = [_cell(results["arms"][a]["positions"][positions]["table1"][row]["pearson_r"])
                     if row in results["arms"][a]["positions"].get(positions, {}).get("table1", {}) else ""
                     for a in arms]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _window_sizes(results, positions, arms)
        lines += _schedule_contrasts(results, positions)
    lines += _per_seed_tables(results)
    overlapped = (", in separate processes beside the next arm's training if any"
                  if results.get("analysis_process") else "")
    lines += [f"Time per arm in the run's last invocation (training of all seeds together; analysis of every "
              f"seed{overlapped}; an arm trained or analysed by an earlier invocation counts only what this one did):",
              ""]
    lines += [f"- {a}: training {r['train_seconds'] / 60:.1f} min, analysis {r['analysis_seconds'] / 60:.1f} min"
              for a, r in results["arms"].items()]
    return "\n".join(lines) + "\n"


def _window_sizes(results: dict[str, Any], positions: str, arms: list[str]) -> list[str]:
    """The correlation window's checkpoints (n) and the partial correlations' degrees of freedom, min-max
    over seeds and domains per arm (runs analysed before they were recorded have none)."""
    def span(values) -> str:
        return "n/a" if not values else f"{values[0]}" if values[0] == values[1] else f"{values[0]}-{values[1]}"

    sizes = {a: results["arms"][a]["positions"].get(positions, {}).get("window_sizes") for a in arms}
    if not any(sizes.values()):
        return []
    lines = ["Window sizes (min-max over seeds and domains): checkpoints n in the correlation window, and the "
             "degrees of freedom of the partial correlations that have a value (n - 4, n the window's checkpoints "
             "where the memorized set has values):", "",
             "| | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for key, label in (("window_n", "window n"), ("partial_df", "partial r df")):
        lines.append(f"| {label} | " + " | ".join(span((sizes[a] or {}).get(key, [])) for a in arms) + " |")
    return lines + [""]


def _schedule_contrasts(results: dict[str, Any], positions: str) -> list[str]:
    """For each registered schedule pair (arm, its reference: round 4's A2-cos and A2), every Table 1 row's
    difference of mean Fisher z, with Welch's interval; nothing when the run registers none."""
    lines = []
    for arm, reference in (results.get("registered") or {}).get("schedule_pairs", ()):
        if not all(positions in results["arms"].get(a, {}).get("positions", {}) for a in (arm, reference)):
            continue
        contrasts = protocol_stats.schedule_contrasts(results["arms"][arm]["positions"][positions]["table1"],
                                                      results["arms"][reference]["positions"][positions]["table1"])
        lines += [f"Schedule contrast, {arm} minus {reference}: mean Fisher z of the windowed r minus the other "
                  "arm's (z units; Welch's 95% interval; n = seeds with a value in each arm). A metric whose r "
                  "moves while the training-step row's does not follows the schedule:", "",
                  "| row | z difference [95% CI] | n |", "|---|---|---|"]
        for row, c in contrasts.items():
            cell = "n/a" if not np.isfinite(c["mean"]) else (
                f"{c['mean']:+.3g}" + ("" if not np.isfinite(c["ci95"][0]) else
                                       f" [{c['ci95'][0]:+.3g}, {c['ci95'][1]:+.3g}]"))
            lines.append(f"| {row} | {cell} | {c['n'][0]}, {c['n'][1]} |")
        lines.append("")
    return lines


def _per_seed_tables(results: dict[str, Any]) -> list[str]:
    """Seed by seed and domain by domain (the all-token view where there is one): test onset,
    calibrated eps, pairs."""
    lines = ["## Seed by seed", "",
             "Per domain: test onset (grokking.grok_onset: first checkpoint from which the test split's accuracy "
             "stays > 0.9; `none` with the "
             "final accuracy), calibrated eps (nats) and share memorized before the last checkpoint, Hungarian "
             "pairs (how many with a negative delay, Pretrain@t* after its Test@t#).", ""]
    for arm, r in results["arms"].items():
        positions = "all" if "all" in r["positions"] else next(iter(r["positions"]))
        facts = r["positions"][positions].get("per_seed_domains", [])
        if not facts:
            continue
        domains = list(facts[0])
        view = "all tokens" if positions == "all" else f"{positions} positions"
        lines += [f"### {arm} (routing over {view})", "",
                  "| seed | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        for seed, seed_facts in zip(r["seeds"], facts, strict=True):
            cells = []
            for domain in domains:
                f = seed_facts[domain]
                onset = str(f["onset"]) if f["onset"] >= 0 else f"none ({f['final_test_accuracy']:.2f})"
                cells.append(f"{onset}; eps {f['eps']:.2g}, {f['share_before_end']:.0%}; "
                             f"{f['pairs']} pairs ({f['negative_delays']} negative)")
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _accuracy_view(arm: dict[str, Any]) -> dict[str, Any]:
    return arm["positions"]["all"] if "all" in arm["positions"] else next(iter(arm["positions"].values()))


def accuracy_by_domain(arm: dict[str, Any]) -> dict[str, np.ndarray]:
    """Domain -> test accuracy [seeds with a curve, checkpoints] of an arm. The view's `test_accuracy`
    lists one curve per (seed, domain), seed-major, domains in the order of per_seed_domains."""
    view = _accuracy_view(arm)
    curves = view["test_accuracy"]
    facts = view.get("per_seed_domains") or []
    domains = list(facts[0]) if facts else []
    per_seed = len(domains) or 1
    if not domains:
        domains = ["test"]
    out = {}
    for k, domain in enumerate(domains):
        rows = [c for c in curves[k::per_seed] if c is not None]
        if rows:
            out[domain] = np.asarray(rows, float)
    return out


def _panel_grid(panels: int, max_columns: int, panel_size: tuple[float, float], **subplots):
    """A figure of `panels` axes in rows of at most max_columns (inches per panel: panel_size), the grid's
    unused axes hidden. Returns (figure, the axes as a flat array, columns)."""
    columns = min(panels, max_columns)
    rows = -(-panels // columns)
    fig = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns, **subplots)).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes, columns


def plot_accuracy(results: dict[str, Any], path: str) -> str:
    """Test accuracy per arm over training: per domain the mean over seeds (line) and the min-max
    range over seeds (band), against the 0.9 accuracy that counts as grokked. PNG at FIGURE_DPI."""
    arms = results["arms"]
    fig, axes, columns = _panel_grid(len(arms), ACCURACY_COLUMNS, (4.6, 5.4), sharey=True)
    for ax, (name, arm) in zip(axes, arms.items(), strict=False):
        steps = np.asarray(_accuracy_view(arm)["steps"])
        for k, (domain, curves) in enumerate(accuracy_by_domain(arm).items()):
            color = f"C{k}"
            ax.fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2, lw=0)
            ax.plot(steps, curves.mean(0), color=color, lw=1.8,
                    label=f"{domain}: mean of {len(curves)} seeds, band min-max")
        ax.axhline(protocol_stats.GROK_ACCURACY, color="0.4", ls="--", lw=1,
                   label=f"{protocol_stats.GROK_ACCURACY:g} (grokked above)")
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("training step", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    for ax in axes[::columns]:
        ax.set_ylabel("test accuracy", fontsize=10)
    fig.suptitle("Test accuracy during training, per arm (every seed)", fontsize=11)
    fig.tight_layout()
    with atomic_files.writing(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")
    return path


def _effect_axis_label(key: str) -> str:
    if "slope" in key:
        return "slope per 1k training steps"
    if key.startswith("h2") and "signed" in key:
        return "paper's sign x r - |r(loss)|"
    if key.startswith("h2"):
        return "difference of |Pearson r|"
    return "mean across seeds"


EFFECT_COLUMNS = 5  # panels per row of the effects figure (4 with more than 5 arms: wider panels)
ACCURACY_COLUMNS = 4  # panels (arms) per row of the accuracy figure


def plot_effects(results: dict[str, Any], quantities: Quantities, path: str) -> str:
    """The H1 and H2 quantities per arm with their 95% CIs (all-token routing), one panel per
    quantity so that each keeps its own scale; an arm without a value says "n/a". PNG at FIGURE_DPI."""
    keys = [(k, label) for k, label, side in quantities if side and not k.startswith("h3")]
    arms = {name: r["positions"]["all"]["summary"] for name, r in results["arms"].items() if "all" in r["positions"]}
    # a grid rather than two long rows: readable when scaled to a page; panels widen with the arms
    fig, axes, _ = _panel_grid(len(keys), EFFECT_COLUMNS if len(arms) <= 5 else EFFECT_COLUMNS - 1,
                               (max(4.0, 0.6 * len(arms) + 1.4), 4.6))
    colors = [f"C{i}" for i in range(len(arms))]
    for ax, (key, label) in zip(axes, keys, strict=False):
        means = np.array([summary[key]["mean"] for summary in arms.values()], float)
        ci = np.array([summary[key]["ci95"] for summary in arms.values()], float).reshape(-1, 2)
        counts = [summary[key]["n"] for summary in arms.values()]
        x = np.arange(len(arms))
        ax.bar(x, np.nan_to_num(means), width=0.6, color=colors)
        ax.set_xlim(-0.7, len(arms) - 0.3)
        ax.errorbar(x, means, yerr=np.abs(ci.T - means), fmt="none", ecolor="k", capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        for i in np.flatnonzero(~np.isfinite(means)):
            ax.text(x[i], 0, "n/a", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, [f"{arm} (n={n})" for arm, n in zip(arms, counts, strict=True)], fontsize=8, rotation=50,
                      ha="right", rotation_mode="anchor")
        ax.tick_params(axis="y", labelsize=9)
        ax.set_title(textwrap.fill(label, 34), fontsize=9)
        ax.set_ylabel(_effect_axis_label(key), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("H1 / H2 quantities per arm: mean and 95% CI across seeds (n = seeds with a value), "
                 "all-token routing", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title above the top row
    with atomic_files.writing(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")
    return path
