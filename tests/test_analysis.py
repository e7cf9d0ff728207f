"""The paper's analysis on hand-built checkpoint statistics: every rule, control and degenerate case."""
import csv
import dataclasses
import json
import math

import numpy as np
import pytest

from moe_grok import strict_json
from moe_grok.analysis import analyze as analyze_lib
from moe_grok.analysis import metrics, registry, run_warnings
from moe_grok.analysis import test_results as test_results_lib
from moe_grok.analysis.options import AnalysisOptions, analysis_config
from moe_grok.analysis.pathways import pathway_expert_lists, pathway_string
from moe_grok.report import plots
from moe_grok.report.files import format_table, read_summary, write_report

from analysis_helpers import HIDDEN, LAYERS, STEPS, build_stats


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_pretrain_groups_controls_pairs_and_table(rng, tmp_path):
    # domain "a" = even samples: settle at checkpoints 1, 1, 2, 2, 3, 5 (= T: trivial, not memorized), never...
    settle = [1, 4, 1, 4, 2, None, 2, None, 3, None, 5, None, None, None, None, None]
    stats, splits = build_stats(rng, settle)
    test = test_results_lib.test_results_from_split(stats, "test", splits["test"])
    options = AnalysisOptions(eps=0.5, max_pairs=None, tau_sweep=(0.5, 0.8), delta_sweep=(0.05,),
                                          eps_sweep=(1.0,))
    report = analyze_lib.analyze(stats, splits, "train", test, "test", options=options)
    a = report["domains"]["a"]
    assert a["memorization"]["eps_source"] == "fixed"
    assert a["memorization"]["n_memorized_before_end"] == 5 and a["memorization"]["n_memorized_at_end"] == 1
    # Pretrain@t*: samples sharing t* (train rows of domain a are 0, 2, 4, ...)
    assert {name: g["n"] for name, g in a["pretrain_groups"].items()} == {
        "Pretrain@100": 2, "Pretrain@200": 2, "Pretrain@300": 1}
    group = a["pretrain_groups"]["Pretrain@100"]
    for metric in ("distance", "distance_char", "distance_char_normalized", "distance_token", "consistency",
                   "pathway_length", "routing_entropy", "train_loss"):
        assert len(group["curves"][metric]) == len(STEPS)
        assert metric in group["trend_after_t_star"]
    assert set(group["controls"]) == {"held_out", "random_train"} and "distance_to_random_train" in group["cross"]
    assert "fewer than 2 samples" in a["pretrain_groups"]["Pretrain@300"]["note"]
    assert math.isnan(a["pretrain_groups"]["Pretrain@300"]["curves"]["distance"][0])
    # The group's distance at a checkpoint equals the direct computation on its members' pathways.
    members = [0, 2]
    strings = [pathway_string(e) for e in pathway_expert_lists(stats[3].splits["train"]["mean_weights"][members])]
    assert group["curves"]["distance"][3] == pytest.approx(metrics.group_pathway_distance(strings))
    # Test@t#: test samples of domain a become correct at checkpoints 2, 3, 4, 5, 2, 3
    assert {name: g["n"] for name, g in a["test_groups"].items()} == {
        "Test@200": 2, "Test@300": 2, "Test@400": 1, "Test@500": 1}
    # no embeddings: pairing in chronological order, delay = q - p
    assert [(p["pretrain"], p["test"], p["delay"]) for p in a["pairs"]] == [
        ("Pretrain@100", "Test@200", 100), ("Pretrain@200", "Test@300", 100), ("Pretrain@300", "Test@500", 200)]
    # controls sit beside the memorized set, same size (all 3 non-memorized training samples when fewer)
    assert {name: s["n"] for name, s in a["sets"].items()} == {"memorized": 5, "held_out": 5, "random_train": 3}
    for key in ("memorized/distance", "held_out/consistency", "random_train/pathway_length", "train_loss",
                "train_loss_moving_average", "memorized/distance_token"):
        assert set(a["table1"][key]) == {"window", "full"}
    for set_name in ("memorized", "held_out", "random_train"):  # every distance variant, controlled
        assert set(a["partial_correlations"][set_name]) == {"distance", "distance_char", "distance_char_normalized",
                                                            "distance_token", "consistency"}
    assert set(a["tau_sweep"]) == {"0.5", "0.8"} and len(a["eps_delta_sweep"]) == 1
    assert np.asarray(a["per_layer_distance"]["memorized"]).shape == (len(STEPS), LAYERS)
    assert "a|b" in report["cross_domain_distance"]
    assert report["parameter_dynamics"][0]["family"] == "router"
    paths = write_report(report, str(tmp_path))
    for name in ("summary.json", "table1.csv", "groups.csv", "pairs.csv", "groups.png", "pairs.png", "per_layer.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = format_table(report)
    assert "Pretrain@100 -> Test@200" in text and "control: distance (held-out test samples)" in text
    assert paths["pairs.csv"].endswith("pairs.csv")


def test_scored_positions_use_the_scored_routing_entropy(rng):
    stats, splits = build_stats(rng, [1] * 8 + [None] * 8)
    memorized = np.arange(0, 8, 2)  # domain a's memorized rows (from checkpoint 1; the fixed set: at every one)
    options = AnalysisOptions(eps=0.5, memorized_set="fixed")
    for positions, field in (("all", "routing_entropy"), ("scored", "scored_routing_entropy")):
        report = analyze_lib.analyze(stats, splits, "train", options=options, positions=positions)
        expected = [s.splits["train"][field][memorized].mean() for s in stats]
        assert report["domains"]["a"]["sets"]["memorized"]["curves"]["routing_entropy"] == pytest.approx(expected)


def test_per_layer_distance_equals_single_layer_pathways(rng):
    stats, splits = build_stats(rng, [1] * 8 + [None] * 8)
    report = analyze_lib.analyze(stats, splits, "train", options=AnalysisOptions(eps=0.5, max_pairs=None))
    memorized = np.arange(0, 8, 2)  # domain a's memorized rows
    per_layer = np.asarray(report["domains"]["a"]["per_layer_distance"]["memorized"])
    for c in (1, 4):
        experts = pathway_expert_lists(stats[c].splits["train"]["mean_weights"][memorized], 0.7)
        for layer in range(LAYERS):
            strings = [pathway_string([e[layer]]) for e in experts]
            assert per_layer[c, layer] == pytest.approx(metrics.group_pathway_distance(strings))


def test_degenerate_domains_are_reported_not_crashed(rng):
    settle = [None] * 6 + [None, 1]  # domain a: nothing memorized before T; domain b: one sample
    stats, splits = build_stats(rng, settle)
    test = test_results_lib.test_results_from_split(stats, "test", splits["test"])
    report = analyze_lib.analyze(stats, splits, "train", test, "test", options=AnalysisOptions(eps=0.5))
    a, b = report["domains"]["a"], report["domains"]["b"]
    assert a["pretrain_groups"] == {} and a["pairs"] == []
    assert all(math.isnan(v) for v in a["sets"]["memorized"]["curves"]["distance"])
    assert math.isnan(a["table1"]["memorized/distance"]["window"]["pearson_r"])
    assert list(b["pretrain_groups"]) == ["Pretrain@100"]
    assert any("'a': 0 sample(s) memorized" in w for w in report["warnings"])


def test_calibration_miss_and_unreachable_target_are_reported(rng):
    stats, splits = build_stats(rng, [1] * 16)  # every sample settles at checkpoint 1: share 100% or 0%
    report = analyze_lib.analyze(stats, splits, "train", options=AnalysisOptions())
    memorization = report["domains"]["a"]["memorization"]
    assert memorization["in_target_range"] is False and memorization["eps_source"] == "calibrated"
    assert any("no grid eps" in w for w in report["warnings"])
    stats, splits = build_stats(rng, [None] * 16)
    for c, s in enumerate(stats):  # still falling by 0.3 nats per checkpoint at the end: nothing settles
        s.splits["train"]["loss"][:] = 3.0 - 0.3 * c
    report = analyze_lib.analyze(stats, splits, "train", options=AnalysisOptions())
    assert report["domains"]["a"]["memorization"]["eps_source"] == "unreachable"
    assert "no eps on the grid reaches" in report["domains"]["a"]["memorization"]["error"]


def test_bad_inputs_name_the_problem(rng):
    stats, splits = build_stats(rng, [1, 2] * 8)
    with pytest.raises(ValueError, match=r"match no training domain \['a', 'b'\]; 'A' \(did you mean 'a'\?\)"):
        analyze_lib.analyze(stats, splits, "train", test_results_lib.TestResults({"A": np.zeros(len(STEPS))}))
    with pytest.raises(ValueError, match="test accuracy of domain 'a' has 3 values for 6 checkpoints"):
        analyze_lib.analyze(stats, splits, "train", test_results_lib.TestResults({"a": np.zeros(3)}))
    with pytest.raises(ValueError, match=r"train.*embeddings have shape \(3, 2\), need \[16, dim\]"):
        analyze_lib.analyze(stats, splits, "train", train_embeddings=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="tau and tau_sweep must lie in"):
        AnalysisOptions(tau=1.5)
    with pytest.raises(ValueError, match="distance_level"):
        AnalysisOptions(distance_level="word")
    with pytest.raises(ValueError, match="positions"):
        AnalysisOptions(positions=("answer",))


def test_two_layer_models_warn_that_consistency_is_constant(rng):
    stats, splits = build_stats(rng, [1, 2] * 8, layers=2)
    report = analyze_lib.analyze(stats, splits, "train", options=AnalysisOptions(eps=0.5, memorized_set="fixed"))
    assert any("2 MoE layers" in w for w in report["warnings"])
    assert report["domains"]["a"]["sets"]["memorized"]["curves"]["consistency"] == pytest.approx([1.0] * len(STEPS))


def _stats_with_unbounded_consistency(rng):
    """build_stats whose samples have unbounded consistency at checkpoints 2 and 4 (steps 200, 400).

    Every expert of a layer shares one router row, so a sample's routing embedding is that row:
    alternating its sign across layers gives consecutive-layer cosines of -1 at checkpoints 2 and 4,
    +1 elsewhere."""
    stats, splits = build_stats(rng, [1, 2] * 8)
    direction = rng.normal(size=HIDDEN).astype(np.float32)
    for c, s in enumerate(stats):
        signs = (-1.0) ** np.arange(LAYERS) if c in (2, 4) else np.ones(LAYERS)
        s.router[:] = signs[:, None, None] * direction
    return stats, splits


def test_unbounded_consistency_is_counted_and_warned(rng, tmp_path):
    stats, splits = _stats_with_unbounded_consistency(rng)
    report = analyze_lib.analyze(stats, splits, "train", options=AnalysisOptions(eps=0.5, memorized_set="fixed"))
    share = report["domains"]["a"]["sets"]["memorized"]["curves"]["consistency_unbounded_share"]
    assert share == pytest.approx([0, 0, 1, 0, 1, 0])
    warnings = [w for w in report["warnings"] if "consistency is unbounded" in w]
    assert [w.split(":")[0] for w in warnings] == ["domain 'a'", "domain 'b'"]
    assert "memorized at step(s) [200, 400] (up to 100% of samples)" in warnings[0]
    assert "Pretrain@100 at step(s) [200, 400]" in warnings[0]
    write_report(report, str(tmp_path), with_plots=False)
    with open(tmp_path / "per_checkpoint.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()]
    assert ["400", "a", "", "memorized", "consistency_unbounded_share", "1"] in rows


def test_unbounded_consistency_warning_stays_short(rng, monkeypatch):
    """Past the listing limits the warning counts checkpoints and sets instead of naming them all."""
    stats, splits = _stats_with_unbounded_consistency(rng)

    def warning_of_domain_a():
        report = analyze_lib.analyze(stats, splits, "train", options=AnalysisOptions(eps=0.5))
        return next(w for w in report["warnings"] if w.startswith("domain 'a'") and "unbounded" in w)

    flagged_sets = warning_of_domain_a().count(" at step(s) [200, 400]")
    assert flagged_sets > 1
    monkeypatch.setattr(run_warnings, "MAX_LISTED_STEPS", 1)
    monkeypatch.setattr(run_warnings, "MAX_LISTED_SETS", 1)
    warning = warning_of_domain_a()
    assert "samples of memorized at 2 of 6 checkpoints (steps 200..400) (up to 100% of samples); " \
           f"{flagged_sets - 1} more set(s); see" in warning
    assert "step(s) [" not in warning


def test_options_from_config_round_trip():
    config = analysis_config(max_pairs=0, tau_sweep=(0.6,), positions=("all", "scored"))
    config.eps = 0.3
    options = AnalysisOptions.from_config(config)
    assert options.max_pairs is None and options.eps == 0.3 and options.positions == ("all", "scored")
    assert set(config) == {f for f in AnalysisOptions.__dataclass_fields__}


def _reject_constant(name):
    raise ValueError(f"non-strict JSON constant {name}")


def test_summary_json_is_strict_and_reads_back_with_nan(rng, tmp_path):
    # Pretrain@300 has one sample (its distances are NaN); the options hold None (max_pairs)
    settle = [1, 4, 1, 4, 2, None, 2, None, 3, None, 5, None, None, None, None, None]
    stats, splits = build_stats(rng, settle)
    test = test_results_lib.test_results_from_split(stats, "test", splits["test"])
    options = AnalysisOptions(eps=0.5, max_pairs=None, delta_sweep=(0.05,), eps_sweep=(1.0,))
    report = analyze_lib.analyze(stats, splits, "train", test, "test", options=options)
    assert math.isnan(report["domains"]["a"]["pretrain_groups"]["Pretrain@300"]["curves"]["distance"][0])
    write_report(report, str(tmp_path), with_plots=False)
    text = (tmp_path / "summary.json").read_text()
    parsed = json.loads(text, parse_constant=_reject_constant)  # NaN / Infinity tokens would raise
    assert parsed["domains"]["a"]["pretrain_groups"]["Pretrain@300"]["curves"]["distance"][0] is None
    back = read_summary(str(tmp_path / "summary.json"))
    assert math.isnan(back["domains"]["a"]["pretrain_groups"]["Pretrain@300"]["curves"]["distance"][0])
    assert back["options"]["max_pairs"] is None and back["domains"]["a"]["memorization"]["in_target_range"] is None
    assert strict_json.dumps(back) == strict_json.dumps(report)
    with pytest.raises(ValueError, match="NaN"):
        strict_json.loads('{"x": NaN}')


def _doubled_char_distance(engine, split, rows, checkpoint):
    return 2.0 * engine.distance(split, rows, checkpoint, "char", False)


DOUBLED = registry.Metric(
    "distance_test_doubled", _doubled_char_distance, "variant", "doubled distance", "doubled character distance (test)",
    "2 x edit distance (characters)", family="distance", table_label="distance, doubled (test)", plot="distances",
    computed_on=registry.VARIANT_SCOPES, partial=True)


@pytest.fixture
def doubled_variant():
    with registry.registered(DOUBLED) as metric:
        yield metric
    assert DOUBLED.name not in registry.names()


def test_one_registry_entry_adds_a_distance_variant_everywhere(rng, tmp_path, doubled_variant):
    settle = [1, 4, 1, 4, 2, None, 2, None, 3, None, 5, None, None, None, None, None]
    stats, splits = build_stats(rng, settle)
    test = test_results_lib.test_results_from_split(stats, "test", splits["test"])
    options = AnalysisOptions(eps=0.5, max_pairs=None, delta_sweep=(0.05,), eps_sweep=(1.0,))
    report = analyze_lib.analyze(stats, splits, "train", test, "test", options=options)
    a = report["domains"]["a"]
    name = doubled_variant.name
    for set_name in ("memorized", "held_out", "random_train"):
        curves = a["sets"][set_name]["curves"]
        np.testing.assert_allclose(curves[name], 2 * np.asarray(curves["distance_char"]))
        assert name in a["partial_correlations"][set_name]
    group = a["pretrain_groups"]["Pretrain@100"]
    assert name in group["curves"] and name in group["trend_after_t_star"]
    assert name not in group["controls"]["held_out"] and name not in report["global"]["curves"]  # not in its scopes
    assert set(a["table1"][f"memorized/{name}"]) == {"window", "full"}

    write_report(report, str(tmp_path), with_plots=False)
    with open(tmp_path / "per_checkpoint.csv") as f:
        rows = list(csv.reader(f))
    assert any(r[1:5] == ["a", "", "memorized", name] for r in rows)
    with open(tmp_path / "table1.csv") as f:
        metrics_in_table = {r[1] for r in csv.reader(f)}
    assert {f"memorized/{name}", f"memorized/{name}|entropy,length"} <= metrics_in_table
    assert "distance, doubled (test)" in (tmp_path / "table.txt").read_text()

    figure = plots.distances_figure(report)
    titles = {ax.get_title(): ax.get_ylabel() for ax in figure.axes}
    assert titles["a: doubled character distance (test)"] == "2 x edit distance (characters)"
    assert titles["b: doubled character distance (test)"] == "2 x edit distance (characters)"


def test_registry_refuses_duplicates_and_bad_entries():
    assert "distance_test_doubled" not in registry.names()  # the fixture above unregistered it
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("distance"))
    with pytest.raises(ValueError, match="role must be one of"):
        dataclasses.replace(DOUBLED, role="favourite")
    with pytest.raises(ValueError, match="computed_on"):
        dataclasses.replace(DOUBLED, computed_on=("everywhere",))


def test_protocol_quantities_come_from_the_registry():
    from moe_grok.studies import protocol_stats

    with registry.registered(dataclasses.replace(DOUBLED, paper_sign=-1.0)):
        sides = {key: side for key, _, side in protocol_stats.quantities()}
    name = DOUBLED.name
    assert sides[f"h1_{name}_slope"] == "<0" and sides[f"h2_{name}_margin_over_loss"] == ">0"
    assert sides[f"r_{name}"] == "" and sides[f"h3_{name}_alignment"] == ">0"
    assert f"h1_{name}_slope" not in {key for key, _, _ in protocol_stats.quantities()}
    assert {"h1_distance_slope", "h1_consistency_slope"} <= {key for key, _, _ in protocol_stats.quantities()}


def test_table1_memorized_set_grows_with_the_samples_memorized_by_each_checkpoint(rng):
    """Issue 34, defect 1: the paper's metrics are on samples that HAVE been memorized (t* <= t), with
    controls of the same size per checkpoint; the fixed set {t* < T} and the early groups stay options."""
    settle = [1, None, 1, None, 2, None, 3, None, 3, None, None, None, None, None, None, None]
    # domain a = even rows: t* = 100, 100, 200, 300, 300, and 3 rows never memorized
    stats, splits = build_stats(rng, settle)
    test = test_results_lib.test_results_from_split(stats, "test", splits["test"])
    base = dict(eps=0.5, max_pairs=None, tau_sweep=(0.7,), delta_sweep=(0.05,), eps_sweep=(1.0,))
    a = analyze_lib.analyze(stats, splits, "train", test, "test", options=AnalysisOptions(**base))["domains"]["a"]
    assert a["memorized_set"] == "growing"
    assert a["sets"]["memorized"]["n_per_checkpoint"] == [0, 2, 3, 5, 5, 5]
    assert a["sets"]["random_train"]["n_per_checkpoint"] == [0, 2, 3, 3, 3, 3]  # 3 never-memorized rows of a
    assert a["sets"]["held_out"]["n_per_checkpoint"] == [0, 2, 3, 5, 5, 5]
    curves = a["sets"]["memorized"]["curves"]
    assert math.isnan(curves["distance"][0]) and math.isnan(curves["consistency"][0])  # < 2 samples: NaN
    strings = [pathway_string(e) for e in pathway_expert_lists(stats[2].splits["train"]["mean_weights"][[0, 2, 4]])]
    assert curves["distance"][2] == pytest.approx(metrics.group_pathway_distance(strings))
    assert curves["train_loss"][2] == pytest.approx(stats[2].splits["train"]["loss"][[0, 2, 4]].mean())
    window = a["table1"]["memorized/distance"]["window"]
    assert window["n"] == sum(np.isfinite(curves["distance"][a["window"]["start_step"] // 100:
                                                           a["window"]["end_step"] // 100 + 1]))
    fixed = analyze_lib.analyze(stats, splits, "train", test, "test",
                                options=AnalysisOptions(**base, memorized_set="fixed"))["domains"]["a"]
    assert fixed["sets"]["memorized"]["n"] == 5 and "n_per_checkpoint" not in fixed["sets"]["memorized"]
    early = analyze_lib.analyze(stats, splits, "train", options=AnalysisOptions(
        **base, memorized_set="early_groups", early_group_min_size=2))["domains"]["a"]
    assert early["sets"]["memorized"]["n"] == 4  # Pretrain@100 and Pretrain@300 (2 each), not Pretrain@200 (1)
    with pytest.raises(ValueError, match="memorized_set"):
        AnalysisOptions(memorized_set="all")


def test_parameter_dynamics_give_appendix_d_speed_and_stability():
    """Issue 34, defect 5: the norm change normalized by the norm, how much it shrinks from early to
    late training (speed) and 1 / its standard deviation (stability), beside relative change and cosine."""
    from moe_grok.analysis.param_dynamics import dynamics_summary, parameter_dynamics

    norms = [5.0, 10.0, 11.0, 11.55, 11.55 * 1.01]  # normalized norm changes 1.0, 0.1, 0.05, 0.01
    samples = [{"layers/moe/router": np.array([0.6, 0.8]) * n, "layers/moe/router#size": np.int64(2)} for n in norms]
    rows = parameter_dynamics([0, 100, 200, 300, 400], samples)
    assert [r["normalized_norm_change"] for r in rows] == pytest.approx([1.0, 0.1, 0.05, 0.01])
    assert rows[0]["relative_change"] == pytest.approx(1.0) and rows[0]["stability"] == pytest.approx(1.0)
    summary = dynamics_summary(rows)["router"]
    assert summary["early_change"] == pytest.approx(0.55) and summary["late_change"] == pytest.approx(0.03)
    assert summary["convergence_speed"] == pytest.approx((0.55 - 0.03) / 0.55)
    assert summary["norm_stability"] == pytest.approx(1 / np.std([1.0, 0.1, 0.05, 0.01], ddof=1))
