"""Checks of a finished report (analysis.analyze's dict) and of the files report.files wrote from
it, shared by the toy and OLMoE end-to-end tests: every entry present, shaped and within its bounds."""
import csv
import math
import os

import numpy as np
import pytest

from moe_grok import strict_json
from moe_grok.analysis import registry

DISTANCE_VARIANTS = registry.names(role="variant")
PARTIAL_METRICS = {m.name for m in registry.partial_metrics()}
PARTIAL_CONTROLS = 2  # routing entropy and pathway length: a partial correlation needs n > 2 + this


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _values(curve):
    return np.asarray(curve, np.float64)


def _check_memorization(m):
    """The eps calibration result: eps, the share it memorizes before T, and whether it hit the target range."""
    assert math.isfinite(m["eps"]) and m["eps"] > 0
    share = m["share_before_end"]
    assert share == pytest.approx(m["n_memorized_before_end"] / m["n_samples"])
    low, high = m["target_fraction"]
    if m["eps_source"] == "calibrated":
        assert m["in_target_range"] == (low <= share <= high)
        assert any(g == pytest.approx(m["eps"]) and s == pytest.approx(share) for g, s in m["grid"])
    else:
        assert m["eps_source"] == "unreachable" and m["in_target_range"] is False and m["error"]


def set_sizes(s, n_checkpoints):
    """[checkpoints] a report set's size at every checkpoint (a growing set lists them; a fixed one has n)."""
    return np.asarray(s.get("n_per_checkpoint", [s["n"]] * n_checkpoints))


def _check_set_curves(name, s, n_checkpoints, num_experts):
    """Every distance variant, pathway length and routing entropy of one set, within its bounds; a
    growing set (n_per_checkpoint) is NaN exactly where it holds fewer than 2 samples."""
    curves = {metric: _values(s["curves"][metric]) for metric in ("distance", *DISTANCE_VARIANTS, "pathway_length",
                                                                  "routing_entropy")}
    assert all(c.shape == (n_checkpoints,) for c in curves.values()), name
    np.testing.assert_array_equal(curves["distance"], curves["distance_char"])  # the primary distance: characters
    defined = set_sizes(s, n_checkpoints) >= 2
    if "n_per_checkpoint" in s:
        assert all(np.isnan(c[~defined]).all() for c in curves.values()), name
    char, normalized, token = (curves[v][defined] for v in ("distance_char", "distance_char_normalized",
                                                            "distance_token"))
    assert np.isfinite(char).all() and np.isfinite(normalized).all() and np.isfinite(token).all(), name
    assert np.all((normalized >= 0) & (normalized <= 1)) and np.all(normalized <= char), name
    assert num_experts <= 10  # single-digit ids: the token string is the character one without its commas
    assert np.all(token <= char + 1e-9), name
    if "n_per_checkpoint" not in s:
        defined = np.ones(n_checkpoints, bool) if s["n"] >= 1 else defined
    length, entropy = curves["pathway_length"][defined], curves["routing_entropy"][defined]
    assert np.all((length >= 1) & (length <= num_experts)), name
    assert np.all((entropy > 0) & (entropy <= np.log(num_experts) + 1e-5)), name


def check_report(report, out_dir, num_layers, num_experts):
    """Every entry of the report and of the files written to out_dir (summary.json and the CSVs)."""
    steps, options = report["steps"], report["options"]
    n_checkpoints = len(steps)
    for domain_name, d in report["domains"].items():
        _check_memorization(d["memorization"])
        for set_name, s in d["sets"].items():
            _check_set_curves(f"{domain_name}/{set_name}", s, n_checkpoints, num_experts)

        # Partial correlations of every distance variant and consistency, per set, over the correlation window.
        window_n = d["window"]["n"]
        for set_name in d["sets"]:
            partial = d["partial_correlations"][set_name]
            if window_n == 0:
                assert partial == {}
                continue
            assert set(partial) == PARTIAL_METRICS
            for metric, c in partial.items():
                # over the window's checkpoints where the set is defined (a growing set: >= 2 samples)
                start = steps.index(d["window"]["start_step"])
                defined = set_sizes(d["sets"][set_name], n_checkpoints)[start:start + window_n] >= 2
                assert c["n"] == (window_n if "n_per_checkpoint" not in d["sets"][set_name] else int(defined.sum()))
                if c["n"] > 2 + PARTIAL_CONTROLS:
                    assert -1 <= c["r"] <= 1 and 0 <= c["p"] <= 1, (set_name, metric)
                else:
                    assert math.isnan(c["r"]), (set_name, metric)
            assert partial["distance"] == partial["distance_char"]

        # Per-layer distance [C, L]: the whole pathway's distance is at most the sum of its layers' distances.
        assert set(d["per_layer_distance"]) == {"memorized", "held_out"} & set(d["sets"])
        for set_name, per_layer in d["per_layer_distance"].items():
            per_layer = _values(per_layer)
            assert per_layer.shape == (n_checkpoints, num_layers)
            defined = set_sizes(d["sets"][set_name], n_checkpoints) >= 2
            assert np.isfinite(per_layer[defined]).all()
            whole = _values(d["sets"][set_name]["curves"]["distance_char"])[defined]
            assert np.all(whole <= per_layer[defined].sum(axis=1) + 1e-9)

        # tau sweep: one distance curve per tau; the analysis' own tau gives the memorized set's curve.
        assert set(d["tau_sweep"]) == {str(t) for t in options["tau_sweep"]}
        for t in d["tau_sweep"].values():
            assert _values(t["distance"]).shape == (n_checkpoints,) and "pearson_r" in t["correlation"]
        if str(options["tau"]) in d["tau_sweep"]:
            np.testing.assert_array_equal(_values(d["tau_sweep"][str(options["tau"])]["distance"]),
                                          _values(d["sets"]["memorized"]["curves"]["distance"]))

        # (eps, delta) sweep: every pair once; the share memorized grows with eps; (1 x eps, delta) is the analysis.
        sweep = d["eps_delta_sweep"]
        assert sorted((r["delta"], r["eps_multiple"]) for r in sweep) == sorted(
            (delta, multiple) for delta in options["delta_sweep"] for multiple in options["eps_sweep"])
        for delta in options["delta_sweep"]:
            shares = [r["share_before_end"] for r in sorted(sweep, key=lambda r: r["eps_multiple"])
                      if r["delta"] == delta]
            assert shares == sorted(shares)
        own = [r for r in sweep if r["delta"] == options["delta"] and r["eps_multiple"] == 1.0]
        assert len(own) == 1 and own[0]["eps"] == pytest.approx(d["memorization"]["eps"])
        assert own[0]["share_before_end"] == pytest.approx(d["memorization"]["share_before_end"])
        assert all({"distance_correlation", "consistency_correlation"} <= set(r) for r in sweep)

    # Parameter dynamics: every family between every two consecutive checkpoints.
    dynamics = report["parameter_dynamics"]
    families = sorted({r["family"] for r in dynamics})
    assert "router" in families and "experts" in families
    assert sorted((r["step_from"], r["step_to"], r["family"]) for r in dynamics) == sorted(
        (a, b, f) for a, b in zip(steps, steps[1:], strict=False) for f in families)
    for r in dynamics:
        assert math.isfinite(r["relative_change"]) and -1 <= r["stability"] <= 1
        assert r["speed_per_1k_steps"] == pytest.approx(r["relative_change"] * 1000 / (r["step_to"] - r["step_from"]))

    _check_files(report, out_dir)


def _check_files(report, out_dir):
    """summary.json is the report; the CSVs hold its curves, partial correlations, sweeps and dynamics."""
    with open(os.path.join(out_dir, "summary.json")) as f:
        assert strict_json.dumps(strict_json.loads(f.read())) == strict_json.dumps(report)  # strict: NaN as null
    steps = [str(s) for s in report["steps"]]
    per_checkpoint = _csv_rows(os.path.join(out_dir, "per_checkpoint.csv"))
    table1 = _csv_rows(os.path.join(out_dir, "table1.csv"))
    sweeps = _csv_rows(os.path.join(out_dir, "sweeps.csv"))
    for domain_name, d in report["domains"].items():
        memorized = d["sets"]["memorized"]["curves"]
        for metric in (*DISTANCE_VARIANTS, "pathway_length", "routing_entropy"):
            rows = [r for r in per_checkpoint if (r["domain"], r["group"], r["set"], r["metric"])
                    == (domain_name, "", "memorized", metric)]
            assert [r["step"] for r in rows] == steps, metric
            written = np.array([float(r["value"]) if r["value"] else np.nan for r in rows])
            np.testing.assert_allclose(written, memorized[metric], rtol=1e-5)
        mine = {(r["metric"], r["window"]): r for r in table1 if r["domain"] == domain_name}
        for set_name, partial in d["partial_correlations"].items():
            for metric, c in partial.items():
                row = mine[(f"{set_name}/{metric}|entropy,length", "window_partial")]
                assert int(row["n"]) == c["n"] and (row["pearson_r"] == "" if math.isnan(c["r"])
                                                    else float(row["pearson_r"]) == pytest.approx(c["r"], abs=1e-5))
        for metric in ("memorized/distance_char_normalized", "memorized/distance_token"):
            assert {(metric, "window"), (metric, "full")} <= set(mine)
        tau_rows = [r for r in sweeps if r["domain"] == domain_name and r["sweep"] == "tau"]
        assert sorted(r["tau"] for r in tau_rows) == sorted(d["tau_sweep"])
        eps_rows = [r for r in sweeps if r["domain"] == domain_name and r["sweep"] == "eps_delta"]
        assert [float(r["share_before_end"]) for r in eps_rows] == pytest.approx(
            [r["share_before_end"] for r in d["eps_delta_sweep"]], abs=1e-5)
    dynamics = _csv_rows(os.path.join(out_dir, "param_dynamics.csv"))
    assert [(int(r["step_from"]), r["family"]) for r in dynamics] == [
        (r["step_from"], r["family"]) for r in report["parameter_dynamics"]]
    with open(os.path.join(out_dir, "table.txt")) as f:
        text = f.read()
    if any(d["partial_correlations"].get("memorized") for d in report["domains"].values()):
        assert "partial r(distance_token, test acc | entropy, length)" in text
