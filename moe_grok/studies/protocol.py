"""The toy protocol of docs/protocol.md: every arm trained over every seed, each arm analysed in a process
queue beside the next arm's training, aggregated across seeds into results.json; protocol_pages writes
the results page and figures."""
from __future__ import annotations

import concurrent.futures
import copy
import multiprocessing
import os
import time
from typing import Any

import ml_collections

from moe_grok import pipeline, strict_json
from moe_grok.checkpoints import run_artifact
from moe_grok.report.files import read_summary
from moe_grok.studies import protocol_pages, protocol_stats, toy_run
from moe_grok.training import multiseed
from moe_grok.writers.progress import track

ANALYSIS_THREADS = 8  # seeds analysed concurrently (each analysis is one seed's own directory)
RESULTS_FILE = "results.json"
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
                  plot_seed: int | None = None, artifacts_dir: str | None = None) -> tuple[float, float, int]:
    """Analyse trained seeds of an arm, in parallel threads (each writes its own directory's report;
    plots for `plot_seed` only; each seed's artifact to artifacts_dir/seed_<k>.npz when artifacts_dir
    is set). Returns (start, end) in seconds since the epoch and the process id."""
    started = time.time()

    def analyse(seed: int, seed_dir: str) -> None:
        artifact = toy_run.artifact_path(artifacts_dir, seed) if artifacts_dir else None
        toy_run.analyze_run(_seed_config(arm, seed), seed_dir, progress=False, with_plots=seed == plot_seed,
                            artifact=artifact)

    with concurrent.futures.ThreadPoolExecutor(min(len(seeds), ANALYSIS_THREADS)) as pool:  # as training does
        list(pool.map(analyse, seeds, seed_dirs))
    return started, time.time(), os.getpid()


def analyse_arm(arm: ml_collections.ConfigDict, seeds: list[int], seed_dirs: list[str],
                plot_first_seed: bool = True) -> dict[str, Any]:
    """Analyse each trained seed of an arm (seeds in parallel threads) and aggregate across seeds:
    {"analysis_seconds", "analysis_processes", "analysis_shares", "positions": {view: per-seed measurements,
    summary, verdicts, Table 1}}. plot_first_seed: draw the report figures of the first seed."""
    started, ended, _ = analyse_seeds(arm, seeds, seed_dirs, plot_seed=seeds[0] if plot_first_seed else None)
    return summarize_arm(tuple(arm.analysis.positions), seed_dirs, ended - started, processes=1, shares=[seeds])


def summarize_arm(positions: tuple[str, ...], seed_dirs: list[str], analysis_seconds: float,
                  processes: int, shares: list[list[int]]) -> dict[str, Any]:
    """analyse_arm's result from the seeds' reports on disk (`positions`: the arm's analysis.positions,
    `shares`: the seeds of each analysis task, `processes`: how many processes ran them)."""
    reports: dict[str, list] = {p: [] for p in positions}
    for seed_dir in seed_dirs:
        for p, report in _read_reports(seed_dir, positions).items():
            reports[p].append(report)
    result = {"analysis_seconds": analysis_seconds, "analysis_processes": processes, "analysis_shares": shares,
              "positions": {}}
    for p, seed_reports in reports.items():
        per_seed = [protocol_stats.seed_measurements(r) for r in seed_reports]
        summary = {key: protocol_stats.summarize(key, [m[key] for m in per_seed]) for key, _, _ in QUANTITIES}
        result["positions"][p] = {
            "per_seed": per_seed, "summary": summary,
            "per_seed_domains": [protocol_stats.seed_domain_facts(r) for r in seed_reports],
            "verdicts": {key: protocol_stats.verdict(summary[key], side) for key, _, side in QUANTITIES if side},
            "table1": protocol_stats.table1_across_seeds(seed_reports),
            "window_sizes": protocol_stats.window_sizes(seed_reports),
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

    def __init__(self, in_process: bool, processes: int = 1, plot_first_seed: bool = True):
        if processes < 1:
            raise ValueError(f"analysis_processes must be >= 1, got {processes}")
        self._processes = processes
        self._plot_first_seed = plot_first_seed  # an arm's first seed draws its report figures
        self._pool = None if in_process else concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn"),  # fork is unsafe once JAX runs threads
            initializer=_start_analysis_process)
        self._pending: dict[str, tuple] = {}  # name -> (futures, arm, seed_dirs, seed shares)
        self._results: dict[str, dict[str, Any]] = {}

    def submit(self, name: str, arm: ml_collections.ConfigDict, seeds: list[int], seed_dirs: list[str],
               artifacts_dir: str | None = None) -> None:
        """Queue an arm's analysis (its seeds' artifacts to artifacts_dir when set, see analyse_seeds)."""
        self.check()
        plot_seed = seeds[0] if self._plot_first_seed else None
        if self._pool is None:  # run now; a finished future carries analyse_seeds' result or the error
            future = concurrent.futures.Future()
            try:
                future.set_result(analyse_seeds(arm, seeds, seed_dirs, plot_seed, artifacts_dir))
            except Exception as error:
                future.set_exception(error)
            futures, shares = [future], [seeds]
        else:
            tasks = range(min(self._processes, len(seeds)))
            shares = [seeds[k::self._processes] for k in tasks]
            try:
                futures = [self._pool.submit(analyse_seeds, arm, shares[k], seed_dirs[k::self._processes], plot_seed,
                                             artifacts_dir) for k in tasks]
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
            self._results[name] = summarize_arm(tuple(arm.analysis.positions), seed_dirs, seconds,
                                                len({pid for _, _, pid in spans}), shares)
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


def arm_seeds(config: ml_collections.ConfigDict, arm: str) -> list[int]:
    """Seeds 0..n-1 of an arm: config.seeds_per_arm[arm] when > 0, else config.seeds."""
    n = config.seeds_per_arm.get(arm, 0) or config.seeds
    if n < 1:
        raise ValueError(f"arm {arm!r}: seeds must be >= 1, got {n}")
    return list(range(n))


def run(config: ml_collections.ConfigDict, workdir: str, command: str = "", progress: bool = True) -> dict:
    """Every arm of config.arms over seeds 0..config.seeds-1; writes results.json, and through
    protocol_pages <config.name>_results.md and figures <config.name>_{accuracy,effects}.png, to
    workdir (the page and figures also to config.docs_dir and its figures/ when set). Every seed's
    analysis keeps its compact artifact in workdir/artifacts/<arm>/seed_<k>.npz, and the run ends by
    writing workdir/artifacts/manifest.json (with the run's record): `rederive` gives results.json,
    the pages and every seed's report back from them without training. Each arm's
    analysis runs in config.analysis_processes spawned processes while the next arm trains (in this
    process, after its own training, when config.analysis_process is False); a script that calls
    this must do so under `if __name__ == "__main__":`, since the spawned processes import the
    script's module. Returns the results."""
    started = time.time()
    os.makedirs(workdir, exist_ok=True)
    results: dict[str, Any] = {"arms": {}, "name": config.name, "command": command,
                               "date": time.strftime("%Y-%m-%d"), "analysis_process": config.analysis_process}
    if "registered" in config:  # round 4: the arms and metrics of its primary criterion
        results["registered"] = config.registered.to_dict()
    analyses = _AnalysisQueue(in_process=not config.analysis_process, processes=config.analysis_processes,
                              plot_first_seed=config.seed_plots)
    try:
        for name, arm in track(list(config.arms.items()), desc="protocol arms", unit="arm", enabled=progress):
            seeds = arm_seeds(config, name)
            arm_started = time.time()
            seed_dirs = multiseed.train(arm, os.path.join(workdir, name), seeds, progress=progress,
                                        callbacks=toy_run.analysis_cache_callbacks(arm))
            # seed_dirs relative to workdir: results.json, like the artifacts, stays valid where it is moved
            results["arms"][name] = {"seeds": seeds, "seed_dirs": [os.path.relpath(d, workdir) for d in seed_dirs],
                                     "train_seconds": time.time() - arm_started}
            analyses.submit(name, arm, seeds, seed_dirs, os.path.join(workdir, toy_run.ARTIFACTS_DIR, name))
        for name, analysis in analyses.results().items():
            results["arms"][name].update(analysis)
    except BaseException:
        analyses.close(wait=False)
        raise
    analyses.close(wait=True)
    results["minutes"] = (time.time() - started) / 60
    strict_json.dump(results, os.path.join(workdir, RESULTS_FILE), indent=1)
    run_artifact.write_manifest(os.path.join(workdir, toy_run.ARTIFACTS_DIR), _run_record(results))
    protocol_pages.write_pages(results, QUANTITIES, workdir, config.name, config.docs_dir)
    return results


def _run_record(results: dict[str, Any]) -> dict[str, Any]:
    """What results.json holds that the analysis does not derive (the run's name, command, date, seeds,
    seed directories and timings), kept in the artifacts' manifest for `rederive`."""
    record = copy.deepcopy(strict_json.to_strict(results))
    for arm in record["arms"].values():
        del arm["positions"]
    return {"kind": "protocol", "results": record}


def _summarize_from_disk(arm: dict[str, Any], positions: tuple[str, ...], workdir: str) -> dict[str, Any]:
    """An arm's "positions" in results.json, from its seeds' reports under workdir (summarize_arm) with the
    run's recorded timings and analysis shares."""
    seed_dirs = [os.path.join(workdir, d) for d in arm["seed_dirs"]]
    return summarize_arm(positions, seed_dirs, arm["analysis_seconds"], arm["analysis_processes"],
                         arm["analysis_shares"])["positions"]


def resummarize(workdir: str, registered: dict[str, Any] | None = None, docs_dir: str = "") -> dict:
    """results.json and the page with its figures aggregated again from a finished run's per-seed reports
    on disk (workdir/<arm>/seed_<k>/analysis/report: nothing is trained or analysed), by the current
    aggregation and page code; the run's facts (command, date, timings) are the run's. registered:
    replaces the run's registration (the config's `registered` block, e.g. with a key the run predates).
    Returns the results."""
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no finished protocol run in {workdir} (its results.json is written "
                                "when every arm is analysed)")
    results = strict_json.load(path)
    if registered is not None:
        results["registered"] = registered
    for arm in results["arms"].values():
        arm["positions"] = _summarize_from_disk(arm, tuple(arm["positions"]), workdir)
    strict_json.dump(results, path, indent=1)
    protocol_pages.write_pages(results, QUANTITIES, workdir, results["name"], docs_dir)
    return results


def rederive(artifacts_dir: str, workdir: str, option_overrides: dict[str, Any] | None = None,
             docs_dir: str = "", arms: list[str] | None = None) -> dict:
    """results.json, <name>_results.md with its figures, and every seed's report (workdir/<arm>/seed_<k>/
    analysis/report), derived again from a protocol run's artifacts (`run`'s workdir/artifacts) without
    training or reading a checkpoint; the page and figures also to docs_dir when set. The manifest's
    sizes and sha256 are checked first. With no option_overrides (AnalysisOptions field: value, applied
    to every seed) and every arm, results.json, the page and the reports equal the run's own byte for byte;
    the run's facts (command, date, timings) are the run's. arms: only these arms. Returns the results."""
    record = run_artifact.verify_manifest(artifacts_dir)["record"]
    if not record or record.get("kind") != "protocol":
        raise ValueError(f"{artifacts_dir} holds no protocol run's artifacts (its manifest has no protocol record)")
    results = copy.deepcopy(record["results"])
    if arms is not None:
        unknown = sorted(set(arms) - set(results["arms"]))
        if unknown:
            raise ValueError(f"no arm(s) {unknown} in {artifacts_dir}; arms are {list(results['arms'])}")
        results["arms"] = {name: arm for name, arm in results["arms"].items() if name in arms}
    os.makedirs(workdir, exist_ok=True)
    for name, arm in results["arms"].items():
        seed_dirs = [os.path.join(workdir, d) for d in arm["seed_dirs"]]
        reports = [pipeline.rederive(toy_run.artifact_path(os.path.join(artifacts_dir, name), seed),
                                     os.path.join(seed_dir, toy_run.ANALYSIS_DIR), option_overrides)
                   for seed, seed_dir in zip(arm["seeds"], seed_dirs, strict=True)]
        arm["positions"] = _summarize_from_disk(arm, tuple(reports[0]), workdir)
    strict_json.dump(results, os.path.join(workdir, RESULTS_FILE), indent=1)
    protocol_pages.write_pages(results, QUANTITIES, workdir, results["name"], docs_dir)
    return results
