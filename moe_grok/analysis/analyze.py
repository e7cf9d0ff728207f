"""The paper's analysis of checkpoint statistics, per data domain (docs/method.md defines every rule).

For each domain: eps calibrated on a grid so that 20-25% of its training samples are memorized
before the final checkpoint; Pretrain@t* groups of samples memorized at the same checkpoint,
every metric curve per group with a linear trend after t*; Test@t# groups from per-sample test
correctness; one-to-one pairing of Pretrain and Test groups (Hungarian) and the grokking delay
of each pair; Table 1 correlations with test accuracy over the window from the rise to
saturation; per-layer distance, the tau and (eps, delta) sweeps; and beside every metric its
controls: the same metric on held-out test samples and on random non-memorized training
samples, pathway length, routing entropy, cross-group distance, and partial correlations
controlling for entropy and pathway length.

The metrics are those of `analysis.registry`; `analyze` builds the report in the named steps below.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from moe_grok.analysis import grokking, groups, registry, statistics
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.analysis.memorization import memorization, memorized_rows
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.analysis.param_dynamics import dynamics_summary, parameter_dynamics
from moe_grok.analysis.run_warnings import RunWarnings
from moe_grok.analysis.set_metrics import Rows, SetMetrics, control_rows, memorized_set_and_controls, rows_at
from moe_grok.analysis.test_results import TestResults
from moe_grok.data.splits import EvalSplit

PER_LAYER_SETS = ("memorized", "held_out")  # sets whose per-layer distance is reported (Fig. 5)
DEFAULT_OPTIONS = AnalysisOptions()


@dataclasses.dataclass
class _Run:
    """The inputs and shared state of one analysis."""

    stats: list[CheckpointStats]
    splits: dict[str, EvalSplit]
    train_split: str
    held_out_split: str | None
    validation_split: str | None
    test: TestResults | None
    train_embeddings: np.ndarray | None
    options: AnalysisOptions
    engine: SetMetrics
    warnings: RunWarnings
    loss: np.ndarray  # [checkpoints, N_train] per-sample training loss (nats)
    train_correct: np.ndarray  # [checkpoints, N_train] share of scored positions predicted exactly

    @property
    def steps(self) -> np.ndarray:
        return self.engine.steps


def _curves_json(curves: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: np.asarray(v, np.float64).tolist() for k, v in curves.items()}


def _trends(steps: np.ndarray, curves: dict[str, np.ndarray], from_step: int) -> dict[str, dict]:
    """Linear trend (per 1,000 steps, 95% CI) of every curve on the checkpoints at or after from_step."""
    after = steps >= from_step
    return {name: grokking.linear_trend(steps[after], values[after]) for name, values in curves.items()}


def _correlations(curves: dict[str, np.ndarray], accuracy: np.ndarray, window: tuple[int, int]) -> dict[str, dict]:
    full = (window[0], len(accuracy) - 1) if window[0] >= 0 else window
    return {name: {"window": grokking.window_correlations(values, accuracy, *window),
                   "full": grokking.window_correlations(values, accuracy, *full)}
            for name, values in curves.items()}


def _partial(curves: dict[str, np.ndarray], accuracy: np.ndarray, window: tuple[int, int]) -> dict[str, dict]:
    """Partial correlation of every registered metric with `partial` set with test accuracy over
    the window's checkpoints where the metric and both controls are finite (a growing set is NaN
    while it holds fewer than 2 samples), controlling for the same set's routing entropy and pathway length."""
    start, end = window
    if start < 0:
        return {}
    part = slice(start, end + 1)
    controls = np.column_stack([curves["routing_entropy"][part], curves["pathway_length"][part]])
    out = {}
    for m in registry.partial_metrics():
        if m.name in curves:
            x = curves[m.name][part]
            keep = np.isfinite(x) & np.isfinite(controls).all(1)
            out[m.name] = statistics.partial_correlation(x[keep], accuracy[part][keep], controls[keep])
    return out


def _mean_over_set(values: np.ndarray, rows: Rows) -> np.ndarray:
    """[checkpoints] mean of values [checkpoints, N] over a set's rows at each checkpoint (NaN where a
    per-checkpoint set holds fewer than 2 samples, as its metrics)."""
    minimum = 2 if isinstance(rows, list) else 1
    return np.array([values[c, rows_at(rows, c)].mean() if rows_at(rows, c).size >= minimum else np.nan
                     for c in range(values.shape[0])])


# ------------------------------------------------------------------------------------------------
# The steps of one domain's entry
# ------------------------------------------------------------------------------------------------
def _domain_curves(run: _Run, domain: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Training loss / accuracy (and its moving average), validation loss and test accuracy of a domain;
    with options.step_baseline the training step itself (Table 1's baseline predictor)."""
    curves = {"train_loss": run.loss[:, rows].mean(1), "train_accuracy": run.train_correct[:, rows].mean(1)}
    if run.options.step_baseline:  # a monotone baseline: any monotone curve correlates with a monotone accuracy
        curves["training_step"] = run.steps.astype(np.float64)
    curves["train_loss_moving_average"] = grokking.moving_average(curves["train_loss"],
                                                                  run.options.loss_moving_average)
    validation = run.validation_split
    if validation is not None and domain in run.splits[validation].group_names:
        validation_rows = run.splits[validation].rows(domain)
        curves["validation_loss"] = np.array([s.splits[validation]["loss"][validation_rows].mean() for s in run.stats])
    accuracy = None if run.test is None else run.test.accuracy.get(domain)
    if accuracy is not None:
        curves["test_accuracy"] = np.asarray(accuracy, np.float64)
    return curves


def _held_out_pool(run: _Run, domain: str) -> np.ndarray:
    """Rows of the held-out split's samples of a domain (empty without a held-out split)."""
    split = run.held_out_split
    if split is not None and domain in run.splits[split].group_names:
        return run.splits[split].rows(domain)
    return np.zeros(0, int)


def _memorized_set_and_controls(run: _Run, domain: str, memorized: Rows, not_memorized: np.ndarray
                                ) -> tuple[dict[str, tuple[str, Rows]], dict[str, dict[str, np.ndarray]]]:
    """Table 1's memorized set (options.memorized_set) and its controls (same size at every
    checkpoint): ({set: (split, rows)}, {set: curves})."""
    sets = memorized_set_and_controls(domain, run.train_split, memorized, not_memorized, run.held_out_split,
                                      _held_out_pool(run, domain), run.options.seed)
    set_curves = {name: run.engine.set_curves(split, rows, "sets") for name, (split, rows) in sets.items()}
    if isinstance(memorized, list) or memorized.size:
        set_curves["memorized"]["train_loss"] = _mean_over_set(run.loss, memorized)
    return sets, set_curves


def _pretrain_groups(run: _Run, domain: str, rows: np.ndarray, t_star: np.ndarray, not_memorized: np.ndarray
                     ) -> tuple[list[groups.SampleGroup], dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """Pretrain@t* groups with their controls and trends after t*: (groups, report entries, every
    curve set measured, for the unbounded-consistency warning)."""
    steps, seed, train = run.steps, run.options.seed, run.train_split
    held_out_pool = _held_out_pool(run, domain)
    pretrain = groups.groups_by_step(t_star, rows, int(steps[-1]), groups.pretrain_group_name)
    entries, measured = {}, {}
    for group in pretrain:
        g_curves = run.engine.set_curves(train, group.rows, "pretrain_groups")
        g_curves["train_loss"] = run.loss[:, group.rows].mean(1)
        g_curves["train_accuracy"] = run.train_correct[:, group.rows].mean(1)
        controls = {"random_train": control_rows(np.setdiff1d(not_memorized, group.rows), group.rows.size, seed,
                                                 f"random_train/{group.name}")}
        if held_out_pool.size:
            controls["held_out"] = control_rows(held_out_pool, group.rows.size, seed, f"held_out/{group.name}")
        control_curves = {name: run.engine.set_curves(run.held_out_split if name == "held_out" else train, r,
                                                      "group_controls")
                          for name, r in controls.items()}
        cross = {"distance_to_random_train": run.engine.cross_distance(train, group.rows, train,
                                                                       controls["random_train"])}
        entry = {"step": group.step, "n": int(group.rows.size), "curves": _curves_json(g_curves),
                 "controls": {name: _curves_json(c) for name, c in control_curves.items()},
                 "cross": _curves_json(cross),
                 "trend_after_t_star": _trends(steps, g_curves, group.step),
                 "control_trends": {name: _trends(steps, c, group.step) for name, c in control_curves.items()}}
        if group.rows.size < 2:
            entry["note"] = "fewer than 2 samples: distances are NaN"
        entries[group.name] = entry
        measured[group.name] = g_curves
        measured.update({f"{group.name}/{name}": c for name, c in control_curves.items()})
    return pretrain, entries, measured


def _test_groups_and_pairs(run: _Run, domain: str, pretrain: list[groups.SampleGroup]) -> dict[str, Any]:
    """Test@t# groups from per-sample test correctness, their pairing with the Pretrain@ groups and the delays."""
    entry: dict[str, Any] = {"test_groups": {}, "pairs": []}
    if run.test is None or domain not in run.test.correct:
        return entry
    correct = run.test.correct[domain]
    onsets = grokking.generalization_onset(correct, run.steps, run.options.onset_threshold,
                                           run.options.max_later_errors)
    test_groups = groups.groups_by_step(onsets, np.arange(correct.shape[1]), None, groups.test_group_name)
    for group in test_groups:
        entry["test_groups"][group.name] = {"step": group.step, "n": int(group.rows.size),
                                            "accuracy": correct[:, group.rows].mean(1).tolist()}
    entry["n_test_never_generalized"] = int(np.sum(onsets == grokking.NEVER))
    test_embeddings = run.test.embeddings.get(domain)
    similarity = groups.similarity_matrix(pretrain, test_groups, run.train_embeddings, test_embeddings)
    entry["pairing_similarity"] = ("embeddings" if run.train_embeddings is not None and test_embeddings is not None
                                   else "domain (no embeddings: chronological order)")
    for i, j in groups.pair_groups(similarity):
        p, q = pretrain[i], test_groups[j]
        entry["pairs"].append({"pretrain": p.name, "test": q.name, "pretrain_step": p.step, "test_step": q.step,
                               "delay": q.step - p.step, "similarity": float(similarity[i, j])})
    return entry


def _table1(run: _Run, curves: dict[str, np.ndarray], set_curves: dict[str, dict[str, np.ndarray]],
            memorized: Rows, accuracy: np.ndarray) -> dict[str, Any]:
    """Table 1 over the correlation window (and the full range from its start), partial
    correlations, and the tau sweep (Appendix E.1)."""
    o, steps = run.options, run.steps
    window = grokking.correlation_window(accuracy, o.rise_fraction, o.saturation_fraction)
    entry: dict[str, Any] = {"test_onset_step": int(grokking.accuracy_onset(accuracy, steps, o.onset_threshold))}
    entry["window"] = {"start_step": int(steps[window[0]]) if window[0] >= 0 else -1,
                       "end_step": int(steps[window[1]]) if window[1] >= 0 else -1,
                       "n": int(window[1] - window[0] + 1) if window[0] >= 0 else 0}
    table = _correlations({k: v for k, v in curves.items() if k not in ("test_accuracy", "train_accuracy")},
                          accuracy, window)
    for name, set_curve in set_curves.items():
        for metric, values in _correlations(set_curve, accuracy, window).items():
            table[f"{name}/{metric}"] = values
    entry["table1"] = table
    entry["partial_correlations"] = {name: _partial(c, accuracy, window) for name, c in set_curves.items()}
    entry["tau_sweep"] = {
        str(tau): {"distance": [run.engine.distance(run.train_split, rows_at(memorized, c), c, o.distance_level,
                                                    o.distance_normalized, tau) for c in range(len(run.stats))]}
        for tau in o.tau_sweep}
    for values in entry["tau_sweep"].values():
        values["correlation"] = grokking.window_correlations(values["distance"], accuracy, *window)
    return entry


def _eps_delta_sweep(run: _Run, loss: np.ndarray, rows: np.ndarray, eps: float,
                     accuracy: np.ndarray | None, onset_step: int) -> list[dict]:
    """Appendix E.3: the memorized set (options.memorized_set) and its metrics for every (eps multiple,
    delta). loss: [checkpoints, n] the domain's training losses (nats); rows: their training-split rows;
    onset_step: the test onset (early Pretrain@t* groups; -1 = never)."""
    o, out = run.options, []
    window = (grokking.correlation_window(accuracy, o.rise_fraction, o.saturation_fraction)
              if accuracy is not None else (-1, -1))
    for delta in o.delta_sweep:
        for multiple in o.eps_sweep:
            delta_nats = grokking.effective_delta(delta, eps * multiple, o.delta_unit)
            t_star = grokking.memorization_steps(loss, run.steps, eps * multiple, delta_nats)
            before_end = (t_star >= 0) & (t_star < run.steps[-1])
            memorized = memorized_rows(t_star, rows, run.steps, o.memorized_set, onset_step, o.early_group_min_size)
            row = {"delta": delta, "delta_nats": delta_nats, "eps_multiple": multiple, "eps": eps * multiple,
                   "share_before_end": float(before_end.mean()), "n_groups": int(np.unique(t_star[before_end]).size),
                   "median_t_star": float(np.median(t_star[before_end])) if before_end.any() else float("nan")}
            if accuracy is not None:
                curves = run.engine.set_curves(run.train_split, memorized, "sweeps")
                for metric in ("distance", "consistency"):
                    row[f"{metric}_correlation"] = grokking.window_correlations(curves[metric], accuracy, *window)
            out.append(row)
    return out


def _domain_entry(run: _Run, domain: str) -> tuple[dict[str, Any], np.ndarray]:
    """(the report entry of one domain, its memorized training rows)."""
    rows = run.splits[run.train_split].rows(domain)
    entry: dict[str, Any] = {"n_train": int(rows.size)}
    entry["memorization"], t_star = memorization(domain, run.loss[:, rows], run.steps, run.options, run.warnings)
    before_end = (t_star >= 0) & (t_star < run.steps[-1])
    memorized, not_memorized = rows[before_end], rows[~before_end]

    curves = _domain_curves(run, domain, rows)
    entry["curves"] = _curves_json(curves)
    accuracy = curves.get("test_accuracy")
    o = run.options
    onset = grokking.grok_onset(accuracy, run.steps) if accuracy is not None else -1  # early groups' horizon
    table_rows = memorized_rows(t_star, rows, run.steps, o.memorized_set, onset, o.early_group_min_size)
    sets, set_curves = _memorized_set_and_controls(run, domain, table_rows, not_memorized)
    entry["memorized_set"] = o.memorized_set
    entry["sets"] = {}
    for name, (split, r) in sets.items():
        sizes = [int(rows_at(r, c).size) for c in range(len(run.stats))]
        entry["sets"][name] = {"split": split, "n": sizes[-1], "curves": _curves_json(set_curves[name])}
        if isinstance(r, list):
            entry["sets"][name]["n_per_checkpoint"] = sizes
    entry["per_layer_distance"] = {name: run.engine.per_layer_distance(split, r).tolist()
                                   for name, (split, r) in sets.items() if name in PER_LAYER_SETS}
    if memorized.size < 2:
        run.warnings.warn(f"domain {domain!r}: {memorized.size} sample(s) memorized before the final checkpoint; "
                          "distances need 2 (reported as NaN)")

    pretrain, entry["pretrain_groups"], group_curves = _pretrain_groups(run, domain, rows, t_star, not_memorized)
    run.warnings.warn_unbounded_consistency(f"domain {domain!r}", {**set_curves, **group_curves})
    entry.update(_test_groups_and_pairs(run, domain, pretrain))
    if accuracy is not None:
        entry.update(_table1(run, curves, set_curves, table_rows, accuracy))
    entry["eps_delta_sweep"] = _eps_delta_sweep(run, run.loss[:, rows], rows, entry["memorization"]["eps"], accuracy,
                                                onset)
    return entry, memorized


# ------------------------------------------------------------------------------------------------
# Across domains
# ------------------------------------------------------------------------------------------------
def _cross_domain_distance(run: _Run, memorized_by_domain: dict[str, np.ndarray]) -> dict[str, list]:
    """{"a|b": [checkpoints] primary distance between the memorized samples of domains a and b}."""
    domains, train = list(memorized_by_domain), run.train_split
    return {f"{a}|{b}": run.engine.cross_distance(train, memorized_by_domain[a], train, memorized_by_domain[b]).tolist()
            for i, a in enumerate(domains) for b in domains[i + 1:]
            if memorized_by_domain[a].size and memorized_by_domain[b].size}


def _first_memorization(report: dict) -> int:
    steps = [int(s) for d in report["domains"].values() for s in d["memorization"]["t_star_counts"]]
    return min(steps) if steps else report["steps"][0]


def _global_panel(run: _Run, memorized_by_domain: dict[str, np.ndarray], t_first: int) -> dict[str, Any]:
    """All domains' memorized samples pooled; a quadratic trend over the checkpoints from the
    first memorization step on (the paper's global panel)."""
    pooled = np.concatenate(list(memorized_by_domain.values())) if memorized_by_domain else np.zeros(0, int)
    curves = run.engine.set_curves(run.train_split, np.sort(pooled), "global")
    after = run.steps >= t_first
    return {"n": int(pooled.size), "from_step": int(t_first), "curves": _curves_json(curves),
            "quadratic_fit": {name: grokking.quadratic_trend(run.steps[after], curves[name][after])
                              for name in ("distance", "consistency")}}


def analyze(stats: list[CheckpointStats], splits: dict[str, EvalSplit], train_split: str = "train",
            test: TestResults | None = None, held_out_split: str | None = None, validation_split: str | None = None,
            train_embeddings: np.ndarray | None = None, options: AnalysisOptions = DEFAULT_OPTIONS,
            positions: str | None = None) -> dict[str, Any]:
    """The report (a JSON-able dict; docs/method.md explains every entry).

    stats: per-checkpoint statistics sorted by step; splits: the EvalSplits they were computed on.
    test: test accuracy / per-sample correctness per domain (e.g. `test_results_from_split`, or
    the CSVs of checkpoints.test_correctness); held_out_split: samples the model never trained on,
    the held-out control of every metric; validation_split: samples scored by loss only
    (Table 1's validation loss); train_embeddings: [N_train, dim] per-sample embeddings (pairing).
    positions: "all" or "scored" routing weights and entropy (default: options.positions[0]).
    """
    positions = positions or options.positions[0]
    if len(stats) < 2:
        raise ValueError(f"the analysis needs at least 2 checkpoints, got {len(stats)}")
    train = splits[train_split]
    domains = list(train.group_names)
    if test is not None:
        test.check(domains, len(stats))
    if train_embeddings is not None:
        train_embeddings = groups.check_embeddings(f"split {train_split!r}", train_embeddings, len(train))
    # The exploratory answer_aligned metric reads each sample's answer from the splits the statistics came from.
    answers = {name: split.answers() for name, split in splits.items()} if options.answer_aligned else None
    engine = SetMetrics(stats, options, positions, answers)
    run = _Run(stats, splits, train_split, held_out_split, validation_split, test, train_embeddings, options, engine,
               RunWarnings(engine.steps), loss=np.stack([s.splits[train_split]["loss"] for s in stats]),
               train_correct=np.stack([s.splits[train_split]["correct"] for s in stats]))
    if stats[0].splits[train_split]["mean_weights"].shape[1] == 2:
        run.warnings.warn("the model has 2 MoE layers: pathway consistency is 1 for every sample whatever the routing "
                          "(one layer cosine, divided by itself)")

    report: dict[str, Any] = {"steps": run.steps.tolist(), "positions": positions,
                              "options": dataclasses.asdict(options), "domains": {}}
    memorized_by_domain: dict[str, np.ndarray] = {}
    for domain in domains:
        report["domains"][domain], memorized_by_domain[domain] = _domain_entry(run, domain)
    report["cross_domain_distance"] = _cross_domain_distance(run, memorized_by_domain)
    report["global"] = _global_panel(run, memorized_by_domain, t_first=_first_memorization(report))
    report["parameter_dynamics"] = parameter_dynamics(run.steps.tolist(), [s.param_sample for s in stats])
    report["parameter_dynamics_summary"] = dynamics_summary(report["parameter_dynamics"])
    report["warnings"] = run.warnings.messages
    return report
