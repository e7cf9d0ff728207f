"""The paper's synthetic check of the routing-kernel theory as a study (docs/method.md, "Theory"):
a sweep of one-run measurements (theory/synthetic_run.py) over cluster structures x router scales x
top-k gates x router seeds, the correlations between pathway edit distance and d_eff (within structures: the
paper's Fig. 8) and between the bound and the test error, written as tables and a figure.
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

from moe_grok import atomic_files, strict_json
from moe_grok.analysis.statistics import fisher_interval
from moe_grok.theory.synthetic_run import SyntheticConfig, run_synthetic
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
                    progress: bool = True, top_ks=(0,)):
    """Run every (n_clusters, spread) structure x router_scale x top_k x router_seed -> list of result dicts
    (top_k: experts kept per sample in the forward pass, 0 = soft routing; a sparse gate is part of the
    structure: only the router seed varies inside one)."""
    grid = list(itertools.product(structures, router_scales, top_ks, router_seeds))
    return [run_synthetic(dataclasses.replace(base, n_clusters=n_clusters, spread=spread, router_scale=scale,
                                              top_k=top_k, router_seed=seed), mesh=mesh)
            for (n_clusters, spread), scale, top_k, seed in track(grid, desc="synthetic runs", unit="run",
                                                                  enabled=progress)]


def format_table(rows, columns=TABLE_COLUMNS, header=True, width=9) -> str:
    """Fixed-width text table of the result dicts; ``columns`` maps result keys to headers."""
    cell = lambda v: f"{v:>{width}.4g}" if isinstance(v, float) else f"{v:>{width}}"
    lines = [" ".join(f"{name:>{width}}" for name in columns.values())] if header else []
    lines += [" ".join(cell(row[key]) for key in columns) for row in rows]
    return "\n".join(lines)


def _group_key(row):
    return (row["n_clusters"], row["spread"], row["router_scale"], row.get("top_k", 0))


def _structure_label(key) -> str:
    return f"K={key[0]} spread={key[1]} scale={key[2]}" + (f" top_k={key[3]}" if key[3] else "")


def within_structure(rows, a: str, b: str) -> dict:
    """The paper's design (Fig. 8): only the router seed varies inside a structure.

    Returns {"per_structure": {label: {"r", "ci95", "n"}}, "pooled": {"r", "ci95", "n"}} where
    pooled is the Pearson r of a and b after removing each structure's mean, its CI from Fisher z
    with n - (structures - 1) effective pairs."""
    from scipy import stats

    keys = sorted({_group_key(r) for r in rows})
    per, da, db = {}, [], []
    for key in keys:
        va = np.array([r[a] for r in rows if _group_key(r) == key], np.float64)
        vb = np.array([r[b] for r in rows if _group_key(r) == key], np.float64)
        r_value = float(stats.pearsonr(va, vb).statistic) if len(va) >= 3 and np.ptp(va) and np.ptp(vb) else np.nan
        per[_structure_label(key)] = {"r": r_value, "ci95": fisher_interval(r_value, len(va)), "n": len(va)}
        da.append(va - va.mean())
        db.append(vb - vb.mean())
    da, db = np.concatenate(da), np.concatenate(db)
    pooled = float(stats.pearsonr(da, db).statistic) if np.ptp(da) and np.ptp(db) else np.nan
    effective = len(da) - (len(keys) - 1)
    return {"per_structure": per, "pooled": {"r": pooled, "ci95": fisher_interval(pooled, effective),
                                             "n": int(len(da))}}


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


def run_sweep(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> str:
    """The sweep of moe_grok/configs/verify_theory.py: every structure x router scale x top-k x router seed.

    Writes results.csv, results.json and theory.png to config.out; returns the correlation text."""
    base = SyntheticConfig.from_config(config.synthetic)
    structures = [(int(k), float(s)) for k in config.sweep.n_clusters for s in config.sweep.spreads]
    rows = sweep_synthetic(base, structures, range(config.sweep.router_seeds),
                           [float(s) for s in config.sweep.router_scales], mesh=mesh,
                           top_ks=[int(k) for k in config.sweep.get("top_ks", (0,))])
    corr = correlations(rows)
    os.makedirs(config.out, exist_ok=True)
    with atomic_files.open_aside(os.path.join(config.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    strict_json.dump({"base_config": dataclasses.asdict(base), "runs": rows, "correlations": corr},
                     os.path.join(config.out, "results.json"), indent=1)
    save_plots(rows, corr, os.path.join(config.out, "theory.png"))
    return (f"Correlations over runs:\n{format_correlations(corr)}\n"
            f"wrote {config.out}/results.csv, results.json, theory.png")
