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
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from ml_collections import config_dict

from moe_grok.analysis import grokking, groups, metrics, pathways, statistics
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.analysis.param_dynamics import parameter_dynamics
from moe_grok.data.splits import EvalSplit

# positions -> (router weights field, routing entropy field) of CheckpointStats.splits
POSITIONS = {"all": ("mean_weights", "routing_entropy"), "scored": ("scored_mean_weights", "scored_routing_entropy")}
DISTANCE_VARIANTS = {  # name -> (level, normalized)
    "distance_char": ("char", False), "distance_char_normalized": ("char", True), "distance_token": ("token", False)}
CONTROL_SETS = ("held_out", "random_train")
SET_METRICS = ("distance", "consistency", "complexity", "pathway_length", "routing_entropy")
MAX_LISTED_STEPS = 6  # an unbounded-consistency warning lists up to this many steps of a set, else counts them
MAX_LISTED_SETS = 6  # ... and names up to this many sets, the most affected first


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """Every choice of the analysis (docs/method.md); `from_config` reads them from a config's `analysis`."""

    tau: float = 0.7  # pathway: experts kept until their cumulative token-mean weight exceeds tau
    delta: float = 0.05  # memorization: |loss(t) - loss(T)| <= delta nats for every t >= t*
    target_fraction: tuple[float, float] = (0.20, 0.25)  # eps calibration: share memorized before T
    eps: float | None = None  # a fixed eps (nats) for every domain instead of calibration
    eps_grid_step: float = 0.1  # eps calibration grid step, in eps_unit
    eps_unit: str = "median_final_loss"  # grid unit: the domain's median final loss, or "nats"
    distance_level: str = "char"  # primary distance: "char" (paper, pathway strings) or "token"
    distance_normalized: bool = False  # primary distance divided by the longer pathway's length
    max_pairs: int | None = 2000  # sampled pairs per distance (None: all pairs)
    seed: int = 0  # pair sampling and control-sample seed
    onset_threshold: float = 0.8  # onsets: accuracy (group) / later mean correctness (sample) above this
    max_later_errors: int = 1  # a test sample's onset allows at most this many later errors
    rise_fraction: float = 0.1  # correlation window start: the sustained rise above min + this * range
    saturation_fraction: float = 0.95  # window end: accuracy reaches min + this * range (1.0: to T)
    loss_moving_average: int = 3  # checkpoints in the training-loss moving average (Table 1)
    tau_sweep: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)  # Appendix E.1
    delta_sweep: tuple[float, ...] = (0.025, 0.05, 0.1)  # Appendix E.3 (with eps_sweep)
    eps_sweep: tuple[float, ...] = (0.5, 1.0, 2.0)  # Appendix E.3: multiples of the calibrated eps
    positions: tuple[str, ...] = ("all",)  # routing averaged over "all" tokens (paper) / "scored" positions

    def __post_init__(self):
        problems = []
        if not 0.0 < self.tau <= 1.0 or not all(0.0 < t <= 1.0 for t in self.tau_sweep):
            problems.append(f"tau and tau_sweep must lie in (0, 1], got {self.tau}, {self.tau_sweep}")
        if not self.delta >= 0 or not all(d >= 0 for d in self.delta_sweep):
            problems.append(f"delta and delta_sweep must be >= 0, got {self.delta}, {self.delta_sweep}")
        low, high = self.target_fraction
        if not 0.0 <= low <= high <= 1.0:
            problems.append(f"target_fraction needs 0 <= low <= high <= 1, got {self.target_fraction}")
        if self.eps is not None and not self.eps > 0:
            problems.append(f"eps must be > 0 (or unset to calibrate), got {self.eps}")
        if not self.eps_grid_step > 0 or not all(m > 0 for m in self.eps_sweep):
            problems.append(f"eps_grid_step and eps_sweep must be > 0, got {self.eps_grid_step}, {self.eps_sweep}")
        if self.eps_unit not in grokking.EPS_UNITS:
            problems.append(f"eps_unit must be one of {grokking.EPS_UNITS}, got {self.eps_unit!r}")
        if self.distance_level not in ("char", "token"):
            problems.append(f"distance_level must be 'char' or 'token', got {self.distance_level!r}")
        if self.max_pairs is not None and self.max_pairs < 1:
            problems.append(f"max_pairs must be >= 1 or None, got {self.max_pairs}")
        if not 0.0 < self.onset_threshold < 1.0:
            problems.append(f"onset_threshold must lie in (0, 1), got {self.onset_threshold}")
        if self.max_later_errors < 0 or self.loss_moving_average < 1:
            problems.append("max_later_errors must be >= 0 and loss_moving_average >= 1")
        if not 0.0 <= self.rise_fraction < 1.0 or not 0.0 < self.saturation_fraction <= 1.0:
            problems.append(f"rise_fraction must lie in [0, 1) and saturation_fraction in (0, 1], got "
                            f"{self.rise_fraction}, {self.saturation_fraction}")
        if not self.positions or any(p not in POSITIONS for p in self.positions):
            problems.append(f"positions must name some of {tuple(POSITIONS)}, got {self.positions}")
        if problems:
            raise ValueError("invalid analysis options: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config) -> AnalysisOptions:
        """From an ml_collections `analysis` section holding every field (extra keys such as
        batch_size are ignored); ValueError names missing fields and invalid values."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"analysis config lacks {missing}; declare every AnalysisOptions field")
        values = {n: config[n] for n in names}
        for name in ("target_fraction", "tau_sweep", "delta_sweep", "eps_sweep", "positions"):
            values[name] = tuple(values[name]) if not isinstance(values[name], str) else (values[name],)
        if values["max_pairs"] is not None and values["max_pairs"] <= 0:
            values["max_pairs"] = None
        return cls(**values)


def analysis_config(**overrides) -> ml_collections.ConfigDict:
    """An `analysis` config section declaring every AnalysisOptions field (its defaults, then
    `overrides`); unset eps is a float placeholder so `--config.analysis.eps=0.3` works."""
    fields = {f.name: f.default for f in dataclasses.fields(AnalysisOptions)}
    fields["eps"] = config_dict.placeholder(float)
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


@dataclasses.dataclass(frozen=True)
class TestResults:
    """The test side of the analysis, per domain.

    accuracy: {domain: [checkpoints] accuracy}; correct: {domain: [checkpoints, n_test] bool}
    per-sample correctness (gives Test@t# groups; optional); embeddings: {domain: [n_test, dim]}
    rows aligned with `correct`'s samples (optional; used for pairing).
    """

    accuracy: dict[str, np.ndarray]
    correct: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def check(self, domains: Sequence[str], n_checkpoints: int) -> None:
        """ValueError naming test domains that match no training domain, and wrong lengths."""
        unknown = sorted(set(self.accuracy) - set(domains))
        if unknown:
            folded = {d.lower(): d for d in domains}
            hints = [f"{u!r} (did you mean {folded[u.lower()]!r}?)" for u in unknown if u.lower() in folded]
            raise ValueError(f"test results name domain(s) {unknown} that match no training domain "
                             f"{list(domains)}{'; ' + ', '.join(hints) if hints else ''}")
        for domain, acc in self.accuracy.items():
            if len(acc) != n_checkpoints:
                raise ValueError(f"test accuracy of domain {domain!r} has {len(acc)} values for {n_checkpoints} "
                                 "checkpoints")
        for domain, correct in self.correct.items():
            if correct.ndim != 2 or correct.shape[0] != n_checkpoints:
                raise ValueError(f"test correctness of domain {domain!r} has shape {correct.shape}, need "
                                 f"[{n_checkpoints}, samples]")
            if domain in self.embeddings:
                groups.check_embeddings(f"test domain {domain!r}", self.embeddings[domain], correct.shape[1])


def test_results_from_split(stats: list[CheckpointStats], split_name: str, split: EvalSplit,
                            embeddings: np.ndarray | None = None) -> TestResults:
    """TestResults from a test split evaluated at every checkpoint: a sample is correct when every
    scored position is predicted exactly; domain accuracy is the mean per-sample score."""
    if embeddings is not None:
        embeddings = groups.check_embeddings(f"split {split_name!r}", embeddings, len(split))
    score = np.stack([s.splits[split_name]["correct"] for s in stats])  # [C, N] fraction of positions right
    result = TestResults({}, {}, {})
    for domain in split.group_names:
        rows = split.rows(domain)
        result.accuracy[domain] = score[:, rows].mean(axis=1)
        result.correct[domain] = score[:, rows] >= 1.0
        if embeddings is not None:
            result.embeddings[domain] = embeddings[rows]
    return result


class _Pathways:
    """Pathway strings / token tuples / lengths of every sample of a split at a checkpoint, cached."""

    def __init__(self, stats: list[CheckpointStats], view: str):
        self._stats, self._view, self._cache = stats, view, {}

    def weights(self, split: str, checkpoint: int) -> np.ndarray:
        return self._stats[checkpoint].splits[split][self._view]

    def _codes(self, split: str, checkpoint: int, tau: float) -> pathways.LayerPathways:
        key = ("codes", split, checkpoint, tau)
        if key not in self._cache:
            self._cache[key] = pathways.layer_pathways(self.weights(split, checkpoint), tau)
        return self._cache[key]

    def _cached(self, kind: str, split: str, checkpoint: int, tau: float, make):
        key = (kind, split, checkpoint, tau)
        if key not in self._cache:
            self._cache[key] = make(self._codes(split, checkpoint, tau))
        return self._cache[key]

    def strings(self, split: str, checkpoint: int, tau: float) -> list[str]:
        return self._cached("strings", split, checkpoint, tau, pathways.strings_of)

    def tokens(self, split: str, checkpoint: int, tau: float) -> list[tuple[int, ...]]:
        return self._cached("tokens", split, checkpoint, tau, pathways.tokens_of)

    def lengths(self, split: str, checkpoint: int, tau: float) -> np.ndarray:
        """[N] experts per layer on each sample's pathway."""
        return self._cached("lengths", split, checkpoint, tau, lambda codes: codes.lengths.mean(axis=1))

    def layer_strings(self, split: str, checkpoint: int, tau: float, layer: int) -> list[str]:
        return self._cached(f"layer_strings/{layer}", split, checkpoint, tau,
                            lambda codes: pathways.layer_strings_of(codes, layer))


class _Analysis:
    """One analysis run: the shared state of the per-domain computations."""

    def __init__(self, stats: list[CheckpointStats], splits: dict[str, EvalSplit], train_split: str,
                 held_out_split: str | None, options: AnalysisOptions, positions: str):
        self.stats, self.splits, self.options = stats, splits, options
        self.train_split, self.held_out_split = train_split, held_out_split
        self.steps = np.array([s.step for s in stats])
        weights_field, self.entropy_field = POSITIONS[positions]
        self.paths = _Pathways(stats, weights_field)
        self.router = [s.router for s in stats]
        self.warnings: list[str] = []
        self._consistency: dict = {}
        self._distances: dict = {}

    def warn(self, message: str) -> None:
        logging.warning("%s", message)
        self.warnings.append(message)

    def warn_unbounded_consistency(self, where: str, curves_by_set: dict[str, dict[str, np.ndarray]]) -> None:
        """One warning naming the sets (and their checkpoints) with samples whose consistency is
        unbounded, the most affected first; the per-checkpoint shares are in the report's curves."""
        flagged = []
        for name, curves in curves_by_set.items():
            share = curves["consistency_unbounded_share"]
            at = share > 0  # NaN (an empty set) is not flagged
            if at.any():
                steps, worst = self.steps[at].tolist(), float(np.max(share[at]))
                where_in_run = (f"step(s) {steps}" if len(steps) <= MAX_LISTED_STEPS else
                                f"{len(steps)} of {len(at)} checkpoints (steps {steps[0]}..{steps[-1]})")
                flagged.append((worst, f"{name} at {where_in_run} (up to {worst:.0%} of samples)"))
        if flagged:
            flagged.sort(key=lambda item: -item[0])  # stable: equal shares keep the sets' order
            listed = [text for _, text in flagged[:MAX_LISTED_SETS]]
            if len(flagged) > MAX_LISTED_SETS:
                listed.append(f"{len(flagged) - MAX_LISTED_SETS} more set(s)")
            self.warn(f"{where}: pathway consistency is unbounded (largest layer cosine at or below "
                      f"{metrics.MIN_MAX_COSINE}) for samples of {'; '.join(listed)}; "
                      "see consistency_unbounded_share (docs/method.md)")

    # ---------------------------------------------------------------- per-set metric curves
    def distance(self, split: str, rows: np.ndarray, checkpoint: int, level: str, normalized: bool,
                 tau: float | None = None) -> float:
        tau = self.options.tau if tau is None else tau
        # The same set recurs (the primary distance is also a variant; the sweeps' centre is the
        # memorized set): each (set, checkpoint, form) is measured once.
        key = (split, checkpoint, level, normalized, tau, np.asarray(rows, np.int64).tobytes())
        if key not in self._distances:
            source = self.paths.strings if level == "char" else self.paths.tokens
            every = source(split, checkpoint, tau)
            self._distances[key] = metrics.group_pathway_distance(
                [every[i] for i in np.asarray(rows).tolist()], level, normalized, self.options.max_pairs,
                self.options.seed, on_small="nan")
        return self._distances[key]

    def consistency_all(self, split: str, checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """(consistency [N], unbounded flag [N]) of every sample of a split at a checkpoint."""
        key = (split, checkpoint)
        if key not in self._consistency:
            weights = self.paths.weights(split, checkpoint)
            if weights.shape[1] < 2:
                self._consistency[key] = (np.full(len(weights), np.nan), np.zeros(len(weights), bool))
            else:
                router = self.router[checkpoint]
                consistency = np.asarray(metrics.pathway_consistency(weights, router), np.float64)
                self._consistency[key] = (consistency, metrics.consistency_edge_cases(weights, router)["unbounded"])
        return self._consistency[key]

    def set_curves(self, split: str, rows: np.ndarray, variants: bool = False) -> dict[str, np.ndarray]:
        """Every metric of the samples `rows` of `split` at every checkpoint -> {metric: [C]}."""
        o = self.options
        curves = {name: [] for name in SET_METRICS}
        if variants:
            curves.update({name: [] for name in DISTANCE_VARIANTS})
        curves["consistency_unbounded_share"] = []
        for c in range(len(self.stats)):
            curves["distance"].append(self.distance(split, rows, c, o.distance_level, o.distance_normalized))
            if variants:
                for name, (level, normalized) in DISTANCE_VARIANTS.items():
                    curves[name].append(self.distance(split, rows, c, level, normalized))
            consistency, unbounded = self.consistency_all(split, c)
            curves["consistency"].append(float(np.mean(consistency[rows])) if rows.size else np.nan)
            curves["consistency_unbounded_share"].append(float(np.mean(unbounded[rows])) if rows.size else np.nan)
            curves["pathway_length"].append(float(np.mean(self.paths.lengths(split, c, o.tau)[rows]))
                                            if rows.size else np.nan)
            entropy = self.stats[c].splits[split][self.entropy_field]
            curves["routing_entropy"].append(float(np.mean(entropy[rows])) if rows.size else np.nan)
        curves = {k: np.asarray(v, np.float64) for k, v in curves.items()}
        curves["complexity"] = 1.0 - curves["consistency"]
        return curves

    def cross_distance(self, split_a: str, rows_a: np.ndarray, split_b: str, rows_b: np.ndarray) -> np.ndarray:
        """[C] mean distance over pairs (a in rows_a, b in rows_b) (primary distance)."""
        o = self.options
        out = []
        for c in range(len(self.stats)):
            source = self.paths.strings if o.distance_level == "char" else self.paths.tokens
            a, b = source(split_a, c, o.tau), source(split_b, c, o.tau)
            out.append(metrics.cross_group_distance([a[i] for i in rows_a.tolist()], [b[i] for i in rows_b.tolist()],
                                                    o.distance_level, o.distance_normalized, o.max_pairs, o.seed,
                                                    on_small="nan"))
        return np.asarray(out)

    def per_layer_distance(self, split: str, rows: np.ndarray) -> np.ndarray:
        """[C, L] mean pairwise distance of the single-layer pathway strings (Fig. 5)."""
        o = self.options
        num_layers = self.paths.weights(split, 0).shape[1]
        out = np.full((len(self.stats), num_layers), np.nan)
        for c in range(len(self.stats)):
            for layer in range(num_layers):
                strings = self.paths.layer_strings(split, c, o.tau, layer)
                out[c, layer] = metrics.group_pathway_distance([strings[i] for i in rows.tolist()], "char",
                                                               o.distance_normalized, o.max_pairs, o.seed,
                                                               on_small="nan")
        return out

    # ---------------------------------------------------------------- per-domain pieces
    def memorization(self, domain: str, loss: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """(report entry, t* [n] per sample) for one domain's training losses [C, n]."""
        o = self.options
        entry: dict[str, Any] = {"delta": o.delta, "target_fraction": list(o.target_fraction)}
        if o.eps is not None:
            eps = o.eps
            entry.update(eps=eps, eps_source="fixed", in_target_range=None)
        else:
            try:
                calibration = grokking.calibrate_eps(loss, self.steps, o.delta, o.target_fraction, o.eps_grid_step,
                                                     o.eps_unit)
                eps = calibration.eps
                entry.update(eps=eps, eps_source="calibrated", eps_unit=o.eps_unit, eps_unit_nats=calibration.unit,
                             in_target_range=calibration.in_target_range,
                             grid=[[g, s] for g, s in zip(calibration.grid, calibration.shares, strict=False)])
                if not calibration.in_target_range:
                    self.warn(f"domain {domain!r}: no grid eps gives a share memorized before T inside "
                              f"{o.target_fraction}; the closest, eps={eps:.4g}, gives {calibration.share:.1%}")
            except grokking.EpsCalibrationError as err:
                eps = float(loss.max()) + 1.0
                entry.update(eps=eps, eps_source="unreachable", in_target_range=False, error=str(err))
                self.warn(f"domain {domain!r}: {err}")
        t_star = grokking.memorization_steps(loss, self.steps, eps, o.delta)
        before_end = (t_star >= 0) & (t_star < self.steps[-1])
        entry.update(share_before_end=float(before_end.mean()), n_memorized_before_end=int(before_end.sum()),
                     n_memorized_at_end=int((t_star == self.steps[-1]).sum()), n_samples=int(loss.shape[1]),
                     t_star_counts={str(int(s)): int(n) for s, n in zip(*np.unique(t_star[before_end],
                                                                                    return_counts=True), strict=False)})
        return entry, t_star

    def control_rows(self, pool: np.ndarray, size: int, salt: str) -> np.ndarray:
        """A seeded random subset of `pool` of `size` samples (all of them if fewer)."""
        if pool.size <= size:
            return np.sort(pool)
        rng = np.random.default_rng([self.options.seed, *map(ord, salt)])
        return np.sort(rng.choice(pool, size, replace=False))

    def trends(self, curves: dict[str, np.ndarray], from_step: int) -> dict[str, dict]:
        """Linear trend (per 1,000 steps, 95% CI) of every curve on the checkpoints at or after from_step."""
        after = self.steps >= from_step
        return {name: grokking.linear_trend(self.steps[after], values[after]) for name, values in curves.items()}


def _curves_json(curves: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: np.asarray(v, np.float64).tolist() for k, v in curves.items()}


def _correlations(curves: dict[str, np.ndarray], accuracy: np.ndarray, window: tuple[int, int]) -> dict[str, dict]:
    full = (window[0], len(accuracy) - 1) if window[0] >= 0 else window
    return {name: {"window": grokking.window_correlations(values, accuracy, *window),
                   "full": grokking.window_correlations(values, accuracy, *full)}
            for name, values in curves.items()}


def _partial(curves: dict[str, np.ndarray], accuracy: np.ndarray, window: tuple[int, int]) -> dict[str, dict]:
    """Partial correlation of every distance variant and consistency with test accuracy over the
    window, controlling for the same set's routing entropy and pathway length."""
    start, end = window
    if start < 0:
        return {}
    part = slice(start, end + 1)
    controls = np.column_stack([curves["routing_entropy"][part], curves["pathway_length"][part]])
    return {name: statistics.partial_correlation(curves[name][part], accuracy[part], controls)
            for name in ("distance", *DISTANCE_VARIANTS, "consistency") if name in curves}


def analyze(stats: list[CheckpointStats], splits: dict[str, EvalSplit], train_split: str = "train",
            test: TestResults | None = None, held_out_split: str | None = None, validation_split: str | None = None,
            train_embeddings: np.ndarray | None = None, options: AnalysisOptions = AnalysisOptions(),
            positions: str | None = None) -> dict[str, Any]:
    """The report (a JSON-able dict; docs/method.md explains every entry).

    stats: per-checkpoint statistics sorted by step; splits: the EvalSplits they were computed on.
    test: test accuracy / per-sample correctness per domain (e.g. `test_results_from_split`, or
    the CSVs of analysis.test_accuracy); held_out_split: samples the model never trained on,
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
    run = _Analysis(stats, splits, train_split, held_out_split, options, positions)
    steps = run.steps
    loss = np.stack([s.splits[train_split]["loss"] for s in stats])  # [C, N]
    train_correct = np.stack([s.splits[train_split]["correct"] for s in stats])
    if stats[0].splits[train_split]["mean_weights"].shape[1] == 2:
        run.warn("the model has 2 MoE layers: pathway consistency is 1 for every sample whatever the routing "
                 "(one layer cosine, divided by itself)")

    report: dict[str, Any] = {"steps": steps.tolist(), "positions": positions,
                              "options": dataclasses.asdict(options), "domains": {}}
    memorized_by_domain: dict[str, np.ndarray] = {}
    for domain in domains:
        rows = train.rows(domain)
        entry: dict[str, Any] = {"n_train": int(rows.size)}
        memorization, t_star = run.memorization(domain, loss[:, rows])
        entry["memorization"] = memorization
        before_end = (t_star >= 0) & (t_star < steps[-1])
        memorized, not_memorized = rows[before_end], rows[~before_end]
        memorized_by_domain[domain] = memorized

        curves = {"train_loss": loss[:, rows].mean(1), "train_accuracy": train_correct[:, rows].mean(1)}
        curves["train_loss_moving_average"] = grokking.moving_average(curves["train_loss"], options.loss_moving_average)
        if validation_split is not None and domain in splits[validation_split].group_names:
            validation = splits[validation_split]
            curves["validation_loss"] = np.array([s.splits[validation_split]["loss"][validation.rows(domain)].mean()
                                                  for s in stats])
        accuracy = None if test is None else test.accuracy.get(domain)
        if accuracy is not None:
            curves["test_accuracy"] = np.asarray(accuracy, np.float64)
        entry["curves"] = _curves_json(curves)

        # The pooled memorized set and its controls (same size, same checkpoints).
        held_out_pool = (splits[held_out_split].rows(domain) if held_out_split is not None
                         and domain in splits[held_out_split].group_names else np.zeros(0, int))
        size = max(memorized.size, 2)
        sets = {"memorized": (train_split, memorized)}
        if held_out_pool.size:
            sets["held_out"] = (held_out_split, run.control_rows(held_out_pool, size, f"held_out/{domain}"))
        sets["random_train"] = (train_split, run.control_rows(not_memorized, size, f"random_train/{domain}"))
        set_curves = {name: run.set_curves(split, r, variants=True) for name, (split, r) in sets.items()}
        if memorized.size:
            set_curves["memorized"]["train_loss"] = loss[:, memorized].mean(1)
        entry["sets"] = {name: {"split": split, "n": int(r.size), "curves": _curves_json(set_curves[name])}
                         for name, (split, r) in sets.items()}
        entry["per_layer_distance"] = {name: run.per_layer_distance(split, r).tolist() for name, (split, r)
                                       in sets.items() if name in ("memorized", "held_out")}
        if memorized.size < 2:
            run.warn(f"domain {domain!r}: {memorized.size} sample(s) memorized before the final checkpoint; "
                     "distances need 2 (reported as NaN)")

        # Pretrain@t* groups with their controls and trends after t*.
        pretrain = groups.groups_by_step(t_star, rows, int(steps[-1]), groups.pretrain_group_name)
        entry["pretrain_groups"] = {}
        unbounded_checked = dict(set_curves)
        for group in pretrain:
            g_curves = run.set_curves(train_split, group.rows, variants=True)
            g_curves["train_loss"] = loss[:, group.rows].mean(1)
            g_curves["train_accuracy"] = train_correct[:, group.rows].mean(1)
            controls = {"random_train": run.control_rows(np.setdiff1d(not_memorized, group.rows), group.rows.size,
                                                         f"random_train/{group.name}")}
            if held_out_pool.size:
                controls["held_out"] = run.control_rows(held_out_pool, group.rows.size, f"held_out/{group.name}")
            control_curves = {name: run.set_curves(held_out_split if name == "held_out" else train_split, r)
                              for name, r in controls.items()}
            cross = {"distance_to_random_train": run.cross_distance(train_split, group.rows, train_split,
                                                                    controls["random_train"])}
            g_entry = {"step": group.step, "n": int(group.rows.size), "curves": _curves_json(g_curves),
                       "controls": {name: _curves_json(c) for name, c in control_curves.items()},
                       "cross": _curves_json(cross),
                       "trend_after_t_star": run.trends(g_curves, group.step),
                       "control_trends": {name: run.trends(c, group.step) for name, c in control_curves.items()}}
            if group.rows.size < 2:
                g_entry["note"] = "fewer than 2 samples: distances are NaN"
            entry["pretrain_groups"][group.name] = g_entry
            unbounded_checked[group.name] = g_curves
            unbounded_checked.update({f"{group.name}/{name}": c for name, c in control_curves.items()})
        run.warn_unbounded_consistency(f"domain {domain!r}", unbounded_checked)

        # Test@t# groups, pairing and delays.
        entry["test_groups"], entry["pairs"] = {}, []
        if test is not None and domain in test.correct:
            correct = test.correct[domain]
            onsets = grokking.generalization_onset(correct, steps, options.onset_threshold, options.max_later_errors)
            test_groups = groups.groups_by_step(onsets, np.arange(correct.shape[1]), None, groups.test_group_name)
            for group in test_groups:
                entry["test_groups"][group.name] = {"step": group.step, "n": int(group.rows.size),
                                                    "accuracy": correct[:, group.rows].mean(1).tolist()}
            entry["n_test_never_generalized"] = int(np.sum(onsets == grokking.NEVER))
            similarity = groups.similarity_matrix(pretrain, test_groups, train_embeddings,
                                                  test.embeddings.get(domain))
            entry["pairing_similarity"] = ("embeddings" if train_embeddings is not None and domain in test.embeddings
                                           else "domain (no embeddings: chronological order)")
            for i, j in groups.pair_groups(similarity):
                p, q = pretrain[i], test_groups[j]
                entry["pairs"].append({"pretrain": p.name, "test": q.name, "pretrain_step": p.step, "test_step": q.step,
                                       "delay": q.step - p.step, "similarity": float(similarity[i, j])})

        # Table 1 over the correlation window, controls and partial correlations.
        if accuracy is not None:
            accuracy = np.asarray(accuracy, np.float64)
            window = grokking.correlation_window(accuracy, options.rise_fraction, options.saturation_fraction)
            onset = grokking.accuracy_onset(accuracy, steps, options.onset_threshold)
            entry["test_onset_step"] = int(onset)
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
                str(tau): {"distance": [run.distance(train_split, memorized, c, options.distance_level,
                                                     options.distance_normalized, tau) for c in range(len(stats))]}
                for tau in options.tau_sweep}
            for values in entry["tau_sweep"].values():
                values["correlation"] = grokking.window_correlations(values["distance"], accuracy, *window)
        entry["eps_delta_sweep"] = _eps_delta_sweep(run, domain, loss[:, rows], rows, memorization["eps"], accuracy)
        report["domains"][domain] = entry

    report["cross_domain_distance"] = {
        f"{a}|{b}": run.cross_distance(train_split, memorized_by_domain[a],
                                       train_split, memorized_by_domain[b]).tolist()
        for i, a in enumerate(domains) for b in domains[i + 1:]
        if memorized_by_domain[a].size and memorized_by_domain[b].size}
    report["global"] = _global_panel(run, memorized_by_domain, t_first=_first_memorization(report))
    report["parameter_dynamics"] = parameter_dynamics(steps.tolist(), [s.param_sample for s in stats])
    report["warnings"] = run.warnings
    return report


def _first_memorization(report: dict) -> int:
    steps = [int(s) for d in report["domains"].values() for s in d["memorization"]["t_star_counts"]]
    return min(steps) if steps else report["steps"][0]


def _global_panel(run: _Analysis, memorized_by_domain: dict[str, np.ndarray], t_first: int) -> dict[str, Any]:
    """All domains' memorized samples pooled; a quadratic trend over the checkpoints from the
    first memorization step on (the paper's global panel)."""
    pooled = np.concatenate(list(memorized_by_domain.values())) if memorized_by_domain else np.zeros(0, int)
    curves = run.set_curves(run.train_split, np.sort(pooled))
    after = run.steps >= t_first
    return {"n": int(pooled.size), "from_step": int(t_first), "curves": _curves_json(curves),
            "quadratic_fit": {name: grokking.quadratic_trend(run.steps[after], curves[name][after])
                              for name in ("distance", "consistency")}}


def _eps_delta_sweep(run: _Analysis, domain: str, loss: np.ndarray, rows: np.ndarray, eps: float,
                     accuracy: np.ndarray | None) -> list[dict]:
    """Appendix E.3: the memorized set and its metrics for every (eps multiple, delta)."""
    o, out = run.options, []
    window = (grokking.correlation_window(accuracy, o.rise_fraction, o.saturation_fraction)
              if accuracy is not None else (-1, -1))
    for delta in o.delta_sweep:
        for multiple in o.eps_sweep:
            t_star = grokking.memorization_steps(loss, run.steps, eps * multiple, delta)
            before_end = (t_star >= 0) & (t_star < run.steps[-1])
            memorized = rows[before_end]
            row = {"delta": delta, "eps_multiple": multiple, "eps": eps * multiple,
                   "share_before_end": float(before_end.mean()), "n_groups": int(np.unique(t_star[before_end]).size),
                   "median_t_star": float(np.median(t_star[before_end])) if before_end.any() else float("nan")}
            if accuracy is not None:
                curves = run.set_curves(run.train_split, memorized)
                for metric in ("distance", "consistency"):
                    row[f"{metric}_correlation"] = grokking.window_correlations(curves[metric], accuracy, *window)
            out.append(row)
    return out
