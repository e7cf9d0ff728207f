"""What round 4 of the toy protocol needs (docs/protocol.md, "Round 4"): a cosine learning-rate decay,
pairing by an embedding of the operands, the exploratory answer-aligned routing, the training-step
baseline, window sizes and degrees of freedom, and the memorized-minus-control contrasts."""
import itertools
import math

import ml_collections
import numpy as np
import pytest

from moe_grok.analysis import analyze as analyze_lib
from moe_grok.analysis import metrics, registry, statistics
from moe_grok.analysis import test_results as test_results_lib
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.analysis.pathways import pathway_expert_lists, pathway_string
from moe_grok.analysis.set_metrics import SetMetrics
from moe_grok.data import tasks
from moe_grok.data.splits import EvalSplit
from moe_grok.report import files
from moe_grok.studies import protocol_pages, protocol_stats, toy_run
from moe_grok.training import optimizer, run_dir

from analysis_helpers import build_stats
from config_files import load_config


def _train(**changes) -> ml_collections.ConfigDict:
    train = load_config("toy_grokking").train
    train.update(changes)
    return train


def test_cosine_decay_is_opt_in_and_reaches_zero_at_its_step():
    constant = optimizer.learning_rate_schedule(_train(learning_rate=2e-3, warmup_steps=50))
    assert float(constant(50)) == pytest.approx(2e-3) and float(constant(3000)) == pytest.approx(2e-3)
    cosine = optimizer.learning_rate_schedule(_train(learning_rate=2e-3, warmup_steps=50, cosine_decay_steps=1050))
    assert float(cosine(25)) == pytest.approx(1e-3)  # the same warmup
    assert float(cosine(550)) == pytest.approx(1e-3, rel=1e-4)  # half-way through the decay: half the peak
    assert float(cosine(1050)) == pytest.approx(0.0, abs=1e-12) and float(cosine(4000)) == pytest.approx(0.0, abs=1e-12)
    assert "cosine_decay_steps" in optimizer.OPTIMIZER_KEYS  # a different schedule compiles a different step
    with pytest.raises(ValueError, match="cosine_decay_steps must be"):
        run_dir.validate_train_config(_train(warmup_steps=50, cosine_decay_steps=50))
    # a run recorded before the key existed trained with a constant rate: it resumes as one
    assert run_dir.ADDED_IDENTITY_FIELDS["train.cosine_decay_steps"] == 0


def test_round4_arms_are_the_registered_ones():
    round1, round2, round4 = (load_config(n) for n in ("toy_protocol", "toy_protocol_round2", "toy_protocol_round4"))
    arms = round4.arms
    assert set(arms) == {"grokking", "random_labels", "no_weight_decay", "grokking_round2", "random_labels_round2",
                         "no_weight_decay_round2", "cosine_round2", "late"} == set(round4.seeds_per_arm)
    flat = {name: run_dir.flatten(arm.to_dict()) for name, arm in arms.items()}
    pairing = {"analysis.pairing_embedding", "analysis.answer_aligned", "analysis.step_baseline"}
    for name, arm in (("grokking", round1.arms.grokking), ("random_labels", round1.arms.random_labels),
                      ("no_weight_decay", round1.arms.no_weight_decay), ("grokking_round2", round2.arms.grokking),
                      ("random_labels_round2", round2.arms.random_labels),
                      ("no_weight_decay_round2", round2.arms.no_weight_decay)):
        before = run_dir.flatten(arm.to_dict())
        assert {k for k in before.keys() | flat[name].keys() if before.get(k) != flat[name].get(k)} == pairing, name
    a2 = flat["grokking_round2"]
    for name, expected in (("cosine_round2", {"train.cosine_decay_steps": 3000}),
                           ("late", {"task.train_fraction": 0.3, "train.steps": 6000})):
        assert {k: v for k, v in flat[name].items() if a2.get(k) != v} == expected, name
    assert load_config("toy_pilot_round4").task.train_fraction == 0.3
    assert all(arm.analysis.pairing_embedding == "operands" and arm.analysis.answer_aligned
               and arm.analysis.step_baseline for arm in arms.values())
    assert round4.seeds == 8


def test_operand_embeddings_pair_groups_without_files():
    inputs = np.array([[0, 7, 0, 8], [1, 7, 0, 8], [3, 7, 5, 8]])
    embedding = tasks.operand_embeddings(inputs, p=7)
    assert embedding.shape == (3, tasks.OPERAND_EMBEDDING_DIM)
    unit = embedding / np.linalg.norm(embedding, axis=1, keepdims=True)
    a, b = inputs[:, 0], inputs[:, 2]
    expected = (np.cos(2 * np.pi * (a[:, None] - a[None]) / 7) + np.cos(2 * np.pi * (b[:, None] - b[None]) / 7)) / 2
    np.testing.assert_allclose(unit @ unit.T, expected, atol=1e-12)
    config = load_config("toy_grokking")
    config.task.p = 7
    splits = tasks.evaluation_splits(tasks.make_dataset(toy_run.task_spec(config)))
    assert toy_run.pairing_embeddings(config, splits) == {"train": None, "test": None}  # default: by domain
    config.analysis.pairing_embedding = "operands"
    pairing = toy_run.pairing_embeddings(config, splits)
    for split in ("train", "test"):
        np.testing.assert_array_equal(pairing[split], tasks.operand_embeddings(splits[split].tokens, 7))
    config.analysis.train_embeddings = "train.npy"
    with pytest.raises(ValueError, match="choose one"):
        toy_run.pairing_embeddings(config, splits)


def test_answer_aligned_distance_is_same_answer_minus_random_pairs():
    pathways = ["ab", "ab", "cd", "ce", "ab", "xy"]
    answers = np.array([1, 1, 2, 2, 3, 1])
    assert metrics.same_label_pairs(answers).tolist() == [[0, 1], [0, 5], [1, 5], [2, 3]]
    same = np.mean([0, 2, 2, 1])  # Levenshtein of the pairs above
    every = np.mean([metrics.pairwise_pathway_distances(pathways)[i, j]
                     for i, j in itertools.combinations(range(6), 2)])
    assert metrics.answer_aligned_distance(pathways, answers) == pytest.approx(same - every)
    assert math.isnan(metrics.answer_aligned_distance(pathways[:3], np.array([1, 2, 3])))  # no shared answer
    split = EvalSplit(np.zeros((2, 3), np.int32), np.ones((2, 3), np.int32), np.array([[0, 0, 5], [0, 0, 9]]),
                      np.array([[0, 0, 1], [0, 0, 1]]), np.zeros(2, np.int32), ("a",))
    assert split.answers().tolist() == [5, 9]
    with pytest.raises(ValueError, match="more than one scored position"):
        EvalSplit(split.tokens, split.mask, split.targets, np.ones((2, 3), np.int32), split.groups, ("a",)).answers()
    assert registry.get("answer_aligned").role == "exploratory" and registry.get("answer_aligned").paper_sign == -1
    assert registry.get("distance_char_normalized").paper_sign == -1  # round 4's primary metric is tested


def _one_answer(split: EvalSplit, answers: np.ndarray) -> EvalSplit:
    targets = np.zeros_like(split.tokens)
    targets[:, -1] = answers
    mask = np.zeros_like(split.tokens)
    mask[:, -1] = 1
    return EvalSplit(split.tokens, split.mask, targets, mask, split.groups, split.group_names)


@pytest.fixture(scope="module")
def round4_report():
    rng = np.random.default_rng(0)
    stats, splits = build_stats(rng, [1, None, 1, None, 2, None, 3, None, 3, None, None, None, 2, 1, 1, 2])
    splits = {name: _one_answer(s, np.arange(len(s.groups)) % 3) for name, s in splits.items()}
    test = test_results_lib.test_results_from_split(stats, "test", splits["test"])
    base = dict(eps=0.5, max_pairs=None, tau_sweep=(0.7,), delta_sweep=(0.05,), eps_sweep=(1.0,))
    plain = analyze_lib.analyze(stats, splits, "train", test, "test", options=AnalysisOptions(**base))
    report = analyze_lib.analyze(stats, splits, "train", test, "test",
                                 options=AnalysisOptions(**base, answer_aligned=True, step_baseline=True))
    return stats, splits, plain, report


def test_answer_aligned_and_the_step_baseline_are_opt_in_rows_of_table1(round4_report):
    stats, splits, plain, report = round4_report
    a, plain_a = report["domains"]["a"], plain["domains"]["a"]
    assert "answer_aligned" not in plain_a["sets"]["memorized"]["curves"] and "training_step" not in plain_a["curves"]
    assert files.format_table(plain) == files.format_table(  # the default report is the one without them
        {**report, "domains": {d: {**v, "table1": {k: c for k, c in v["table1"].items()
                                                   if "answer_aligned" not in k and k != "training_step"}}
                               for d, v in report["domains"].items()}})
    for name in ("memorized", "held_out", "random_train"):
        assert f"{name}/answer_aligned" in a["table1"]
    rows = {key for key, _ in files.table1_rows()}
    assert {"training_step", "memorized/answer_aligned", "held_out/answer_aligned"} <= rows
    # the engine measures a set with the samples' answers from the splits, on the primary distance's pathways
    engine = SetMetrics(stats, AnalysisOptions(max_pairs=None), "all",
                        {name: s.answers() for name, s in splits.items()})
    assert engine.has("answers") and not SetMetrics(stats, AnalysisOptions(), "all").has("answers")
    rows = np.arange(0, 16, 2)
    strings = [pathway_string(e) for e in pathway_expert_lists(stats[2].splits["train"]["mean_weights"][rows], 0.7)]
    assert engine.answer_aligned("train", rows, 2, "char", False) == pytest.approx(
        metrics.answer_aligned_distance(strings, splits["train"].answers()[rows]))
    assert np.isfinite(a["sets"]["memorized"]["curves"]["answer_aligned"]).any()
    assert np.isfinite(a["sets"]["held_out"]["curves"]["answer_aligned"]).any()
    steps = np.asarray(report["steps"], float)
    window = a["window"]
    part = (steps >= window["start_step"]) & (steps <= window["end_step"])
    expected = statistics.pearson_r(steps[part], np.asarray(a["curves"]["test_accuracy"])[part])
    assert a["table1"]["training_step"]["window"]["pearson_r"] == pytest.approx(expected)
    assert a["table1"]["training_step"]["window"]["n"] == window["n"]
    for partial in a["partial_correlations"]["memorized"].values():
        assert partial["df"] == partial["n"] - 4  # two controls: entropy and length
    assert protocol_stats.window_sizes([report])["window_n"] == [min(d["window"]["n"] for d in
                                                                     report["domains"].values()),
                                                                 max(d["window"]["n"] for d in
                                                                     report["domains"].values())]


def test_control_contrasts_carry_the_registered_sign():
    table = {"memorized/distance_char_normalized": {"window": {"pearson_r": -0.9}},
             "held_out/distance_char_normalized": {"window": {"pearson_r": -0.5}},
             "random_train/distance_char_normalized": {"window": {"pearson_r": 0.2}},
             "train_loss": {"window": {"pearson_r": -0.7}}}
    curves = {name: [1.0] * 6 for name in ("routing_entropy", "pathway_length")}
    report = {"steps": [0, 100, 200, 300, 400, 500], "domains": {"d": {
        "curves": {"test_accuracy": [0, 0, 0.95, 1, 1, 1]}, "pretrain_groups": {}, "table1": table,
        "memorization": {"share_before_end": 0.2}, "sets": {"memorized": {"curves": curves}}}}}
    measured = protocol_stats.domain_measurements(report, "d")
    assert measured["contrast_distance_char_normalized_held_out"] == pytest.approx(0.4)  # -1 x (-0.9 - -0.5)
    assert measured["contrast_distance_char_normalized_random_train"] == pytest.approx(1.1)
    assert measured["h2_distance_char_normalized_signed_margin_over_loss"] == pytest.approx(0.2)
    assert math.isnan(measured["r_answer_aligned"])  # a report without answers: NaN, not an error
    summary = protocol_stats.summarize("contrast_distance_char_normalized_held_out", [1.9, 2.0, 1.95])
    assert summary["ci95"][1] <= 2.0


def test_the_late_pilot_stops_where_six_seeds_grok_500_steps_before_the_stage_ends():
    onsets = [2500, 2500, 2400, 1800, 2000, 2200, -1, 2900]
    assert protocol_stats.late_pilot_stops(onsets, 3000)  # six onsets <= 2,500
    assert not protocol_stats.late_pilot_stops([2501, *onsets[1:]], 3000)  # five
    assert not protocol_stats.late_pilot_stops([-1] * 8, 6000)


def test_h4_needs_every_grokking_arm_and_no_control():
    grokking, controls = ("A", "A2"), ("B1", "B2", "B1-2", "B2-2")
    verdicts = {"A": "confirmed", "A2": "confirmed", "B1": "inconclusive", "B2": "refuted", "B1-2": "inconclusive",
                "B2-2": "inconclusive"}
    assert protocol_stats.h4_verdict(verdicts, grokking, controls) == "confirmed"
    # anything but a confirmation names the arms that decided it (the registered rule asks for it)
    assert protocol_stats.h4_verdict({**verdicts, "B2": "confirmed"}, grokking, controls) == (
        "inconclusive (control B2: confirmed)")
    two_controls = {**verdicts, "B2": "confirmed", "B1": "confirmed"}
    assert protocol_stats.h4_verdict(two_controls, grokking, controls) == (
        "refuted (controls B1: confirmed; B2: confirmed)")
    no_value = {**verdicts, "A": "inconclusive (too few seeds with a value)", "A2": "inconclusive"}
    assert protocol_stats.h4_verdict(no_value, grokking, controls) == (
        "inconclusive (grokking arm A: inconclusive (too few seeds with a value); A2: inconclusive)")
    assert protocol_stats.h4_verdict({**verdicts, "A2": "refuted"}, grokking, controls) == (
        "refuted (grokking arm A2: refuted)")
    assert protocol_stats.h4_verdict({k: v for k, v in verdicts.items() if k != "A"}, grokking, controls) == (
        "inconclusive (grokking arm A: inconclusive (no value))")
    per_seed = [{"groks": 1.0}] * 6 + [{"groks": 0.0}] * 2
    arm = {"positions": {"all": {"verdicts": {f"h2_{m}_signed_margin_over_loss": "confirmed"
                                              for m in ("distance_char_normalized", "answer_aligned")},
                                 "per_seed": per_seed}}}
    results = {"registered": load_config("toy_protocol_round4").registered.to_dict(),
               "arms": {"grokking": arm, "grokking_round2": arm, "late": arm}}
    verdicts = protocol_pages.registered_verdicts(results, "all")
    assert len(verdicts) == 2 and all("grokking arms grokking, grokking_round2, late;" in k for k in verdicts)
    assert set(verdicts.values()) == {"confirmed"}


def test_the_theory_sweep_crosses_router_scales_and_top_k_gates(monkeypatch):
    from moe_grok.studies import synthetic_theory
    from moe_grok.theory.synthetic_run import SyntheticConfig

    monkeypatch.setattr(synthetic_theory, "run_synthetic_kernels", lambda config, kernels, mesh=None: [{
        "n_clusters": config.n_clusters, "spread": config.spread, "router_scale": config.router_scale,
        "top_k": config.top_k, "router_seed": config.router_seed, "kernel": kernel,
        "a": config.router_seed * (1 if config.top_k else -1), "b": float(config.router_seed)} for kernel in kernels])
    rows = synthetic_theory.sweep_synthetic(SyntheticConfig(), [(8, 0.3)], range(4), (1.0, 16.0), progress=False,
                                            top_ks=(0, 2))
    assert {(r["router_scale"], r["top_k"]) for r in rows} == {(1.0, 0), (1.0, 2), (16.0, 0), (16.0, 2)}
    per = synthetic_theory.within_structure(rows, "a", "b")["per_structure"]
    assert per["K=8 spread=0.3 scale=16.0 top_k=2"]["r"] == pytest.approx(1.0)
    assert per["K=8 spread=0.3 scale=1.0"]["r"] == pytest.approx(-1.0)  # soft routing keeps its old label
    assert tuple(load_config("verify_theory").sweep.top_ks) == (0,)


def test_window_sizes_count_only_partial_correlations_with_a_value():
    # a growing memorized set empty inside the window: n = 0, df = -4, r NaN (null once written as JSON)
    partials = {"distance": {"r": 0.3, "n": 12, "df": 8}, "consistency": {"r": float("nan"), "n": 0, "df": -4},
                "complexity": {"r": None, "n": 1, "df": -3}}
    report = {"domains": {"d": {"window": {"n": 12}, "partial_correlations": {"memorized": partials}}}}
    assert protocol_stats.window_sizes([report]) == {"window_n": [12, 12], "partial_df": [8, 8]}
    partials["distance"]["r"] = float("nan")
    assert protocol_stats.window_sizes([report])["partial_df"] == []


def test_schedule_contrasts_subtract_mean_fisher_z_per_row_both_arms_hold():
    from moe_grok.analysis import statistics

    cosine = {"training step": {"per_seed_pearson_r": [0.9, 0.8, 0.85]},
              "training loss": {"per_seed_pearson_r": [-0.9, -0.95, float("nan"), -0.7]},
              "only here": {"per_seed_pearson_r": [0.1, 0.2]}}
    constant = {"training step": {"per_seed_pearson_r": [0.9, 0.8, 0.85]},
                "training loss": {"per_seed_pearson_r": [-0.5, -0.6, -0.4]}}
    contrasts = protocol_stats.schedule_contrasts(cosine, constant)
    assert set(contrasts) == {"training step", "training loss"}
    assert contrasts["training step"]["mean"] == pytest.approx(0.0) and contrasts["training step"]["n"] == [3, 3]
    assert contrasts["training loss"] == statistics.fisher_z_difference([-0.9, -0.95, -0.7], [-0.5, -0.6, -0.4])
    assert contrasts["training loss"]["mean"] < 0  # the loss tracks accuracy more tightly in the first arm


def test_an_artifact_keeps_the_answers_so_answer_aligned_routing_rederives(round4_report, tmp_path):
    """A run that measured answer-aligned routing stores each sample's answer in its artifact; the
    re-derived report's answer-aligned curves equal the run's. An artifact without answers names the
    way out (round 4's artifacts were written before answers were kept)."""
    from moe_grok import pipeline
    from moe_grok.checkpoints import run_artifact

    stats, splits, _, report = round4_report
    roles = {"train_split": "train", "test_split": "test", "held_out_split": "test", "validation_split": None}
    base = dict(eps=0.5, max_pairs=None, tau_sweep=(0.7,), delta_sweep=(0.05,), eps_sweep=(1.0,))
    options = AnalysisOptions(**base, answer_aligned=True, step_baseline=True)
    run_artifact.write_artifact(str(tmp_path / "with.npz"), stats, splits, roles, options)
    inputs = run_artifact.read_artifact(str(tmp_path / "with.npz"))
    for name, split in splits.items():
        np.testing.assert_array_equal(inputs.splits[name].answers(), split.answers())
    again = pipeline.analyze_stats(inputs.stats, inputs.splits, "train", None, "test", "test",
                                   options=inputs.options)[0]
    for name in ("memorized", "held_out", "random_train"):
        np.testing.assert_array_equal(again["domains"]["a"]["sets"][name]["curves"]["answer_aligned"],
                                      report["domains"]["a"]["sets"][name]["curves"]["answer_aligned"])
    run_artifact.write_artifact(str(tmp_path / "without.npz"), stats, splits, roles, AnalysisOptions(**base))
    without = run_artifact.read_artifact(str(tmp_path / "without.npz"), {"answer_aligned": True})
    with pytest.raises(ValueError, match="stores no answers.*answer_aligned=false"):
        without.splits["train"].answers()
