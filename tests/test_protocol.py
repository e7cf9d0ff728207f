"""The toy protocol end to end on a tiny budget: every arm, two seeds, analysis, tables, verdicts."""
import errno
import json
import os
import shutil

import numpy as np
import pytest

from moe_grok import pipeline
from moe_grok.analysis import statistics
from moe_grok.checkpoints import run_artifact
from moe_grok.studies import protocol, protocol_pages, protocol_stats, toy_run
from moe_grok.training import run_dir

from config_files import load_config
from full_disk import disk_full


def tiny_protocol_config(docs_dir: str):
    config = load_config("toy_protocol")
    config.seeds = 2
    config.docs_dir = docs_dir
    for arm in config.arms.values():
        arm.task.p = 7
        arm.model.update(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, expert_intermediate_size=16, moe_impl="dense")
        # an evaluation at every checkpoint, with eval_batch_size = analysis.batch_size: the analysis reuses every
        # one of training's evaluations (the spawned analysis processes compile no extraction); the rerun test's
        # analysis from scratch extracts them all and must equal it
        arm.train.update(steps=20, batch_size=32, eval_every=5, checkpoint_every=5, learning_rate=1e-2)
        arm.train.eval_batch_size = 64
        arm.analysis.update(batch_size=64, max_pairs=100)
    # two domains of the four: enough for the mixture's cross-domain measures (onset spread, H3 alignment), half
    # the per-domain analysis and figure panels
    config.arms.mixture.task.update(ops=("add", "mul"), train_fraction=(0.7, 0.5))
    # no per-seed report figures (most of these tiny analyses' time; test_training and test_analysis check them,
    # and the rerun test below checks that seed_plots draws the first seed's); the protocol's figures are drawn
    config.seed_plots = False
    config.seeds_per_arm.update(random_labels=1, no_weight_decay=1)  # the controls with one seed each (seeds_per_arm)
    return config


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    config = tiny_protocol_config(str(root / "docs"))
    results = protocol.run(config, str(root / "work"), command="test", progress=False)
    # the run's own outputs as they were, before later tests re-run arms in its workdir
    shutil.copytree(root / "work" / "artifacts", root / "kept" / "artifacts")
    shutil.copy(root / "work" / "results.json", root / "kept" / "results.json")
    shutil.copy(root / "docs" / "protocol_results.md", root / "kept" / "protocol_results.md")
    for arm in results["arms"].values():
        for seed_dir in arm["seed_dirs"]:
            shutil.copytree(root / "work" / seed_dir / "analysis" / "report", root / "kept" / seed_dir / "report")
    return config, root, results


def _no_checkpoint_read(monkeypatch):
    """Reading a checkpoint or the statistics cache fails: a re-derivation must need neither."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint or the analysis cache was read")

    monkeypatch.setattr(pipeline, "collect_checkpoint_stats", refuse)
    monkeypatch.setattr(toy_run, "run_checkpoint_sources", refuse)


def _no_effects_figure(monkeypatch):
    """A rerun's effects figure is an empty file: drawing its 20 panels takes about 2 CPU seconds, and the module
    fixture's run draws it (test_protocol_runs_every_arm_and_seed_and_writes_the_tables checks it)."""
    def empty_figure(results, quantities, path):
        open(path, "wb").close()
        return path

    monkeypatch.setattr(protocol_pages, "plot_effects", empty_figure)


def _files(directory):
    return {os.path.relpath(os.path.join(d, n), directory): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(directory) for n in names}


def test_rederiving_from_the_artifacts_gives_the_runs_own_results_byte_for_byte(protocol_run, monkeypatch):
    """Issue 34: every seed keeps a compact artifact (manifest: sizes, sha256); one call re-derives
    results.json, the Table/verdict page and every seed's table.txt, CSVs and summary.json from them
    alone, equal to the run's own byte for byte."""
    config, root, results = protocol_run
    _no_effects_figure(monkeypatch)
    kept = root / "kept"
    manifest = json.loads((kept / "artifacts" / "manifest.json").read_text())
    expected = {f"{name}/seed_{seed}.npz" for name, arm in results["arms"].items() for seed in arm["seeds"]}
    assert set(manifest["files"]) == expected and manifest["format"] == run_artifact.ARTIFACT_FORMAT
    assert manifest["total_bytes"] == sum(f["bytes"] for f in manifest["files"].values())
    _no_checkpoint_read(monkeypatch)
    again = protocol.rederive(str(kept / "artifacts"), str(root / "rederived"), docs_dir=str(root / "rederived_docs"))
    assert (root / "rederived" / "results.json").read_bytes() == (kept / "results.json").read_bytes()
    assert (root / "rederived_docs" / "protocol_results.md").read_bytes() == (kept / "protocol_results.md").read_bytes()
    for arm in again["arms"].values():
        for seed_dir in arm["seed_dirs"]:
            own = _files(kept / seed_dir / "report")
            assert {"table.txt", "summary.json"} <= set(own) and any(n.endswith(".csv") for n in own)
            assert _files(root / "rederived" / seed_dir / "analysis" / "report") == own, seed_dir
    # a changed artifact is refused before anything is derived from it
    tampered = root / "tampered"
    shutil.copytree(kept / "artifacts", tampered)
    with open(tampered / "grokking" / "seed_0.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match="seed_0.npz: size or sha256 differs"):
        protocol.rederive(str(tampered), str(root / "not_written"))


def test_resummarize_gives_the_runs_results_back_and_adds_a_registered_schedule_contrast(protocol_run, monkeypatch,
                                                                                           tmp_path):
    """resummarize aggregates a finished run's per-seed reports again (no training, analysis or checkpoint
    read): unchanged, results.json and the page equal the run's; a registration with a schedule pair adds
    that pair's Table 1 contrasts (difference of mean Fisher z) to the page."""
    config, root, results = protocol_run
    _no_checkpoint_read(monkeypatch)
    _no_effects_figure(monkeypatch)
    monkeypatch.setattr(toy_run, "analyze_run", lambda *a, **k: pytest.fail("resummarize analysed a seed"))
    kept, work = root / "kept", tmp_path / "work"
    for arm in results["arms"].values():
        for seed_dir in arm["seed_dirs"]:
            shutil.copytree(kept / seed_dir / "report", work / seed_dir / "analysis" / "report")
    shutil.copy(kept / "results.json", work / "results.json")
    protocol.resummarize(str(work), docs_dir=str(tmp_path / "docs"))
    assert (work / "results.json").read_bytes() == (kept / "results.json").read_bytes()
    assert (tmp_path / "docs" / "protocol_results.md").read_bytes() == (kept / "protocol_results.md").read_bytes()
    registered = {"metrics": ["distance_char_normalized"], "grokking_arms": ["grokking"], "late_arms": [],
                  "control_arms": ["random_labels"], "schedule_pairs": [["mixture", "grokking"]]}
    again = protocol.resummarize(str(work), registered)
    page = (work / "protocol_results.md").read_text()
    assert again["registered"] == registered and "Schedule contrast, mixture minus grokking" in page
    table1 = {a: again["arms"][a]["positions"]["all"]["table1"] for a in ("mixture", "grokking")}
    expected = statistics.fisher_z_difference(table1["mixture"]["training loss"]["per_seed_pearson_r"],
                                              table1["grokking"]["training loss"]["per_seed_pearson_r"])
    contrast = protocol_stats.schedule_contrasts(table1["mixture"], table1["grokking"])["training loss"]
    np.testing.assert_equal(contrast, expected)  # NaN here (this tiny run has no window); numbers: test_round4
    assert "| training loss | " in page.split("Schedule contrast, mixture minus grokking")[1]
    with pytest.raises(FileNotFoundError, match="no finished protocol run"):
        protocol.resummarize(str(tmp_path / "empty"))


def test_rederiving_with_another_analysis_option_changes_the_tables_without_training(protocol_run, monkeypatch):
    """An analysis option changed at re-derivation (Table 1's fixed memorized set instead of the growing
    one) changes Table 1 and its page from the artifacts alone: no training, no checkpoint read."""
    config, root, results = protocol_run
    _no_checkpoint_read(monkeypatch)
    _no_effects_figure(monkeypatch)
    arm = "random_labels"  # the arm with one seed: the shortest re-derivation
    fixed = protocol.rederive(str(root / "kept" / "artifacts"), str(root / "fixed"), {"memorized_set": "fixed"},
                              arms=[arm])
    assert list(fixed["arms"]) == [arm]
    growing = results["arms"][arm]["positions"]["all"]
    changed = fixed["arms"][arm]["positions"]["all"]
    assert changed["test_accuracy"] == growing["test_accuracy"]  # the same run: only the analysis differs
    # this tiny run does not grok (Table 1's window is empty), but the memorized set's measures change: at the
    # first checkpoint the growing set is empty, the fixed one is not
    assert growing["summary"]["entropy_first"]["n"] == 0 and changed["summary"]["entropy_first"]["n"] == 1

    def first_entropy_cell(page, column):  # an arm's cell of that row of the page's table
        label = "| routing entropy of memorized samples, first"
        row = next(line for line in page.splitlines() if line.startswith(label))
        return row.split("|")[column].strip()

    column = 2 + list(results["arms"]).index(arm)  # the run's page has a column per arm, the re-derived one arm's
    assert first_entropy_cell((root / "kept" / "protocol_results.md").read_text(), column) == "n/a"
    assert first_entropy_cell((root / "fixed" / "protocol_results.md").read_text(), 2) not in ("n/a", "")
    report = json.loads((root / "fixed" / arm / "seed_0" / "analysis" / "report" / "summary.json").read_text())
    assert report["options"]["memorized_set"] == "fixed"


def test_protocol_runs_every_arm_and_seed_and_writes_the_tables(protocol_run):
    config, root, results = protocol_run
    assert set(results["arms"]) == {"grokking", "random_labels", "no_weight_decay", "mixture"}
    for name, arm in results["arms"].items():
        seeds = 1 if name in ("random_labels", "no_weight_decay") else 2
        assert arm["seed_dirs"] == [f"{name}/seed_{k}" for k in range(seeds)]  # relative to the workdir
        assert set(arm["positions"]) == {"all", "scored"}
        # the seeds are dealt over config.analysis_processes (2) tasks; the pool starts its processes on
        # demand, so a tiny task may run both shares in one
        assert arm["analysis_shares"] == [[k] for k in range(seeds)] and arm["analysis_processes"] in (1, 2)
        for view in arm["positions"].values():
            assert len(view["per_seed"]) == seeds
            # every quantity is aggregated with its seed count; the share of seeds that grok is always defined
            assert set(view["summary"]) == {key for key, _, _ in protocol.QUANTITIES}
            assert view["summary"]["groks"]["n"] == seeds
    mixture = results["arms"]["mixture"]["positions"]["all"]["per_seed"][0]
    assert "h3_distance_alignment" in mixture
    # results.json round-trips; the page names every arm and the verdict of every hypothesis
    with open(root / "work" / "results.json") as f:
        assert json.load(f)["arms"].keys() == results["arms"].keys()
    page = (root / "docs" / "protocol_results.md").read_text()
    for name in results["arms"]:
        assert name in page
    assert "grokking: H1 (distance)" in page and "mixture: H3 (consistency, as 1 - C)" in page
    assert "grokking: H2 (consistency, as C)" in page  # both orientations of consistency (issue 34, defect 2)
    # seed by seed: one row per seed of every arm, one cell per domain of the mixture
    facts = results["arms"]["mixture"]["positions"]["all"]["per_seed_domains"]
    assert len(facts) == 2 and len(facts[0]) == len(config.arms.mixture.task.ops)
    assert page.count("### mixture (routing over all tokens)") == 1 and "| 1 | " in page.split("### mixture")[1]
    assert str(root / "work") not in page  # docs copy names paths relative to the workdir
    for figure in ("protocol_accuracy.png", "protocol_effects.png"):
        assert (root / "docs" / "figures" / figure).stat().st_size > 1000


def test_the_page_gives_back_the_effects_and_the_accuracy_curves_keep_their_domains(protocol_run):
    """summaries_from_page (redrawing the effects figure from a page) reads every all-token cell back to
    the page's 3 digits; accuracy_by_domain splits the flat per-(seed, domain) curves by domain."""
    config, root, results = protocol_run
    page = (root / "docs" / "protocol_results.md").read_text()
    parsed = protocol_pages.summaries_from_page(page, protocol.QUANTITIES)["arms"]
    assert parsed.keys() == results["arms"].keys()
    for arm, r in results["arms"].items():
        for key, _, _ in protocol.QUANTITIES:
            want, got = r["positions"]["all"]["summary"][key], parsed[arm]["positions"]["all"]["summary"][key]
            assert got["n"] == want["n"]
            if want["n"]:
                assert got["mean"] == pytest.approx(want["mean"], rel=5e-3, abs=1e-12)
    mixture = results["arms"]["mixture"]
    by_domain = protocol_pages.accuracy_by_domain(mixture)
    assert list(by_domain) == list(config.arms.mixture.task.ops)
    flat = mixture["positions"]["all"]["test_accuracy"]
    for k, curves in enumerate(by_domain.values()):
        assert curves.shape == (2, len(mixture["positions"]["all"]["steps"]))
        np.testing.assert_array_equal(curves, [flat[k], flat[len(by_domain) + k]])


def test_protocol_rerun_reuses_training(protocol_run, monkeypatch):
    config, root, results = protocol_run
    _no_effects_figure(monkeypatch)
    seed_dir = os.path.join(root, "work", results["arms"]["grokking"]["seed_dirs"][0])
    checkpoint = os.path.join(seed_dir, "checkpoints", "20")
    before = os.path.getmtime(checkpoint)
    one_arm = config.copy_and_resolve_references()
    for name in ("random_labels", "no_weight_decay", "mixture"):
        del one_arm.arms[name]
    one_arm.name = "one_arm"
    one_arm.analysis_process = False  # the first run analysed in a spawned process; this one inline
    assert not os.path.exists(os.path.join(seed_dir, "analysis", "report", "analysis.png"))  # seed_plots=False
    again = protocol.run(one_arm, str(root / "work"), command="test", progress=False)
    assert os.path.getmtime(checkpoint) == before
    # the config's name names the generated files; the first run's page is left as it was
    assert (root / "docs" / "one_arm_results.md").read_text().startswith("# Toy protocol (one_arm)")
    assert (root / "docs" / "figures" / "one_arm_accuracy.png").exists()
    assert "mixture" in (root / "docs" / "protocol_results.md").read_text()
    first = results["arms"]["grokking"]["positions"]["all"]["summary"]
    second = again["arms"]["grokking"]["positions"]["all"]["summary"]
    assert json.dumps(first, default=float) == json.dumps(second, default=float)
    # inline from scratch (the same training, no analysis cache) equals the spawned process's analysis
    fresh = root / "fresh"
    shutil.copytree(root / "work" / "grokking", fresh / "grokking", ignore=shutil.ignore_patterns("analysis"))
    inline = protocol.run(one_arm, str(fresh), command="test", progress=False)
    assert json.dumps(inline["arms"]["grokking"]["positions"], default=float) == json.dumps(
        results["arms"]["grokking"]["positions"], default=float)
    # the same analysis inputs give the same artifact bytes, cached or extracted afresh (no write time in them)
    kept = json.loads((root / "kept" / "artifacts" / "manifest.json").read_text())["files"]
    for workdir in (root / "work", fresh):
        files = json.loads((workdir / "artifacts" / "manifest.json").read_text())["files"]
        for seed in (0, 1):
            assert files[f"grokking/seed_{seed}.npz"] == kept[f"grokking/seed_{seed}.npz"]


@pytest.mark.parametrize("seed_plots", [True, False])
def test_seed_plots_draws_the_first_seeds_figures_only(monkeypatch, seed_plots):
    drawn = {}
    monkeypatch.setattr(toy_run, "analyze_run", lambda config, seed_dir, progress, with_plots, artifact: drawn.update(
        {seed_dir: with_plots}))
    queue = protocol._AnalysisQueue(in_process=True, plot_first_seed=seed_plots)
    queue.submit("arm", load_config("toy_protocol").arms.grokking, [3, 4, 5], ["s3", "s4", "s5"])
    assert drawn == {"s3": seed_plots, "s4": False, "s5": False}


def test_a_failed_analysis_names_its_arm_and_a_rerun_keeps_the_training(tmp_path, monkeypatch):
    """The analysis fails in its spawned process, then inline (the rerun keeps the training), then the fixed
    config's rerun analyses without training again."""
    _no_effects_figure(monkeypatch)
    config = tiny_protocol_config("")
    config.seeds = 1
    for name in ("no_weight_decay", "mixture"):
        del config.arms[name]
    config.arms.grokking.analysis.train_embeddings = str(tmp_path / "missing.npy")  # the analysis fails on it
    checkpoint = tmp_path / "work" / "grokking" / "seed_0" / "checkpoints" / "20"
    trained = None
    for analysis_process in (True, False):
        config.analysis_process = analysis_process
        with pytest.raises(RuntimeError, match="analysis of arm 'grokking' failed.*missing.npy"):
            protocol.run(config, str(tmp_path / "work"), command="test", progress=False)
        trained = trained or os.path.getmtime(checkpoint)
        assert os.path.getmtime(checkpoint) == trained
    config.arms.grokking.analysis.train_embeddings = ""
    results = protocol.run(config, str(tmp_path / "work"), command="test", progress=False)
    assert os.path.getmtime(checkpoint) == trained
    assert set(results["arms"]) == {"grokking", "random_labels"}


def _differences(a, b):
    """Dotted keys whose values differ between two configs."""
    a, b = run_dir.flatten(a.to_dict()), run_dir.flatten(b.to_dict())
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


def test_round2_is_arm_a_with_the_registered_regime_changes_and_its_two_controls():
    """docs/protocol.md, Round 2: A2 = arm A with exactly four changes; each control changes one setting of A2."""
    round1, round2 = load_config("toy_protocol"), load_config("toy_protocol_round2")
    assert round2.name == "protocol_round2" and set(round2.arms) == {"grokking", "random_labels", "no_weight_decay"}
    a2 = round2.arms.grokking
    assert _differences(round1.arms.grokking, a2) == {
        "train.label_smoothing", "train.router_weight_decay", "train.aux_loss_coef", "task.train_fraction",
        "train.steps"}
    assert (a2.train.label_smoothing, a2.train.router_weight_decay, a2.train.aux_loss_coef, a2.task.train_fraction,
            a2.train.steps) == (0.1, False, 0.0, 0.4, 3000)
    assert _differences(a2, round2.arms.random_labels) == {"task.random_labels"}
    assert _differences(a2, round2.arms.no_weight_decay) == {"train.weight_decay"}


def test_round3_is_arm_c_with_a_longer_budget():
    """docs/protocol.md, Round 3: C3 = arm C with 5,000 steps, nothing else changed."""
    round1, round3 = load_config("toy_protocol"), load_config("toy_protocol_round3")
    assert round3.name == "protocol_round3" and set(round3.arms) == {"mixture"}
    assert _differences(round1.arms.mixture, round3.arms.mixture) == {"train.steps"}
    assert round3.arms.mixture.train.steps == 5000


def test_mean_ci_and_verdicts():
    summary = protocol_stats.mean_ci([1.0, 2.0, 3.0, np.nan, None])
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(2.0)
    half = 4.302653 * 1.0 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert summary["ci95"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-5)
    assert protocol_stats.verdict(summary, ">0") == "inconclusive"  # [-0.48, 4.48] holds 0
    tight = protocol_stats.mean_ci([1.9, 2.0, 2.1])
    assert protocol_stats.verdict(tight, ">0") == "confirmed"
    assert protocol_stats.verdict(tight, "<0") == "refuted"
    assert protocol_stats.verdict(protocol_stats.mean_ci([-1.0, 1.0, 0.5]), ">0") == "inconclusive"
    assert protocol_stats.verdict(protocol_stats.mean_ci([1.0]), ">0").startswith("inconclusive")
    assert protocol_stats.mean_ci([])["n"] == 0


def _accuracy_report(curves, steps=(0, 100, 200, 300, 400, 500)):
    return {"steps": list(steps), "domains": {f"d{i}": {"curves": {"test_accuracy": c}} for i, c in enumerate(curves)}}


def test_onset_spread_counts_a_domain_that_never_groks_as_past_the_end():
    early, late, never = [0, 0.95, 1, 1, 1, 1], [0, 0, 0, 0, 0.95, 1], [0, 0, 0, 0, 0, 0.5]
    assert protocol_stats.onset_spread(_accuracy_report([early, late])) == 3
    assert protocol_stats.onset_spread(_accuracy_report([early, never])) == 5  # index 1 -> one past the last (6)
    assert protocol_stats.onset_spread(_accuracy_report([late, never])) == 2
    assert np.isnan(protocol_stats.onset_spread(_accuracy_report([never, never])))


@pytest.mark.parametrize(("spreads", "expected"), [([np.nan] * 7 + [19.0], "inconclusive"),
                                                   ([6.0, 4.0, 3.0, 18.0, np.nan, np.nan, 2.0, 5.0], "confirmed")])
def test_h3_needs_wide_onsets_in_half_of_all_seeds(spreads, expected):
    confirmed = {"verdicts": {f"{k}_{m}{suffix}": "confirmed" for m in protocol_stats.METRICS
                              for k, suffix in (("h1", "_slope"), ("h1", "_slope_minus_held_out"),
                                                ("h2", "_margin_over_loss"), ("h2", "_signed_margin_over_loss"),
                                                ("h3", "_alignment"))},
                 "per_seed": [{"onset_spread_checkpoints": s} for s in spreads]}
    verdicts = protocol_pages.hypothesis_verdicts({"arms": {"mixture": {"positions": {"all": confirmed}}}}, "all")
    assert {verdicts[f"mixture: H3 ({protocol_pages.verdict_name(m)})"] for m in protocol_stats.METRICS} == {expected}


def test_pages_survive_a_full_disk(protocol_run, monkeypatch):
    """The results page and figures are written aside and renamed: a full disk leaves the previous ones whole."""
    config, root, results = protocol_run
    _no_effects_figure(monkeypatch)
    docs = root / "docs"
    pages = (docs / "protocol_results.md", docs / "figures" / "protocol_accuracy.png",
             docs / "figures" / "protocol_effects.png")
    before = {path: path.read_bytes() for path in pages}
    disk_full(monkeypatch, docs, budget=100)
    with pytest.raises(OSError) as raised:
        protocol_pages.write_pages(results, protocol.QUANTITIES, str(root / "work"), config.name, str(docs))
    assert raised.value.errno == errno.ENOSPC
    assert {path: path.read_bytes() for path in before} == before
    left = [n for n in os.listdir(docs) + os.listdir(docs / "figures")
            if not n.endswith((".md", ".png")) and n != "figures"]
    assert left == []  # no temporary file left beside them


def _table1_report(r_by_metric: dict, loss_r: float, steps=(0, 100, 200, 300, 400, 500)):
    """A one-domain report holding just what domain_measurements reads: Table 1's windowed Pearson r of
    each `memorized/<metric>` (r_by_metric) and of the training loss (loss_r); grokking at step 200."""
    table = {f"memorized/{m}": {"window": {"pearson_r": r}} for m, r in r_by_metric.items()}
    table["train_loss"] = {"window": {"pearson_r": loss_r}}
    curves = {name: [1.0] * len(steps) for name in ("routing_entropy", "pathway_length")}
    domain = {"curves": {"test_accuracy": [0, 0, 0.95, 1, 1, 1]}, "pretrain_groups": {}, "table1": table,
              "memorization": {"share_before_end": 0.2}, "sets": {"memorized": {"curves": curves}}}
    return {"steps": list(steps), "domains": {"d": domain}}


def test_consistency_is_tested_under_both_orientations():
    """Issue 34, defect 2: the paper leaves open whether its consistency is 1 - C or C; both are tested
    with the paper's sign, and the verdicts name the reading."""
    assert {"consistency", "complexity"} <= set(protocol_stats.METRICS)
    assert protocol_stats.PAPER_SIGN["complexity"] == protocol_stats.PAPER_SIGN["consistency"] == 1.0
    measured = protocol_stats.domain_measurements(_table1_report({"consistency": 0.6, "complexity": -0.6},
                                                                 loss_r=-0.3), "d")
    assert measured["consistency_paper_sign"] == 1.0 and measured["complexity_paper_sign"] == 0.0
    confirmed = {"verdicts": {f"{k}_{m}{suffix}": "confirmed" for m in protocol_stats.METRICS
                              for k, suffix in (("h1", "_slope"), ("h1", "_slope_minus_held_out"),
                                                ("h2", "_margin_over_loss"), ("h2", "_signed_margin_over_loss"),
                                                ("h3", "_alignment"))},
                 "per_seed": []}
    verdicts = protocol_pages.hypothesis_verdicts({"arms": {"A": {"positions": {"all": confirmed}}}}, "all")
    assert {"A: H1 (consistency, as 1 - C)", "A: H1 (consistency, as C)", "A: H2 (consistency, as C)",
            "A: H1 (distance)"} <= set(verdicts)


def test_h2_margin_applies_the_paper_sign():
    """Issue 34, defect 3: a correlation of the wrong sign fails H2's sign-aware margin, where
    |r| - |r(loss)| counted it as tracking accuracy; both are reported."""
    measured = protocol_stats.domain_measurements(_table1_report({"distance": 0.8, "consistency": 0.5},
                                                                 loss_r=-0.3), "d")
    assert measured["h2_distance_margin_over_loss"] == pytest.approx(0.5)  # wrong sign (paper: negative)
    assert measured["h2_distance_signed_margin_over_loss"] == pytest.approx(-1.1)
    assert measured["h2_consistency_signed_margin_over_loss"] == pytest.approx(0.2)
    sides = {key: side for key, _, side in protocol_stats.quantities()}
    assert sides["h2_distance_signed_margin_over_loss"] == sides["h2_distance_margin_over_loss"] == ">0"
    summary = {"h2_distance_signed_margin_over_loss": "refuted", "h2_distance_margin_over_loss": "confirmed"}
    view = {"verdicts": {**{f"{k}_{m}{suffix}": "inconclusive" for m in protocol_stats.METRICS
                            for k, suffix in (("h1", "_slope"), ("h1", "_slope_minus_held_out"),
                                              ("h2", "_margin_over_loss"), ("h2", "_signed_margin_over_loss"))},
                         **summary}, "per_seed": []}
    verdicts = protocol_pages.hypothesis_verdicts({"arms": {"A": {"positions": {"all": view}}}}, "all")
    assert verdicts["A: H2 (distance)"] == "refuted" and verdicts["A: H2 sign ignored (distance)"] == "confirmed"


def test_one_onset_rule_for_every_onset():
    """Issue 34, defect 8: every onset is grokking.grok_onset on the test split's accuracy, strictly
    above 0.9 (accuracy exactly 0.9 at step 200 does not start the onset)."""
    from moe_grok.analysis import grokking

    accuracy = [0.0, 0.5, 0.9, 0.95, 1.0, 1.0]
    steps = np.array([0, 100, 200, 300, 400, 500])
    assert grokking.grok_onset(accuracy, steps) == 300 and grokking.GROK_ACCURACY == protocol_stats.GROK_ACCURACY
    report = _table1_report({}, loss_r=0.0)
    report["domains"]["d"]["curves"]["test_accuracy"] = accuracy
    assert protocol_stats.seed_domain_facts(report)["d"]["onset"] == 300
    assert protocol_stats.domain_measurements(report, "d")["onset_step"] == 300
    two = _accuracy_report([accuracy, [0, 0, 0.9, 0.9, 0.91, 0.95]])
    assert protocol_stats.onset_spread(two) == 1  # onsets 300 and 400
