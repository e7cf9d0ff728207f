"""Checkpoint analysis: the paper's experiment as a library, shared by the toy task and OLMoE.

1. `collect_checkpoint_stats`: for each checkpoint, one pass per data split gives every
   sample's loss, correctness and token-mean routing weights (extraction.extract_dataset);
   results are cached per checkpoint (atomic .npz) so an interrupted run resumes and never
   recomputes finished checkpoints.
2. `analyze`: per data group, memorization steps of training samples (SPEC rule, eps
   calibrated per group), the group's pathway distance and consistency on its memorized
   samples at every checkpoint, test-accuracy onset, grokking delay, and correlations of
   each metric (and of train loss) with test accuracy after the sustained rise.
3. `write_report`: summary.json, per_checkpoint.csv, table.csv and PNG plots.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moe_grok import grokking, metrics, pathways
from moe_grok.config import MoEConfig
from moe_grok.extraction import extract_dataset, make_extractor
from moe_grok.model import router_matrices

STAT_FIELDS = ("mean_weights", "loss", "correct")


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """One checkpoint: its training step, a display name, and a loader -> (MoEConfig, params)."""

    step: int
    name: str
    load: Callable[[], tuple[MoEConfig, Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class EvalSplit:
    """Samples to run through every checkpoint. Arrays are [N, S] except groups [N].

    target_mask marks the positions whose prediction is scored (loss / correct); groups
    index into group_names.
    """

    tokens: np.ndarray
    mask: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray
    groups: np.ndarray
    group_names: tuple[str, ...]

    def __post_init__(self):
        n = len(self.tokens)
        if n == 0:
            raise ValueError("an evaluation split has no samples")
        for name in ("mask", "targets", "target_mask"):
            if getattr(self, name).shape != self.tokens.shape:
                raise ValueError(f"{name} shape {getattr(self, name).shape} != tokens shape {self.tokens.shape}")
        if self.groups.shape != (n,):
            raise ValueError(f"groups shape {self.groups.shape} != ({n},)")
        counts = np.bincount(self.groups, minlength=len(self.group_names))
        if len(counts) > len(self.group_names):
            raise ValueError(f"group ids up to {len(counts) - 1} but only {len(self.group_names)} group names")
        empty = [self.group_names[g] for g in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"empty group(s) {empty}: every group needs at least one sample")

    def fingerprint(self) -> str:
        digest = hashlib.sha1()
        for array in (self.tokens, self.mask, self.targets, self.target_mask, self.groups):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(json.dumps(self.group_names).encode())
        return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class CheckpointStats:
    """What one checkpoint gives: per split {mean_weights [N, L, E], loss [N], correct [N]},
    and the router matrices [L, E, D] (float32) for pathway consistency."""

    step: int
    name: str
    splits: dict[str, dict[str, np.ndarray]]
    router: np.ndarray


def parse_checkpoint_spec(spec: str) -> tuple[str, str | None, int]:
    """"repo@revision" or a local path -> (path_or_repo, revision, step).

    The step comes from an explicit "=STEP" suffix, else from "step{S}" in the revision
    (OLMoE's "step245000-tokens1027B") or the directory name.
    """
    spec, _, explicit = spec.partition("=")
    path_or_repo, _, revision = spec.partition("@")
    if explicit:
        return path_or_repo, revision or None, int(explicit)
    found = re.search(r"step(\d+)", revision or os.path.basename(os.path.normpath(path_or_repo)))
    if found is None:
        raise ValueError(f"cannot tell the training step of checkpoint {spec!r}: name it 'step<N>...' "
                         f"or append '=<step>'")
    return path_or_repo, revision or None, int(found.group(1))


def hf_checkpoint_sources(specs: Sequence[str], dtype="bfloat16", mesh=None) -> list[CheckpointSource]:
    """CheckpointSources for HF checkpoints ("allenai/OLMoE-1B-7B-0924@step245000-tokens1027B",
    "/ckpts/step5000", "/ckpts/latest=1100000"). Loading (and any hub download) happens lazily,
    one checkpoint at a time, inside collect_checkpoint_stats."""
    from moe_grok.convert import load_hf

    sources = []
    for spec in specs:
        path_or_repo, revision, step = parse_checkpoint_spec(spec)
        sources.append(CheckpointSource(step, spec, lambda p=path_or_repo, r=revision: load_hf(p, r, dtype, mesh)))
    return sources


def _cache_path(cache_dir: str, step: int) -> str:
    return os.path.join(cache_dir, f"step_{step:010d}.npz")


def _load_cached(path: str, fingerprints: dict[str, str], source: CheckpointSource
                 ) -> tuple[CheckpointStats, dict] | None:
    """(stats, architecture) from a cache file made for the same data, else None."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        if json.loads(str(data["fingerprints"])) != fingerprints:
            return None  # cached for other data: recompute
        splits = {split: {f: data[f"{split}/{f}"] for f in STAT_FIELDS} for split in fingerprints}
        stats = CheckpointStats(source.step, source.name, splits, data["router"])
        return stats, json.loads(str(data["architecture"]))


def _save_cached(path: str, stats: CheckpointStats, fingerprints: dict[str, str], architecture: dict) -> None:
    """Process 0 writes (multi-host runs need the cache directory on a shared filesystem)."""
    import jax

    if jax.process_index() != 0:
        return
    arrays = {f"{split}/{f}": v[f] for split, v in stats.splits.items() for f in STAT_FIELDS}
    tmp = path + ".tmp.npz"
    np.savez(tmp, router=stats.router, fingerprints=json.dumps(fingerprints),
             architecture=json.dumps(architecture), name=stats.name, **arrays)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache file


def collect_checkpoint_stats(sources: Sequence[CheckpointSource], splits: dict[str, EvalSplit], cache_dir: str,
                             batch_size: int = 32, mesh=None, progress: bool = True) -> list[CheckpointStats]:
    """Run every split through every checkpoint (cached per checkpoint). Sorted by step.

    Raises ValueError if a checkpoint's architecture differs from the first one's; the
    checkpoints finished before it stay cached on disk.
    """
    if not sources:
        raise ValueError("no checkpoints given")
    steps = [s.step for s in sources]
    if len(set(steps)) != len(steps):
        raise ValueError(f"duplicate checkpoint steps: {sorted(steps)}")
    os.makedirs(cache_dir, exist_ok=True)
    fingerprints = {name: split.fingerprint() for name, split in splits.items()}
    reference_arch, reference_name, extractor = None, None, None
    results = []
    for source in tqdm(sorted(sources, key=lambda s: s.step), desc="checkpoints", disable=not progress):
        path = _cache_path(cache_dir, source.step)
        cached = _load_cached(path, fingerprints, source)
        if cached is None:
            config, params = source.load()
            arch = config.architecture()
        else:
            stats, arch = cached
        if reference_arch is None:
            reference_arch, reference_name = arch, source.name
        elif arch != reference_arch:
            diff = {k: (reference_arch.get(k), arch[k]) for k in arch if arch[k] != reference_arch.get(k)}
            raise ValueError(f"checkpoint {source.name} (step {source.step}) differs in architecture from "
                             f"{reference_name}: {diff}; finished checkpoints stay cached in {cache_dir}")
        if cached is not None:
            results.append(stats)
            continue
        extractor = extractor or make_extractor(config, mesh)
        per_split = {}
        for split_name, split in splits.items():
            if split.tokens.shape[1] > config.max_seq_len:
                raise ValueError(f"split {split_name!r} has sequences of {split.tokens.shape[1]} tokens, longer than "
                                 f"the model's limit {config.max_seq_len}; truncate them (seq_len flag)")
            out = extract_dataset(config, params, split.tokens, split.mask, split.targets, split.target_mask,
                                  batch_size=batch_size, mesh=mesh, extractor=extractor,
                                  progress=f"step {source.step} {split_name}" if progress else False)
            per_split[split_name] = {f: out[f] for f in STAT_FIELDS}
        stats = CheckpointStats(source.step, source.name, per_split, np.asarray(router_matrices(params), np.float32))
        _save_cached(path, stats, fingerprints, arch)
        results.append(stats)
        del params
    return results


# ----------------------------------------------------------------------------------------
# Per-group analysis
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    tau: float = 0.7
    delta: float = 0.05
    target_fraction: tuple[float, float] = (0.20, 0.25)
    eps: float | None = None  # fixed eps for every group instead of calibration
    distance_level: str = "char"
    distance_normalized: bool = False
    max_pairs: int | None = 2000
    seed: int = 0
    onset_threshold: float = 0.8


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


def plot_report(report: dict[str, Any], path: str) -> None:
    """Four panels vs step, one line per group: accuracies, train loss, pathway distance, consistency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    panels = [("accuracy", ("train_accuracy", "test_accuracy")), ("train loss (nats)", ("train_loss", "train_loss_memorized")),
              ("pathway edit distance (memorized)", ("pathway_distance",)),
              ("pathway consistency (memorized)", ("pathway_consistency",))]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
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
    plt.close(fig)


def run_pipeline(sources: Sequence[CheckpointSource], splits: dict[str, EvalSplit], out_dir: str,
                 train_split: str = "train", test_accuracy: dict[str, np.ndarray] | None = None,
                 test_split: str | None = None, options: AnalysisOptions = AnalysisOptions(),
                 batch_size: int = 32, mesh=None, progress: bool = True) -> dict[str, Any]:
    """The whole experiment: stats per checkpoint (cached in out_dir/cache), the per-group
    report, and its files in out_dir/report.

    Test accuracy per group and checkpoint comes either from `test_accuracy` (group ->
    [checkpoints], ordered like the sorted sources, e.g. from data.load_test_accuracy_csv)
    or from the correctness of a `test_split` evaluated at every checkpoint.
    """
    stats = collect_checkpoint_stats(sources, splits, os.path.join(out_dir, "cache"), batch_size, mesh, progress)
    train = splits[train_split]
    if test_split is not None:
        test = splits[test_split]
        test_accuracy = {name: np.array([s.splits[test_split]["correct"][test.groups == g].mean() for s in stats])
                         for g, name in enumerate(test.group_names)}
    if test_accuracy is not None:
        for name, acc in test_accuracy.items():
            if len(acc) != len(stats):
                raise ValueError(f"test accuracy of group {name!r} has {len(acc)} values for {len(stats)} checkpoints")
    report = analyze(stats, train_split, train.groups, train.group_names, test_accuracy, options)
    report["checkpoints"] = [s.name for s in stats]
    write_report(report, os.path.join(out_dir, "report"))
    return report
