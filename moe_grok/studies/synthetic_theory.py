"""The paper's synthetic check of the routing-kernel theory as a study (docs/method.md, "Theory"):
a sweep of one-run measurements (theory/synthetic_run.py) over cluster structures x router scales x
top-k gates x router seeds, each training measured with one or more kernels (analytic, empirical NTK);
the correlations between pathway edit distance and d_eff (within structures: the paper's Fig. 8) and
between the bound and the test error, per (router scale, top-k, kernel) cell, written as tables and a
figure. The grid's reading rule is docs/protocol.md's (round 4, "The routing-kernel theory").
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import os

import ml_collections
import numpy as np
from jax.sharding import Mesh
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moe_grok import atomic_files, strict_json
from moe_grok.analysis.statistics import fisher_interval
from moe_grok.theory.synthetic_run import SyntheticConfig, run_synthetic_kernels
from moe_grok.writers.progress import track

TABLE_COLUMNS = {  # result key -> table header
    "n_clusters": "clusters", "spread": "spread", "router_scale": "r_scale", "router_seed": "r_seed",
    "edit_distance": "edit_dist", "edit_distance_normalized": "edit_norm", "mean_pathway_experts": "path_len",
    "d_eff": "d_eff", "d_eff_normalized": "d_eff_norm", "bias": "bias", "variance": "variance", "bound": "bound",
    "train_mse": "train_mse",
    "test_mse": "test_mse", "krr_test_mse": "krr_mse",
}
CORRELATION_PAIRS = (  # the first is the paper's Fig. 8 (primary)
    ("edit_distance_normalized", "d_eff_normalized"),
    ("edit_distance", "d_eff"),
    ("mean_pathway_experts", "d_eff_normalized"),
    ("bound", "test_mse"),
    ("bound", "krr_test_mse"),
)


def sweep_synthetic(base: SyntheticConfig, structures, router_seeds, router_scales=(1.0,), mesh=None,
                    progress: bool = True, top_ks=(0,), kernels=("analytic",)):
    """Run every (n_clusters, spread) structure x router_scale x top_k x router_seed, each training
    measured with every kernel of ``kernels`` -> list of result dicts (one per training and kernel;
    top_k: experts kept per sample in the forward pass, 0 = soft routing; a sparse gate and the kernel
    are part of the structure: only the router seed varies inside one)."""
    grid = list(itertools.product(structures, router_scales, top_ks, router_seeds))
    rows = []
    for (n_clusters, spread), scale, top_k, seed in track(grid, desc="synthetic runs", unit="run", enabled=progress):
        config = dataclasses.replace(base, n_clusters=n_clusters, spread=spread, router_scale=scale, top_k=top_k,
                                     router_seed=seed)
        rows.extend(run_synthetic_kernels(config, tuple(kernels), mesh=mesh))
    return rows


def format_table(rows, columns=TABLE_COLUMNS, header=True, width=9) -> str:
    """Fixed-width text table of the result dicts; ``columns`` maps result keys to headers."""
    cell = lambda v: f"{v:>{width}.4g}" if isinstance(v, float) else f"{v:>{width}}"
    lines = [" ".join(f"{name:>{width}}" for name in columns.values())] if header else []
    lines += [" ".join(cell(row[key]) for key in columns) for row in rows]
    return "\n".join(lines)


def _group_key(row):
    return (row["n_clusters"], row["spread"], row["router_scale"], row.get("top_k", 0), row.get("kernel", "analytic"))


def _structure_label(key) -> str:
    return (f"K={key[0]} spread={key[1]} scale={key[2]}" + (f" top_k={key[3]}" if key[3] else "")
            + (f" {key[4]}" if key[4] != "analytic" else ""))


def within_structure(rows, a: str, b: str) -> dict:
    """The paper's design (Fig. 8): only the router seed varies inside a structure.

    Returns {"per_structure": {label: {"r", "ci95", "n", "df"}}, "pooled": {"r", "ci95", "n", "df",
    "structures"}} where pooled is the Pearson r of a and b after removing each structure's mean: a
    partial correlation with the structures - 1 mean contrasts as covariates, so its CI is Fisher's z
    on n - (structures - 1) effective pairs and its df = n - 2 - (structures - 1)."""
    from scipy import stats

    keys = sorted({_group_key(r) for r in rows})
    per, da, db = {}, [], []
    for key in keys:
        va = np.array([r[a] for r in rows if _group_key(r) == key], np.float64)
        vb = np.array([r[b] for r in rows if _group_key(r) == key], np.float64)
        r_value = float(stats.pearsonr(va, vb).statistic) if len(va) >= 3 and np.ptp(va) and np.ptp(vb) else np.nan
        per[_structure_label(key)] = {"r": r_value, "ci95": fisher_interval(r_value, len(va)), "n": len(va),
                                      "df": len(va) - 2}
        da.append(va - va.mean())
        db.append(vb - vb.mean())
    da, db = np.concatenate(da), np.concatenate(db)
    pooled = float(stats.pearsonr(da, db).statistic) if np.ptp(da) and np.ptp(db) else np.nan
    effective = len(da) - (len(keys) - 1)
    return {"per_structure": per, "pooled": {"r": pooled, "ci95": fisher_interval(pooled, effective),
                                             "n": int(len(da)), "df": effective - 2, "structures": len(keys)}}


def correlations(rows, pairs=CORRELATION_PAIRS) -> dict:
    """For each (a, b): Pearson and Spearman over all runs (structures pooled: secondary) and the
    within-structure correlations (primary: only router-seed variation remains)."""
    from scipy import stats

    out = {}
    for a, b in pairs:
        va, vb = (np.array([r[k] for r in rows], np.float64) for k in (a, b))
        out[f"{a}~{b}"] = {
            "within_structure": within_structure(rows, a, b),
            "pooled_pearson": float(stats.pearsonr(va, vb).statistic),
            "pooled_spearman": float(stats.spearmanr(va, vb).statistic),
            "num_runs": len(rows),
        }
    return out


def format_correlations(corr: dict) -> str:
    lines = []
    for name, c in corr.items():
        w = c["within_structure"]["pooled"]
        lines.append(f"{name:<38} within structures r={w['r']:+.3f} [95% CI {w['ci95'][0]:+.2f}, {w['ci95'][1]:+.2f}]"
                     f" (n={w['n']});  all runs pooled: pearson={c['pooled_pearson']:+.3f} "
                     f"spearman={c['pooled_spearman']:+.3f}")
        for label, s in c["within_structure"]["per_structure"].items():
            lines.append(f"    {label:<30} r={s['r']:+.3f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}] (n={s['n']})")
    return "\n".join(lines)


PRIMARY_PAIR = "edit_distance_normalized~d_eff_normalized"  # the paper's claim (Fig. 8)
GRID_FIGURE_PAIRS = (PRIMARY_PAIR, "mean_pathway_experts~d_eff_normalized")


def cell_key(row) -> tuple:
    """(router_scale, top_k, kernel): the grid cell of a result row."""
    return (row["router_scale"], row.get("top_k", 0), row.get("kernel", "analytic"))


def cell_label(key) -> str:
    return f"scale {key[0]:g}, " + (f"top-{key[1]}" if key[1] else "soft") + f", {key[2]}"


def cell_verdict(ci95) -> str:
    """The registered rule for one cell (docs/protocol.md): the claim holds if the within-structure
    95% CI lies above 0; it fails if the CI lies below 0 (the opposite sign) or includes 0."""
    low, high = ci95
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    if low > 0:
        return "holds"
    return "fails (opposite sign)" if high < 0 else "fails (CI includes 0)"


def cell_correlations(rows, pairs=CORRELATION_PAIRS) -> list[dict]:
    """Per (router scale, top-k, kernel) cell, in the rows' order: {"router_scale", "top_k", "kernel",
    "label", "runs", "correlations" (as `correlations`), "verdict" (the registered rule on the primary
    pair's within-structure CI)}."""
    keys = list(dict.fromkeys(cell_key(r) for r in rows))
    cells = []
    for key in keys:
        corr = correlations([r for r in rows if cell_key(r) == key], pairs)
        cells.append({"router_scale": key[0], "top_k": key[1], "kernel": key[2], "label": cell_label(key),
                      "runs": sum(cell_key(r) == key for r in rows), "correlations": corr,
                      "verdict": cell_verdict(corr[PRIMARY_PAIR]["within_structure"]["pooled"]["ci95"])
                      if PRIMARY_PAIR in corr else "n/a"})
    return cells


def _answer(cells) -> str:
    if not cells:
        return "not run"
    held = [c for c in cells if c["verdict"] == "holds"]
    if len(held) == len(cells):
        return "holds"
    if not held:
        return "fails"
    return "mixed: holds in " + "; ".join(c["label"] for c in held)


def grid_reading(cells) -> dict:
    """The registered overall reading of the grid (docs/protocol.md, round 4): sub-questions (a)
    input-specific routing = analytic soft cells at scale > 1; (b) sparse gates = analytic top-k cells;
    (c) empirical NTK = the empirical cells; each "holds" (every cell), "fails" (none) or "mixed".
    Overall over all cells: "supported" if the claim holds in >= 3/4 of them, "not supported" if in
    <= 1/4 (>= 9 and <= 3 of the registered 12), otherwise "regime-dependent"."""
    held = sum(c["verdict"] == "holds" for c in cells)
    total = len(cells)
    overall = ("supported" if held >= 0.75 * total else "not supported" if held <= 0.25 * total
               else "regime-dependent")
    analytic = [c for c in cells if c["kernel"] == "analytic"]
    return {
        "cells_holding": held, "cells": total, "overall": overall,
        "input_specific_routing": _answer([c for c in analytic if c["router_scale"] > 1 and not c["top_k"]]),
        "sparse_gates": _answer([c for c in analytic if c["top_k"]]),
        "empirical_ntk": _answer([c for c in cells if c["kernel"] == "empirical"]),
    }


def _interval_text(stat) -> str:
    return f"{stat['r']:+.2f} [{stat['ci95'][0]:+.2f}, {stat['ci95'][1]:+.2f}]"


def format_cells(cells, reading=None) -> str:
    """Per cell: the primary pair's within-structure r [95% CI], n, df and verdict, then its per-structure
    r [CI]; the secondary pairs' within-structure r; the overall reading if given."""
    lines = [f"{'cell':<30} {'within-structure r [95% CI]':<28} {'n':>4} {'df':>4}  verdict"]
    for c in cells:
        w = c["correlations"][PRIMARY_PAIR]["within_structure"]
        lines.append(f"{c['label']:<30} {_interval_text(w['pooled']):<28} {w['pooled']['n']:>4} "
                     f"{w['pooled']['df']:>4}  {c['verdict']}")
        lines.append("    per structure: " + "; ".join(
            f"{label.split(' scale=')[0]} {_interval_text(v)}" for label, v in w["per_structure"].items()))
        lines.append("    within structures, beside: " + "; ".join(
            f"{name} {_interval_text(v['within_structure']['pooled'])}"
            for name, v in c["correlations"].items() if name != PRIMARY_PAIR))
    if reading:
        lines.append(f"reading (docs/protocol.md rule): the claim holds in {reading['cells_holding']} of "
                     f"{reading['cells']} cells: {reading['overall']}; (a) input-specific routing: "
                     f"{reading['input_specific_routing']}; (b) sparse gates: {reading['sparse_gates']}; "
                     f"(c) empirical NTK: {reading['empirical_ntk']}")
    return "\n".join(lines)


CELL_CSV_COLUMNS = ("router_scale", "top_k", "kernel", "pair", "scope", "r", "ci_low", "ci_high", "n", "df",
                    "verdict")


def cell_table_rows(cells) -> list[dict]:
    """Flat rows for cells.csv: per cell x pair, the within-structure statistic (scope "within structures",
    with the cell's verdict on the primary pair) and every structure's; NaN becomes an empty field."""
    finite = lambda v: "" if v is None or not np.isfinite(v) else v
    out = []
    for c in cells:
        for pair, corr in c["correlations"].items():
            w = corr["within_structure"]
            scopes = [("within structures", w["pooled"])] + list(w["per_structure"].items())
            for scope, stat in scopes:
                out.append({"router_scale": c["router_scale"], "top_k": c["top_k"], "kernel": c["kernel"],
                            "pair": pair, "scope": scope, "r": finite(stat["r"]), "ci_low": finite(stat["ci95"][0]),
                            "ci_high": finite(stat["ci95"][1]), "n": stat["n"], "df": stat["df"],
                            "verdict": c["verdict"] if pair == PRIMARY_PAIR and scope == "within structures" else ""})
    return out


def save_grid_plot(cells, path: str) -> None:
    """PNG at FIGURE_DPI: a forest plot per pair of GRID_FIGURE_PAIRS, one row per cell: the
    within-structure r with its 95% CI (colour: kernel; filled: soft gates, open: top-k) and each
    structure's r (small grey dots)."""
    fig = Figure(figsize=(13, 1.6 + 0.45 * len(cells)))
    axes = fig.subplots(1, len(GRID_FIGURE_PAIRS), sharey=True)
    titles = {PRIMARY_PAIR: "normalized edit distance vs normalized d_eff (the paper's claim)",
              "mean_pathway_experts~d_eff_normalized": "pathway length (experts) vs normalized d_eff"}
    colours = {"analytic": "C0", "empirical": "C3"}
    ys = np.arange(len(cells))[::-1]
    for ax, pair in zip(axes, GRID_FIGURE_PAIRS, strict=True):
        for y, c in zip(ys, cells, strict=True):
            w = c["correlations"][pair]["within_structure"]
            per = [v["r"] for v in w["per_structure"].values()]
            ax.scatter(per, np.full(len(per), y - 0.18), s=9, color="0.55", zorder=1)
            r, (low, high) = w["pooled"]["r"], w["pooled"]["ci95"]
            colour = colours.get(c["kernel"], "k")
            if not np.isfinite(r):
                continue
            # r = +-1 lies a hair outside its Fisher interval (z is clipped): no negative bar
            ax.errorbar([r], [y], xerr=[[max(r - low, 0.0)], [max(high - r, 0.0)]], fmt="o", color=colour, capsize=3,
                        zorder=2,
                        markerfacecolor="white" if c["top_k"] else colour)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(titles.get(pair, pair), fontsize=10)
        ax.set_xlabel("within-structure Pearson r, 95% CI (grey: per structure)", fontsize=10)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    legend = [Line2D([], [], marker="o", ls="", color=colours[k], label=f"{k} kernel") for k in colours]
    legend += [Line2D([], [], marker="o", ls="", color="k", label="soft gates"),
               Line2D([], [], marker="o", ls="", color="k", markerfacecolor="white", label="top-k gates"),
               Line2D([], [], marker="o", ls="", color="0.55", markersize=4, label="one structure")]
    axes[-1].legend(handles=legend, fontsize=9, loc="lower right")
    axes[0].set_yticks(ys, [f"{c['label']} (n={c['correlations'][PRIMARY_PAIR]['within_structure']['pooled']['n']})"
                            for c in cells], fontsize=9)
    fig.tight_layout()
    with atomic_files.writing(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")


FIGURE_DPI = 150


def save_plots(rows, corr: dict, path: str) -> None:
    """PNG at FIGURE_DPI. Primary (top): normalized edit distance vs normalized d_eff within each
    structure (structure means removed), and each structure's r with its 95% CI. Secondary (bottom):
    all runs pooled, and the bound vs the measured test MSE. One legend (structure -> colour) below."""
    fig = Figure(figsize=(12, 10.5))
    (within, per_structure), (pooled, bound) = fig.subplots(2, 2)
    keys = sorted({_group_key(r) for r in rows})
    main = corr["edit_distance_normalized~d_eff_normalized"]["within_structure"]
    for k, key in enumerate(keys):
        sub = [r for r in rows if _group_key(r) == key]
        x = np.array([r["edit_distance_normalized"] for r in sub])
        y = np.array([r["d_eff_normalized"] for r in sub])
        label = _structure_label(key)
        style = dict(s=16, color=f"C{k}")
        within.scatter(x - x.mean(), y - y.mean(), label=f"{label}: {len(sub)} router seeds", **style)
        pooled.scatter(x, y, **style)
        bound.scatter([r["test_mse"] for r in sub], [r["bound"] for r in sub], **style)
    w = main["pooled"]
    within.set_title(f"within structures: r = {w['r']:+.2f}, 95% CI [{w['ci95'][0]:+.2f}, {w['ci95'][1]:+.2f}] "
                     f"(n = {w['n']})", fontsize=10)
    within.set_xlabel("normalized edit distance - structure mean", fontsize=10)
    within.set_ylabel("normalized d_eff - structure mean", fontsize=10)
    labels = list(main["per_structure"])
    values = [main["per_structure"][k] for k in labels]
    for k, v in enumerate(values):  # labels follow the sorted structure keys, as the colours do
        per_structure.errorbar([v["r"]], [k], xerr=np.abs(np.array(v["ci95"])[:, None] - v["r"]), fmt="o",
                               color=f"C{k}")
    per_structure.axvline(0, color="k", lw=0.8)
    per_structure.set_yticks(np.arange(len(values)), labels, fontsize=9)
    per_structure.set_title("Pearson r per structure (router seeds only), 95% CI", fontsize=10)
    per_structure.set_xlabel("Pearson r (normalized edit distance, normalized d_eff)", fontsize=10)
    pooled.set_title("all runs pooled (structures differ too)", fontsize=10)
    pooled.set_xlabel("normalized edit distance", fontsize=10)
    pooled.set_ylabel("normalized d_eff = d_eff / n_train", fontsize=10)
    lo = min(min(r["test_mse"], r["bound"]) for r in rows)
    hi = max(max(r["test_mse"], r["bound"]) for r in rows)
    bound.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="bound = test MSE")
    bound.set(xscale="log", yscale="log")
    bound.set_title("bound vs measured test MSE", fontsize=10)
    bound.set_xlabel("test MSE of the trained MoE (clean labels)", fontsize=10)
    bound.set_ylabel("bound (C1 = 1)", fontsize=10)
    bound.legend(fontsize=9, loc="upper left")
    for ax in (within, per_structure, pooled, bound):
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    handles, legend_labels = within.get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="lower center", ncol=min(3, len(handles)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.025 * -(-len(handles) // 3), 1, 1))
    with atomic_files.writing(path) as tmp:
        fig.savefig(tmp, dpi=FIGURE_DPI, format="png")


def _combination_rows(config, base, structures, scale, top_k, kernels, mesh):
    """Rows of one (router scale, top-k) combination, every structure x router seed x kernel; reused from
    ``<out>/cells/`` when an earlier run of the same settings wrote them (a stopped sweep resumes)."""
    settings = {"base_config": dataclasses.asdict(dataclasses.replace(base, router_scale=scale, top_k=top_k)),
                "structures": [list(s) for s in structures], "router_seeds": int(config.sweep.router_seeds),
                "kernels": list(kernels)}
    path = os.path.join(config.out, "cells", f"scale{scale:g}_topk{top_k}.json")
    if os.path.exists(path):
        saved = strict_json.load(path)
        if saved["settings"] == strict_json.loads(strict_json.dumps(settings)):
            return saved["runs"]
    rows = sweep_synthetic(base, structures, range(config.sweep.router_seeds), [scale], mesh=mesh, top_ks=[top_k],
                           kernels=kernels)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    strict_json.dump({"settings": settings, "runs": rows}, path, indent=1)
    return rows


def run_sweep(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> str:
    """The sweep of moe_grok/configs/verify_theory.py: every router scale x top-k (in the config's order)
    x structure x router seed, each training measured with every kernel of sweep.kernels.

    Writes results.csv, results.json and theory.png to config.out; with more than one (scale, top-k,
    kernel) cell also cells.csv and theory_grid.png (the forest plot) and the registered reading.
    Each (scale, top-k) combination is kept in <out>/cells/ as it finishes; a rerun with the same
    settings reuses it. Returns the correlation text."""
    base = SyntheticConfig.from_config(config.synthetic)
    structures = [(int(k), float(s)) for k in config.sweep.n_clusters for s in config.sweep.spreads]
    kernels = tuple(str(k) for k in config.sweep.get("kernels", ("analytic",)))
    rows = []
    for scale, top_k in itertools.product([float(s) for s in config.sweep.router_scales],
                                          [int(k) for k in config.sweep.get("top_ks", (0,))]):
        rows.extend(_combination_rows(config, base, structures, scale, top_k, kernels, mesh))
    corr = correlations(rows)
    cells = cell_correlations(rows)
    reading = grid_reading(cells) if len(cells) > 1 else None
    os.makedirs(config.out, exist_ok=True)
    with atomic_files.open_aside(os.path.join(config.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"base_config": dataclasses.asdict(base), "runs": rows, "correlations": corr}
    if reading is None:
        strict_json.dump(summary, os.path.join(config.out, "results.json"), indent=1)
        save_plots(rows, corr, os.path.join(config.out, "theory.png"))
        return (f"Correlations over runs:\n{format_correlations(corr)}\n"
                f"wrote {config.out}/results.csv, results.json, theory.png")
    strict_json.dump({**summary, "cells": cells, "reading": reading}, os.path.join(config.out, "results.json"),
                     indent=1)
    with atomic_files.open_aside(os.path.join(config.out, "cells.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CELL_CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(cell_table_rows(cells))
    save_grid_plot(cells, os.path.join(config.out, "theory_grid.png"))
    return (f"Per (router scale, top-k, kernel) cell, {PRIMARY_PAIR} within structures:\n"
            f"{format_cells(cells, reading)}\n"
            f"wrote {config.out}/results.csv, results.json, cells.csv, theory_grid.png")
