"""The toy protocol of docs/protocol.md: every arm over every seed, analysis, tables and figures."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from moe_grok import strict_json
from moe_grok.report.files import read_summary
from moe_grok.studies import protocol_stats, toy_run
from moe_grok.training import multiseed

ANALYSIS_THREADS = 8  # seeds analysed concurrently (each analysis is one seed's own directory)
QUANTITIES = protocol_stats.quantities()  # (key of seed_measurements, label, criterion side or "")


def _seed_config(arm: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    config = arm.copy_and_resolve_references()
    config.train.seed = seed
    return config


def _read_reports(seed_dir: str, positions: tuple[str, ...]) -> dict[str, dict]:
    reports = {}
    for index, name in enumerate(positions):
        subdir = "report" if index == 0 else os.path.join("report", f"positions_{name}")
        reports[name] = read_summary(os.path.join(seed_dir, "analysis", subdir, "summary.json"))
    return reports


def analyse_seeds(arm: ml_collections.ConfigDict, seeds: list[int], seed_dirs: list[str],
                  plot_seed: int | None = None) -> tuple[float, float, int]:
    """Analyse trained seeds of an arm, in parallel threads (each writes its own directory's report;
    plots for `plot_seed` only). Returns (start, end) in seconds since the epoch and the process id."""
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(min(len(seeds), ANALYSIS_THREADS)) as pool:  # as training does
        list(pool.map(lambda seed, seed_dir: toy_run.analyze_run(_seed_config(arm, seed), seed_dir, progress=False,
                                                                 with_plots=seed == plot_seed), seeds, seed_dirs))
    return started, time.time(), os.getpid()


def analyse_arm(arm: ml_collections.ConfigDict, seeds: list[int], seed_dirs: list[str]) -> dict[str, Any]:
    """Analyse each trained seed of an arm (seeds in parallel threads) and aggregate across seeds:
    {"analysis_seconds", "analysis_processes", "analysis_shares", "positions": {view: per-seed measurements,
    summary, verdicts, Table 1}}."""
    started, ended, _ = analyse_seeds(arm, seeds, seed_dirs, plot_seed=seeds[0])
    return summarize_arm(arm, seed_dirs, ended - started, processes=1, shares=[seeds])


def summarize_arm(arm: ml_collections.ConfigDict, seed_dirs: list[str], analysis_seconds: float,
                  processes: int, shares: list[list[int]]) -> dict[str, Any]:
    """analyse_arm's result from the seeds' reports on disk (`shares`: the seeds of each analysis task,
    `processes`: how many processes ran them)."""
    positions = tuple(arm.analysis.positions)
    reports: dict[str, list] = {p: [] for p in positions}
    for seed_dir in seed_dirs:
        for p, report in _read_reports(seed_dir, positions).items():
            reports[p].append(report)
    result = {"analysis_seconds": analysis_seconds, "analysis_processes": processes, "analysis_shares": shares,
              "positions": {}}
    for p, seed_reports in reports.items():
        per_seed = [protocol_stats.seed_measurements(r) for r in seed_reports]
        summary = {key: protocol_stats.mean_ci([m[key] for m in per_seed]) for key, _, _ in QUANTITIES}
        result["positions"][p] = {
            "per_seed": per_seed, "summary": summary,
            "per_seed_domains": [protocol_stats.seed_domain_facts(r) for r in seed_reports],
            "verdicts": {key: protocol_stats.verdict(summary[key], side) for key, _, side in QUANTITIES if side},
            "table1": protocol_stats.table1_across_seeds(seed_reports),
            "test_accuracy": [r["domains"][d]["curves"].get("test_accuracy") for r in seed_reports
                              for d in r["domains"]],
            "steps": seed_reports[0]["steps"]}
    return result


def _start_analysis_process() -> None:
    """Initializer of the analysis process: JAX there grows its device memory as needed instead of
    reserving most of an accelerator, which the training process has already done."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


class _AnalysisQueue:
    """Arm analyses run one after another, in `processes` separate (spawned) processes unless
    `in_process`, so that arm k's analysis, which is mostly Python, runs while arm k+1 trains and the
    two share the cores; an arm's seeds are dealt over the processes (each runs its share in threads:
    threads of one process share one GIL). A failed analysis raises RuntimeError naming its arm, at
    the next check() or results(); the training done so far and the analysis caches stay on disk, so
    a re-run resumes. The processes start fresh: JAX settings reach them as environment variables
    (JAX_...), not through jax.config.update in this process."""

    def __init__(self, in_process: bool, processes: int = 1):
        if processes < 1:
            raise ValueError(f"analysis_processes must be >= 1, got {processes}")
        self._processes = processes
        self._pool = None if in_process else concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn"),  # fork is unsafe once JAX runs threads
            initializer=_start_analysis_process)
        self._pending: dict[str, tuple] = {}  # name -> (futures, arm, seed_dirs, seed shares)
        self._results: dict[str, dict[str, Any]] = {}

    def submit(self, name: str, arm: ml_collections.ConfigDict, seeds: list[int], seed_dirs: list[str]) -> None:
        self.check()
        if self._pool is None:  # run now; a finished future carries analyse_seeds' result or the error
            future = concurrent.futures.Future()
            try:
                future.set_result(analyse_seeds(arm, seeds, seed_dirs, plot_seed=seeds[0]))
            except Exception as error:
                future.set_exception(error)
            futures, shares = [future], [seeds]
        else:
            tasks = range(min(self._processes, len(seeds)))
            shares = [seeds[k::self._processes] for k in tasks]
            try:
                futures = [self._pool.submit(analyse_seeds, arm, shares[k], seed_dirs[k::self._processes], seeds[0])
                           for k in tasks]
            except concurrent.futures.process.BrokenProcessPool as error:
                raise RuntimeError(f"an analysis process died before arm {name!r} (its training is saved; "
                                   "re-run to resume)") from error
        self._pending[name] = futures, arm, seed_dirs, shares
        self.check()

    def _result(self, name: str) -> dict[str, Any]:
        if name not in self._results:
            futures, arm, seed_dirs, shares = self._pending[name]
            try:
                spans = [future.result() for future in futures]
            except Exception as error:
                raise RuntimeError(f"the analysis of arm {name!r} failed (its training is saved; re-run to "
                                   f"resume): {error!r}") from error
            seconds = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
            self._results[name] = summarize_arm(arm, seed_dirs, seconds, len({pid for _, _, pid in spans}), shares)
        return self._results[name]

    def check(self) -> None:
        """Raise the error of any analysis that has finished with one."""
        for name, (futures, *_) in self._pending.items():
            for future in futures:
                if future.done() and future.exception() is not None:
                    self._result(name)

    def results(self) -> dict[str, dict[str, Any]]:
        """Every submitted arm's analysis, in submission order (waits for them)."""
        return {name: self._result(name) for name in self._pending}

    def close(self, wait: bool) -> None:
        """Shut the analysis processes down: after their queue when `wait`, else at once (after an error
        or Ctrl-C; the checkpoints it analysed to the end are cached)."""
        if self._pool is None:
            return
        if not wait:
            for process in list(self._pool._processes.values()):  # no public terminate before Python 3.14
                process.terminate()
        self._pool.shutdown(wait=wait, cancel_futures=True)


def _cell(summary: dict) -> str:
    if summary["n"] == 0:
        return "n/a"
    low, high = summary["ci95"]
    interval = f" [{low:+.3g}, {high:+.3g}]" if np.isfinite(low) else ""
    return f"{summary['mean']:+.3g}{interval} (n={summary['n']})"


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
            out[f"{arm}: H1 ({metric})"] = h1
            out[f"{arm}: H2 ({metric})"] = v[f"h2_{metric}_margin_over_loss"]
        if len(r["positions"][positions]["per_seed"]) and "mixture" in arm:
            spread = [m["onset_spread_checkpoints"] for m in r["positions"][positions]["per_seed"]]
            wide = np.mean([np.isfinite(s) and s >= 3 for s in spread])  # share of ALL seeds
            for metric in protocol_stats.METRICS:
                alignment = v[f"h3_{metric}_alignment"]
                out[f"{arm}: H3 ({metric})"] = ("confirmed" if alignment == "confirmed" and wide >= 0.5 else
                                               "refuted" if alignment == "refuted" else "inconclusive")
    return out


def markdown(results: dict[str, Any]) -> str:
    """The generated results page: per routing view, every quantity per arm, the verdicts, Table 1."""
    arms = list(results["arms"])
    lines = [f"# Toy protocol ({results['name']}): generated results", "",
             f"Generated by `{results['command']}` on {results['date']} ({results['minutes']:.1f} min). "
             "Cells: mean [95% CI] (n = seeds with a value). docs/protocol.md defines every quantity.", ""]
    views = sorted({p for r in results["arms"].values() for p in r["positions"]},
                   key=lambda p: (p != "all", p))
    for positions in views:
        view = "all tokens (the paper)" if positions == "all" else f"{positions} positions"
        lines += [f"## Routing averaged over {view}",
                  "", "| quantity | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for key, label, _ in QUANTITIES:
            cells = [_cell(results["arms"][a]["positions"][positions]["summary"][key])
                     if positions in results["arms"][a]["positions"] else "" for a in arms]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Verdicts (criteria of docs/protocol.md):", ""]
        lines += [f"- {name}: **{verdict}**" for name, verdict in hypothesis_verdicts(results, positions).items()]
        lines += ["", "Table 1 across seeds (windowed Pearson r with test accuracy; mean [95% CI]):", "",
                  "| row | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        rows = next(iter(results["arms"].values()))["positions"][positions]["table1"]
        for row in rows:
            cells = [_cell(results["arms"][a]["positions"][positions]["table1"][row]["pearson_r"])
                     if positions in results["arms"][a]["positions"] else "" for a in arms]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _per_seed_tables(results)
    overlapped = (", in separate processes beside the next arm's training if any"
                  if results.get("analysis_process") else "")
    lines += [f"Time per arm (training of all seeds together; analysis of every seed{overlapped}):", ""]
    lines += [f"- {a}: training {r['train_seconds'] / 60:.1f} min, analysis {r['analysis_seconds'] / 60:.1f} min"
              for a, r in results["arms"].items()]
    return "\n".join(lines) + "\n"


def _per_seed_tables(results: dict[str, Any]) -> list[str]:
    """Seed by seed and domain by domain (the all-token view where there is one): test onset,
    calibrated eps, pairs."""
    lines = ["## Seed by seed", "",
             "Per domain: test onset (first checkpoint from which test accuracy stays > 0.9; `none` with the "
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


def plot_accuracy(results: dict[str, Any], path: str) -> str:
    """Test accuracy of every seed (and domain) per arm."""
    arms = results["arms"]
    fig = Figure(figsize=(4.2 * len(arms), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(arms)))
    for ax, (name, r) in zip(axes, arms.items(), strict=True):
        view = r["positions"]["all"] if "all" in r["positions"] else next(iter(r["positions"].values()))
        for curve in view["test_accuracy"]:
            if curve is not None:
                ax.plot(view["steps"], curve, alpha=0.5)
        ax.set_title(f"{name}: test accuracy, every seed", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_effects(results: dict[str, Any], path: str) -> str:
    """The H1 and H2 quantities per arm with their 95% CIs (all-token routing), one panel per
    quantity so that each keeps its own scale."""
    keys = [(k, label) for k, label, side in QUANTITIES if side and not k.startswith("h3")]
    arms = {name: r["positions"]["all"]["summary"] for name, r in results["arms"].items() if "all" in r["positions"]}
    columns = -(-len(keys) // 2)
    fig = Figure(figsize=(3.4 * columns, 6.0))
    axes = np.atleast_1d(fig.subplots(2, columns)).ravel()
    colors = [f"C{i}" for i in range(len(arms))]
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes, keys, strict=False):
        means = np.array([summary[key]["mean"] for summary in arms.values()], float)
        ci = np.array([summary[key]["ci95"] for summary in arms.values()], float).reshape(-1, 2)
        x = np.arange(len(arms))
        ax.bar(x, np.nan_to_num(means), color=colors)
        ax.errorbar(x, means, yerr=np.abs(ci.T - means), fmt="none", ecolor="k", capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, list(arms), fontsize=7, rotation=30)
        ax.set_title(label, fontsize=7, wrap=True)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("H1 / H2 quantities per arm: mean and 95% CI across seeds (all-token routing)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def arm_seeds(config: ml_collections.ConfigDict, arm: str) -> list[int]:
    """Seeds 0..n-1 of an arm: config.seeds_per_arm[arm] when > 0, else config.seeds."""
    n = config.seeds_per_arm.get(arm, 0) or config.seeds
    if n < 1:
        raise ValueError(f"arm {arm!r}: seeds must be >= 1, got {n}")
    return list(range(n))


def run(config: ml_collections.ConfigDict, workdir: str, command: str = "", progress: bool = True) -> dict:
    """Every arm of config.arms over seeds 0..config.seeds-1; writes results.json,
    <config.name>_results.md and figures <config.name>_{accuracy,effects}.png to workdir (and to
    config.docs_dir when set). Each arm's analysis runs in config.analysis_processes spawned
    processes while the next arm trains (in this process, after its own training, when
    config.analysis_process is False); a script that calls this must do so under
    `if __name__ == "__main__":`, since the spawned processes import the script's module. Returns the
    results."""
    started = time.time()
    os.makedirs(workdir, exist_ok=True)
    results: dict[str, Any] = {"arms": {}, "name": config.name, "command": command,
                               "date": time.strftime("%Y-%m-%d"), "analysis_process": config.analysis_process}
    analyses = _AnalysisQueue(in_process=not config.analysis_process, processes=config.analysis_processes)
    try:
        for name, arm in config.arms.items():
            seeds = arm_seeds(config, name)
            arm_started = time.time()
            seed_dirs = multiseed.train(arm, os.path.join(workdir, name), seeds, progress=progress,
                                        callbacks=toy_run.analysis_cache_callbacks(arm))
            results["arms"][name] = {"seeds": seeds, "seed_dirs": seed_dirs, "train_seconds": time.time() - arm_started}
            analyses.submit(name, arm, seeds, seed_dirs)
        for name, analysis in analyses.results().items():
            results["arms"][name].update(analysis)
    except BaseException:
        analyses.close(wait=False)
        raise
    analyses.close(wait=True)
    results["minutes"] = (time.time() - started) / 60
    strict_json.dump(results, os.path.join(workdir, "results.json"), indent=1)
    name = config.name
    page = markdown(results)
    with open(os.path.join(workdir, f"{name}_results.md"), "w") as f:
        f.write(page)
    figures = [plot_accuracy(results, os.path.join(workdir, f"{name}_accuracy.png")),
               plot_effects(results, os.path.join(workdir, f"{name}_effects.png"))]
    if config.docs_dir:
        os.makedirs(os.path.join(config.docs_dir, "figures"), exist_ok=True)
        with open(os.path.join(config.docs_dir, f"{name}_results.md"), "w") as f:
            f.write(page.replace(workdir + "/", ""))
        for figure in figures:
            shutil.copy(figure, os.path.join(config.docs_dir, "figures", os.path.basename(figure)))
    return results
