"""Per-seed measurements of the toy protocol and their aggregation across seeds (docs/protocol.md)."""
from __future__ import annotations

from typing import Any

import numpy as np

from moe_grok.analysis import grokking, registry, statistics
from moe_grok.analysis.statistics import bounded_mean_ci, fisher_mean_ci, fisher_z_difference, mean_ci, share_ci
from moe_grok.report.files import table1_rows

GROK_ACCURACY = grokking.GROK_ACCURACY  # a domain groks when its test accuracy stays above this (grokking.grok_onset)
MIN_EARLY_GROUP = 5  # samples in an "early" Pretrain@t* group
METRICS = tuple(m.name for m in registry.protocol_metrics())  # the metrics whose hypotheses the protocol tests
PAPER_SIGN = {m.name: m.paper_sign for m in registry.protocol_metrics()}
# metric -> its name in the verdicts where the paper leaves its orientation open ("consistency, as C")
CONTROL_SETS = ("held_out", "random_train")  # Table 1's control sets of every metric (analysis.analyze)
CONTROL_LABELS = {"held_out": "held-out", "random_train": "random-train"}
ORIENTED_NAMES = {m.name: f"{m.family}, as {m.orientation}" for m in registry.protocol_metrics() if m.orientation}


def quantities() -> tuple[tuple[str, str, str], ...]:
    """(key of seed_measurements, label, criterion side for the verdict or "") of every protocol
    quantity; the per-metric ones for each metric of the registry with a paper sign."""
    tested = registry.protocol_metrics()

    def side(m) -> str:
        return "<0" if m.paper_sign < 0 else ">0"

    rows = [("groks", "share of seeds that grok (test acc > 0.9 to the end)", ""),
            ("final_test_accuracy", "final test accuracy", ""),
            ("share_memorized_before_end", "share memorized before the last checkpoint", ""),
            ("early_groups", "early Pretrain@t* groups (>= 5 samples, t* before the onset)", "")]
    for m in tested:
        rows += [(f"h1_{m.name}_slope", f"H1: {m.label} slope after t* (per 1k steps)", side(m)),
                 (f"h1_{m.name}_slope_minus_held_out", f"H1: {m.label} slope minus held-out control slope", side(m))]
    rows += [(f"r_{m.name}", f"r({m.label}, test acc), window", "") for m in tested]
    rows += [("r_train_loss", "r(training loss, test acc), window", "")]
    rows += [(f"h2_{m.name}_signed_margin_over_loss",
              f"H2: {m.paper_sign:+.0f} x r({m.label}) - |r(training loss)| (paper's sign)", ">0") for m in tested]
    rows += [(f"h2_{m.name}_margin_over_loss", f"H2, sign ignored: |r({m.label})| - |r(training loss)|", ">0")
             for m in tested]
    rows += [(f"h2_{m.name}_margin_over_held_out", f"|r({m.label})| - |r(held-out {m.label})|", "") for m in tested]
    rows += [(f"r_{m.name}_{control}", f"r({CONTROL_LABELS[control]} {m.label}, test acc), window", "")
             for m in tested for control in CONTROL_SETS]
    rows += [(f"contrast_{m.name}_{control}",
              f"{m.paper_sign:+.0f} x (r(memorized {m.label}) - r({CONTROL_LABELS[control]} {m.label}))", "")
             for m in tested for control in CONTROL_SETS]
    rows += [(f"{m.name}_paper_sign", f"share of seeds with {m.label} r {side(m)[0]} 0 (the paper's sign)", "")
             for m in tested]
    rows += [(f"h3_{m.name}_alignment", f"H3: {m.label} alignment with its own domain's accuracy", ">0")
             for m in tested]
    rows += [("onset_spread_checkpoints",
              "checkpoints between the first and the last domain onset (never = one past the end)", ""),
             ("entropy_first", "routing entropy of memorized samples, first checkpoint (nats)", ""),
             ("entropy_last", "routing entropy of memorized samples, last checkpoint (nats)", ""),
             ("length_first", "pathway length, first checkpoint (experts / layer)", ""),
             ("length_last", "pathway length, last checkpoint (experts / layer)", "")]
    return tuple(rows)


def summarize(key: str, values) -> dict[str, Any]:
    """Mean and 95% interval across seeds of the quantity `key` (quantities()), by an interval that stays
    in the quantity's range: Fisher's z for correlations (r_*), Wilson for shares of seeds (groks, the
    paper's sign), the t interval clipped to the range for bounded means (margins in [-2, 1] or
    [-1, 1], alignment, accuracy and shares of samples in [0, 1]), the t interval otherwise (slopes,
    counts, entropy, length); the memorized-minus-control contrasts of r in [-2, 2]. docs/protocol.md,
    "Amendments after round 3" and "Round 4"."""
    if key == "groks" or key.endswith("_paper_sign"):
        return share_ci(values)
    if key.startswith("r_"):
        return fisher_mean_ci(values)
    if key.startswith("h2_") and "_signed_margin" in key:
        return bounded_mean_ci(values, -2.0, 1.0)
    if key.startswith("contrast_"):
        return bounded_mean_ci(values, -2.0, 2.0)
    if key.startswith(("h2_", "h3_")):
        return bounded_mean_ci(values, -1.0, 1.0)
    if key in ("final_test_accuracy", "share_memorized_before_end"):
        return bounded_mean_ci(values, 0.0, 1.0)
    return {**mean_ci(values), "interval": "t"}


def _mean(values) -> float:
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def signed_margin(r: float, paper_sign: float, loss_r: float) -> float:
    """H2's margin with the paper's sign applied: paper_sign * r(metric) - |r(training loss)|, in [-2, 1].
    A correlation of the wrong sign counts against the metric (the margin is then below -|r(loss)|),
    where |r| - |r(loss)| would count it as tracking accuracy."""
    return paper_sign * r - abs(loss_r)


def domain_measurements(report: dict[str, Any], domain: str) -> dict[str, float]:
    """The protocol's per-seed quantities for one domain of one report (NaN where undefined)."""
    steps = np.asarray(report["steps"])
    d = report["domains"][domain]
    accuracy = d["curves"].get("test_accuracy")
    out: dict[str, float] = {"groks": float("nan"), "onset_step": float("nan")}
    if accuracy is not None:
        onset = grokking.grok_onset(accuracy, steps)
        out.update(groks=float(onset >= 0), onset_step=float(onset) if onset >= 0 else float("nan"),
                   final_test_accuracy=float(accuracy[-1]))
    horizon = out["onset_step"] if np.isfinite(out["onset_step"]) else steps[-1]
    early = [g for g in d["pretrain_groups"].values() if g["n"] >= MIN_EARLY_GROUP and g["step"] < horizon]
    out["early_groups"] = float(len(early))
    out["share_memorized_before_end"] = d["memorization"]["share_before_end"]
    for metric in METRICS:  # a metric not measured on the groups (or their controls) gives NaN
        out[f"h1_{metric}_slope"] = _mean([_slope(g["trend_after_t_star"], metric) for g in early])
        out[f"h1_{metric}_slope_minus_held_out"] = _mean(
            [_slope(g["trend_after_t_star"], metric) - _slope(g["control_trends"]["held_out"], metric)
             for g in early if "held_out" in g["control_trends"]])
    table = d.get("table1", {})
    loss_r = table.get("train_loss", {}).get("window", {}).get("pearson_r", float("nan"))
    for metric in METRICS:
        r = table.get(f"memorized/{metric}", {}).get("window", {}).get("pearson_r", float("nan"))
        held_out = table.get(f"held_out/{metric}", {}).get("window", {}).get("pearson_r", float("nan"))
        out[f"r_{metric}"] = r
        out[f"h2_{metric}_signed_margin_over_loss"] = signed_margin(r, PAPER_SIGN[metric], loss_r)
        out[f"h2_{metric}_margin_over_loss"] = abs(r) - abs(loss_r)
        out[f"h2_{metric}_margin_over_held_out"] = abs(r) - abs(held_out)
        out[f"{metric}_paper_sign"] = float(np.sign(r) == PAPER_SIGN[metric]) if np.isfinite(r) else float("nan")
        for control in CONTROL_SETS:
            r_control = table.get(f"{control}/{metric}", {}).get("window", {}).get("pearson_r", float("nan"))
            out[f"r_{metric}_{control}"] = r_control
            out[f"contrast_{metric}_{control}"] = PAPER_SIGN[metric] * (r - r_control)
    out["r_train_loss"] = loss_r
    entropy = d["sets"]["memorized"]["curves"]["routing_entropy"]
    length = d["sets"]["memorized"]["curves"]["pathway_length"]
    out.update(entropy_first=entropy[0], entropy_last=entropy[-1], length_first=length[0], length_last=length[-1])
    return out


def _slope(trends: dict[str, dict], metric: str) -> float:
    return trends[metric]["slope"] if metric in trends else float("nan")


def alignment(report: dict[str, Any], metric: str) -> float:
    """H3: mean over domains d of |r(metric_d, acc_d)| - mean_{e != d} |r(metric_d, acc_e)| (all checkpoints)."""
    domains = [d for d, v in report["domains"].items() if "test_accuracy" in v["curves"]]
    if len(domains) < 2:
        return float("nan")
    values = []
    for d in domains:
        curve = report["domains"][d]["sets"]["memorized"]["curves"].get(metric)
        if curve is None:  # a metric this report does not hold (registry's `requires`)
            return float("nan")
        accuracy = {e: report["domains"][e]["curves"]["test_accuracy"] for e in domains}
        own = abs(statistics.pearson_r(curve, accuracy[d]))
        others = [abs(statistics.pearson_r(curve, accuracy[e])) for e in domains if e != d]
        values.append(own - _mean(others))
    return _mean(values)


def onset_spread(report: dict[str, Any]) -> float:
    """Checkpoints between the earliest and the latest domain onset. A domain that never groks
    counts as grokking one checkpoint past the last (censored), so the spread is then a lower
    bound; NaN when no domain groks."""
    steps = np.asarray(report["steps"])
    onsets = [grokking.grok_onset(d["curves"]["test_accuracy"], steps)
              for d in report["domains"].values() if d["curves"].get("test_accuracy") is not None]
    if not onsets or max(onsets) < 0:
        return float("nan")
    index = [int(np.searchsorted(steps, s)) if s >= 0 else len(steps) for s in onsets]
    return float(max(index) - min(index))


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def seed_domain_facts(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per domain of one seed's report, the facts the results page lists seed by seed: test onset
    (step, -1 = never), final test accuracy, the calibrated eps, the share memorized before the
    last checkpoint, and the Hungarian pairs with how many have a negative delay."""
    steps = np.asarray(report["steps"])
    facts = {}
    for name, d in report["domains"].items():
        accuracy = d["curves"].get("test_accuracy")
        pairs = d.get("pairs", [])
        facts[name] = {
            "onset": grokking.grok_onset(accuracy, steps) if accuracy is not None else -1,
            "final_test_accuracy": float(accuracy[-1]) if accuracy is not None else float("nan"),
            "eps": _float(d["memorization"].get("eps")),
            "share_before_end": _float(d["memorization"].get("share_before_end")),
            "pairs": len(pairs), "negative_delays": sum(p["delay"] < 0 for p in pairs)}
    return facts


def seed_measurements(report: dict[str, Any]) -> dict[str, float]:
    """One seed's quantities: averaged over domains, plus the multi-domain ones."""
    per_domain = [domain_measurements(report, d) for d in report["domains"]]
    out = {key: _mean([m[key] for m in per_domain]) for key in per_domain[0]}
    out["groks"] = float(all(m["groks"] == 1.0 for m in per_domain))
    for metric in METRICS:
        out[f"h3_{metric}_alignment"] = alignment(report, metric)
    out["onset_spread_checkpoints"] = onset_spread(report)
    return out


def table1_across_seeds(reports: list[dict[str, Any]]) -> dict[str, dict]:
    """Every Table 1 row (with controls): mean and CI across seeds (and domains) of the windowed
    Pearson r, its Spearman r, and the partial r of distance and consistency, by Fisher's z
    (`fisher_mean_ci`: the mean and interval stay in [-1, 1]). Rows no report holds are left out."""
    rows: dict[str, dict] = {}
    for key, label in table1_rows():
        if not any(key in d.get("table1", {}) for r in reports for d in r["domains"].values()):
            continue  # a row no report holds (an optional baseline, a metric that needs other inputs)
        for stat in ("pearson_r", "spearman_r"):
            values = [_mean([d["table1"][key]["window"][stat] for d in r["domains"].values()
                             if key in d.get("table1", {})]) for r in reports]
            rows.setdefault(label, {})[stat] = fisher_mean_ci(values)
            rows[label][f"per_seed_{stat}"] = values  # for contrasts between arms (schedule_contrasts)
    for metric in METRICS:
        values = [_mean([d.get("partial_correlations", {}).get("memorized", {}).get(metric, {}).get("r", np.nan)
                         for d in r["domains"].values()]) for r in reports]
        rows[f"partial r({metric} | entropy, length)"] = {"pearson_r": fisher_mean_ci(values)}
    return rows


def schedule_contrasts(table1_a: dict[str, dict], table1_b: dict[str, dict]) -> dict[str, dict]:
    """Per Table 1 row both arms hold with per-seed values (table1_across_seeds), arm a's mean Fisher z of
    the windowed Pearson r minus arm b's, with Welch's interval (statistics.fisher_z_difference). Round 4
    reads it for A2 with a cosine schedule against A2: a metric whose r moves while the training-step
    baseline's does not follows the schedule (docs/protocol.md, "Round 4")."""
    return {row: fisher_z_difference(table1_a[row]["per_seed_pearson_r"], table1_b[row]["per_seed_pearson_r"])
            for row in table1_a if "per_seed_pearson_r" in table1_a[row]
            and "per_seed_pearson_r" in table1_b.get(row, {})}


LATE_PILOT_GROKKED = 6  # round 4's late-grokking pilot: seeds (of 8) that must grok ...
LATE_PILOT_MARGIN = 500  # ... with the onset at least this many steps before the stage's end


def late_pilot_stops(onsets, stage: int, needed: int = LATE_PILOT_GROKKED, margin: int = LATE_PILOT_MARGIN) -> bool:
    """The late-grokking pilot's registered rule (docs/protocol.md, "Round 4"): the stage ending at step
    `stage` is the late arm's budget if >= `needed` seeds grok (onsets: grokking.grok_onset per seed,
    -1 = none) with their onset at least `margin` steps before the stage's end."""
    return sum(0 <= onset <= stage - margin for onset in onsets) >= needed


def h4_verdict(margins: dict[str, str], grokking_arms, control_arms) -> str:
    """Round 4's primary criterion (docs/protocol.md, "Round 4") from each arm's verdict of its signed
    margin over training loss (`margins`: arm -> "confirmed" / "refuted" / "inconclusive..."):
    confirmed if it is confirmed in every grokking arm and in no control; refuted if it is refuted in
    a grokking arm or confirmed in two or more controls; otherwise inconclusive. A verdict other than
    "confirmed" names, in parentheses, the arms that decided it, with their own verdicts."""
    grokking = {a: margins.get(a, "inconclusive (no value)") for a in grokking_arms}
    controls = {a: margins.get(a, "inconclusive (no value)") for a in control_arms}
    if not grokking:
        return "inconclusive (no grokking arm)"
    named = lambda arms: "; ".join(f"{a}: {v}" for a, v in arms.items())
    refuting = {a: v for a, v in grokking.items() if v == "refuted"}
    confirmed_controls = {a: v for a, v in controls.items() if v == "confirmed"}
    if refuting:
        return f"refuted (grokking arm {named(refuting)})"
    if len(confirmed_controls) >= 2:
        return f"refuted (controls {named(confirmed_controls)})"
    unconfirmed = {a: v for a, v in grokking.items() if v != "confirmed"}
    if not unconfirmed and not confirmed_controls:
        return "confirmed"
    if unconfirmed:
        return f"inconclusive (grokking arm {named(unconfirmed)})"
    return f"inconclusive (control {named(confirmed_controls)})"


def window_sizes(reports: list[dict[str, Any]]) -> dict[str, list[int]]:
    """[min, max] over seeds and domains of the correlation window's checkpoints ("window_n") and of the
    memorized set's partial correlations' degrees of freedom ("partial_df"; n - 4: two controls, n the
    window's checkpoints where the set has values), over the partial correlations that have a value (a
    set empty inside the window has none: its n - 4 would be negative); [] where no report has one."""
    window_n = [d["window"]["n"] for r in reports for d in r["domains"].values() if "window" in d]
    partial_df = [p["df"] for r in reports for d in r["domains"].values()
                  for p in d.get("partial_correlations", {}).get("memorized", {}).values()
                  if "df" in p and p.get("r") is not None and np.isfinite(p["r"])]
    return {"window_n": [min(window_n), max(window_n)] if window_n else [],
            "partial_df": [min(partial_df), max(partial_df)] if partial_df else []}


def verdict(summary: dict[str, Any], confidence_key: str) -> str:
    """'confirmed' / 'refuted' / 'inconclusive' from a mean_ci dict whose confirming side is given
    by the sign in confidence_key ('<0' or '>0')."""
    low, high = summary["ci95"]
    if not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive (too few seeds with a value)"
    below, above = high < 0, low > 0
    if confidence_key == "<0":
        return "confirmed" if below else ("refuted" if above else "inconclusive")
    return "confirmed" if above else ("refuted" if below else "inconclusive")
