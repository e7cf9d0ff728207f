"""The whole experiment, shared by the toy runs and OLMoE: checkpoint stats -> analysis -> report."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moe_grok import atomic_files, strict_json
from moe_grok.analysis.analyze import analyze
from moe_grok.analysis.checkpoint_scalars import checkpoint_scalars
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.analysis.test_results import TestResults, test_results_from_split
from moe_grok.checkpoints import run_artifact
from moe_grok.checkpoints.cache import collect_checkpoint_stats
from moe_grok.checkpoints.sources import CheckpointSource
from moe_grok.data.splits import EvalSplit
from moe_grok.locking import DirectoryLock
from moe_grok.report.files import write_report
from moe_grok.writers.tensorboard import TensorBoardWriter

# Not train.lock, so an out_dir that is also a training workdir neither blocks nor is blocked by training.
LOCK_FILE = "analysis.lock"
RUN_CONFIG_FILE = "config.json"  # the resolved configuration of the run that analysed out_dir
REPORT_DIR = "report"  # out_dir/report: the first positions' report; report/positions_<name>: the others
TENSORBOARD_DIR = "tensorboard"  # out_dir/tensorboard: each checkpoint's scalars (analysis.checkpoint_scalars)


@contextlib.contextmanager
def _out_dir_lock(out_dir: str):
    """The writer lock on out_dir, held by process 0 only: it alone writes cache entries and moves
    corrupt ones aside, and on a shared filesystem the other processes would be refused. Every
    process learns whether process 0 got it, so that none goes on into the collective extraction
    alone."""
    with contextlib.ExitStack() as held:
        refusal = None
        if jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
            try:
                held.enter_context(DirectoryLock(out_dir, LOCK_FILE, activity="analyzed", directory_kind="out_dir"))
            except RuntimeError as error:
                refusal = error
        if jax.process_count() > 1:
            refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
            if refused and refusal is None:
                refusal = RuntimeError(f"{out_dir} is being analyzed by another process (process 0 could not take "
                                       f"{os.path.join(out_dir, LOCK_FILE)})")
        if refusal is not None:
            raise refusal
        yield


def run_pipeline(sources: Sequence[CheckpointSource], splits: dict[str, EvalSplit], out_dir: str,
                 train_split: str = "train", test: TestResults | None = None, test_split: str | None = None,
                 held_out_split: str | None = None, validation_split: str | None = None,
                 train_embeddings: np.ndarray | None = None,
                 test_embeddings: np.ndarray | None = None, options: AnalysisOptions | None = None,
                 batch_size: int = 32, mesh=None, progress: bool = True, with_plots: bool = True,
                 run_config: dict[str, Any] | None = None, data_notes: Sequence[str] = (),
                 tensorboard: bool = True, artifact_path: str | None = None,
                 artifact_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stats per checkpoint (cached in out_dir/cache), the analysis, and its files.

    out_dir is locked (out_dir/analysis.lock) for the whole run: a second analysis of it raises
    RuntimeError naming the holder's pid. The test side comes from `test` (e.g. user CSVs) or,
    when None, from `test_split` evaluated at every checkpoint (its per-sample correctness gives
    the Test@ groups).
    held_out_split (default: test_split) holds the held-out control samples. One report per
    entry of options.positions: the first in out_dir/report, the others in
    out_dir/report/positions_<name>, written as one directory aside and swapped in whole (nothing
    of an earlier report stays). Returns the first. options: default AnalysisOptions().
    run_config: the run's resolved configuration (JSON-able), recorded as out_dir/config.json
    (strict JSON) under the lock, before any checkpoint is read.
    data_notes: facts about the input data that every report lists among its warnings (e.g. repeated
    samples, whose copies sit at pathway distance 0 from each other).
    tensorboard: write each checkpoint's scalars (analysis.checkpoint_scalars: per split loss, accuracy,
    routing entropy, pathway length) at its step to out_dir/tensorboard, replacing the event files there,
    once every checkpoint is read (`tensorboard --logdir out_dir`).
    artifact_path: also write the run's compact artifact there (checkpoints.run_artifact: everything the
    analysis read, with artifact_config, the run's resolved configuration), from which `rederive` gives
    these reports back without the checkpoints.
    """
    options = options or AnalysisOptions()
    held_out_split = held_out_split or test_split
    for name in (train_split, test_split, held_out_split, validation_split):
        if name is not None and name not in splits:
            raise ValueError(f"no split {name!r}; splits are {sorted(splits)}")
    if test is not None:
        test.check(splits[train_split].group_names, len(sources))
        if artifact_path:
            raise ValueError("an artifact stores the test side as a test split's correctness: give test_split, "
                             "not test results, or no artifact_path")
    with _out_dir_lock(out_dir):
        if run_config is not None and jax.process_index() == 0:
            strict_json.dump(run_config, os.path.join(out_dir, RUN_CONFIG_FILE), indent=2, sort_keys=True)
        stats = collect_checkpoint_stats(sources, splits, os.path.join(out_dir, "cache"), batch_size, mesh, progress)
        if tensorboard and jax.process_index() == 0:
            _write_scalars(stats, splits, options, os.path.join(out_dir, TENSORBOARD_DIR))
        reports = analyze_stats(stats, splits, train_split, test, test_split, held_out_split, validation_split,
                                train_embeddings, test_embeddings, options, data_notes)
        if jax.process_index() == 0:
            write_reports(reports, options.positions, out_dir, with_plots)
            if artifact_path:
                roles = {"train_split": train_split, "test_split": test_split, "held_out_split": held_out_split,
                         "validation_split": validation_split}
                run_artifact.write_artifact(artifact_path, stats, splits, roles, options,
                                            {"train": train_embeddings, "test": test_embeddings}, data_notes,
                                            artifact_config)
    return reports[0]


def rederive(artifact_path: str, out_dir: str, option_overrides: dict[str, Any] | None = None,
             with_plots: bool = False) -> dict[str, dict[str, Any]]:
    """The reports of the run whose artifact (checkpoints.run_artifact) is at `artifact_path`, derived
    again from it alone (no checkpoint is read) and written to out_dir/report as `run_pipeline` writes
    them; with no `option_overrides` (AnalysisOptions field: value) they equal the run's own byte for
    byte. Returns {positions: report} for each options.positions entry, in their order. Only runs whose
    test side came from a test split can be re-derived (user-supplied test results are not stored)."""
    inputs = run_artifact.read_artifact(artifact_path, option_overrides)
    roles = inputs.roles
    reports = analyze_stats(inputs.stats, inputs.splits, roles["train_split"], None, roles["test_split"],
                            roles["held_out_split"], roles["validation_split"], inputs.embeddings["train"],
                            inputs.embeddings["test"], inputs.options, inputs.data_notes)
    write_reports(reports, inputs.options.positions, out_dir, with_plots)
    return dict(zip(inputs.options.positions, reports, strict=True))


def _write_scalars(stats, splits: dict[str, EvalSplit], options: AnalysisOptions, logdir: str) -> None:
    """Every checkpoint's scalars as one event file in `logdir`, written whole; earlier event files removed."""
    TensorBoardWriter(logdir, history=checkpoint_scalars(stats, splits, options)).close()


def analyze_stats(stats: Sequence[CheckpointStats], splits: dict, train_split: str = "train",
                  test: TestResults | None = None, test_split: str | None = None, held_out_split: str | None = None,
                  validation_split: str | None = None, train_embeddings: np.ndarray | None = None,
                  test_embeddings: np.ndarray | None = None, options: AnalysisOptions | None = None,
                  data_notes: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The reports of `run_pipeline` from per-checkpoint statistics already at hand (sorted by
    step), one per entry of options.positions; arguments as run_pipeline's. `splits` are EvalSplits
    or anything with `group_names`, `rows(domain)` and `len()` (e.g. monitor.probes.ProbeSet)."""
    options = options or AnalysisOptions()
    stats = list(stats)
    held_out_split = held_out_split or test_split
    if test is None and test_split is not None:
        test = test_results_from_split(stats, test_split, splits[test_split], test_embeddings)
    reports = []
    for positions in options.positions:
        report = analyze(stats, splits, train_split, test, held_out_split, validation_split, train_embeddings,
                         options, positions)
        report["checkpoints"] = [s.name for s in stats]
        report["warnings"] = [*data_notes, *report.get("warnings", [])]
        reports.append(report)
    return reports


def write_reports(reports: list[dict[str, Any]], positions: Sequence[str], out_dir: str, with_plots: bool) -> None:
    """out_dir/report (the first report) with its sub-reports report/positions_<name>, as one
    directory built aside and swapped in whole (atomic_files.directory_aside): a kill or a full
    disk (WriteError naming the file) leaves the previous complete report tree, and a sub-report
    of an earlier run with other positions never stays beside the new report."""
    report_dir = os.path.join(out_dir, REPORT_DIR)
    atomic_files.remove_stale_temporaries(out_dir, prefix=REPORT_DIR + ".")  # left by a killed run
    with atomic_files.directory_aside(report_dir) as staging:
        for index, (report, name) in enumerate(zip(reports, positions, strict=True)):
            write_report(report, staging if index == 0 else os.path.join(staging, f"positions_{name}"), with_plots)
