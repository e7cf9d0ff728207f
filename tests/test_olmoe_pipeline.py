"""OLMoE pipeline end to end: tiny HF checkpoints stand in for pretraining revisions."""
import json
import os

import numpy as np
import pytest

from moe_grok import pipeline, strict_json
from moe_grok.analysis import options as options_lib
from moe_grok.analysis import pathways
from moe_grok.analysis import test_results as test_results_lib
from moe_grok.checkpoints import cache as cache_lib
from moe_grok.checkpoints import sources as sources_lib
from moe_grok.checkpoints import test_correctness
from moe_grok.data import corpus as data
from moe_grok.model.hf import CheckpointError
from moe_grok.sharding import make_mesh

from config_files import load_config
from hf_reference import make_hf_model
from report_checks import check_report
from tensorboard_reader import read_scalars

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS = (1000, 2000, 3000, 4000, 5000)
DOMAINS = ("math", "code")
N_TEST = 8  # test samples per domain


def _checkpoint_dir(root, step):
    return root / f"step{step}-tokens{step // 250}B"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Five revisions of one tiny model converging to its final weights (weights(t) = final +
    noise shrinking to 0), grouped training and validation data, per-sample test results and
    sentence-embedding stand-ins."""
    torch = pytest.importorskip("torch")

    root = tmp_path_factory.mktemp("olmoe")
    model = make_hf_model(seed=0)
    final = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    noise = {name: torch.randn(p.shape, generator=generator) for name, p in final.items()}
    for k, step in enumerate(STEPS):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(final[name] + 0.03 * (len(STEPS) - 1 - k) ** 2 * noise[name])
        model.save_pretrained(str(_checkpoint_dir(root, step)))
    rng = np.random.default_rng(0)
    (root / "val").mkdir()
    for domain in DOMAINS:
        for path, count in ((root / f"{domain}.jsonl", 24), (root / "val" / f"{domain}.jsonl", 6)):
            with open(path, "w") as f:
                for _ in range(count):
                    f.write(json.dumps({"input_ids": rng.integers(0, 96, rng.integers(3, 20)).tolist()}) + "\n")
    with open(root / "test_accuracy.csv", "w") as f:
        f.write("step,group,accuracy\n")
        for step, acc in zip(STEPS, (0.1, 0.2, 0.4, 0.8, 0.9), strict=False):
            for domain in DOMAINS:
                f.write(f"{step},{domain},{acc}\n")
    onsets = rng.integers(1, len(STEPS), (len(DOMAINS), N_TEST))
    with open(root / "test_correctness.csv", "w") as f:
        f.write("step,group,sample,correct\n")
        for k, step in enumerate(STEPS):
            for d, domain in enumerate(DOMAINS):
                for j in range(N_TEST):
                    f.write(f"{step},{domain},q{j},{int(k >= onsets[d, j])}\n")
    np.save(root / "train_embeddings.npy", rng.normal(size=(2 * 24, 4)))
    np.save(root / "test_embeddings.npy", rng.normal(size=(2 * N_TEST, 4)))
    return root


def _split(root):
    return data.load_jsonl_ids([root / f"{d}.jsonl" for d in DOMAINS], seq_len=16, groups_from_files=True)


def _sources(root, mesh=None, moe_impl="dense"):
    """The checkpoints, run with the dense expert oracle by default: it compiles fastest for these tiny models."""
    return sources_lib.checkpoint_sources([str(_checkpoint_dir(root, s)) for s in STEPS], dtype="float32", mesh=mesh,
                                          moe_impl=moe_impl)


OPTIONS = options_lib.AnalysisOptions(max_pairs=50, delta=0.3, tau_sweep=(0.6, 0.7), delta_sweep=(0.3,),
                                  eps_sweep=(1.0,))


def test_pipeline_end_to_end_and_resume(workspace, tmp_path, monkeypatch):
    split = _split(workspace)
    _, correct, rows = test_correctness.load_test_correctness_csv(workspace / "test_correctness.csv", steps=STEPS)
    test_embeddings = np.load(workspace / "test_embeddings.npy")
    test = test_results_lib.TestResults({d: c.mean(1) for d, c in correct.items()}, correct,
                               {d: test_embeddings[r] for d, r in rows.items()})
    out = str(tmp_path / "out")
    run = lambda: pipeline.run_pipeline(
        _sources(workspace), {"train": split, "validation": _validation(workspace)}, out, test=test,
        held_out_split="validation", validation_split="validation",
        train_embeddings=np.load(workspace / "train_embeddings.npy"), options=OPTIONS, batch_size=8, progress=False,
        with_plots=False)
    report = run()
    assert report["steps"] == list(STEPS) and set(report["domains"]) == set(DOMAINS)
    for domain in report["domains"].values():
        assert domain["n_train"] == 24
        assert domain["pretrain_groups"] and all(name.startswith("Pretrain@") for name in domain["pretrain_groups"])
        assert domain["test_groups"] and all(name.startswith("Test@") for name in domain["test_groups"])
        assert domain["pairs"] and domain["pairing_similarity"] == "embeddings"
        for pair in domain["pairs"]:
            assert pair["delay"] == pair["test_step"] - pair["pretrain_step"]
        assert set(domain["sets"]) == {"memorized", "held_out", "random_train"}
        assert "validation_loss" in domain["curves"] and "memorized/distance" in domain["table1"]
        assert domain["window"]["n"] == len(STEPS)  # enough checkpoints for finite partial correlations
    check_report(report, os.path.join(out, "report"), num_layers=2, num_experts=8)  # hf_reference's model
    assert sorted(os.listdir(os.path.join(out, "cache"))) == [f"step_{s:010d}.npz" for s in STEPS]
    _check_checkpoint_scalars(workspace, out, {"train": split, "validation": _validation(workspace)})

    from moe_grok.model import hf

    def refuse(*args, **kwargs):
        raise AssertionError("a finished checkpoint was loaded again")

    monkeypatch.setattr(hf, "load_hf", refuse)
    again = run()
    assert json.dumps(again, default=float) == json.dumps(report, default=float)
    assert len(os.listdir(os.path.join(out, pipeline.TENSORBOARD_DIR))) == 1  # replaced, not added to


def _check_checkpoint_scalars(workspace, out, splits):
    """out/tensorboard holds, at each checkpoint's step, every split's mean loss, accuracy, routing entropy and
    pathway length (at the analysis' tau), and its groups' loss and accuracy, as computed here from the cache."""
    stats = cache_lib.collect_checkpoint_stats(_sources(workspace), splits, os.path.join(out, "cache"), batch_size=8,
                                               progress=False)  # every checkpoint read from the cache
    scalars = read_scalars(os.path.join(out, pipeline.TENSORBOARD_DIR))
    for name, split in splits.items():
        for field, tag in (("loss", "loss"), ("correct", "accuracy"), ("routing_entropy", "routing_entropy")):
            expected = [(s.step, np.mean(s.splits[name][field])) for s in stats]
            assert scalars[f"eval/{name}_{tag}"] == [(step, pytest.approx(v, rel=1e-6)) for step, v in expected]
        lengths = [np.mean(pathways.pathway_lengths(s.splits[name]["mean_weights"], OPTIONS.tau)) for s in stats]
        assert [v for _, v in scalars[f"eval/{name}_pathway_length"]] == pytest.approx(lengths, rel=1e-6)
        for g, group in enumerate(split.group_names):
            expected = [np.mean(s.splits[name]["correct"][split.groups == g]) for s in stats]
            assert [v for _, v in scalars[f"eval/{name}_accuracy/{group}"]] == pytest.approx(expected, rel=1e-6)


def _validation(root):
    return data.load_jsonl_ids([root / "val" / f"{d}.jsonl" for d in DOMAINS], seq_len=16, groups_from_files=True)


def test_sharded_pipeline_equals_single_device(workspace, tmp_path):
    split = _split(workspace)
    single = cache_lib.collect_checkpoint_stats(_sources(workspace)[:1], {"train": split},
                                                str(tmp_path / "a"), batch_size=8, progress=False)
    mesh = make_mesh(data=4, expert=2)
    sharded = cache_lib.collect_checkpoint_stats(_sources(workspace, mesh)[:1], {"train": split},
                                                str(tmp_path / "b"), batch_size=8, mesh=mesh, progress=False)
    for field in cache_lib.STAT_FIELDS:
        np.testing.assert_allclose(sharded[0].splits["train"][field], single[0].splits["train"][field], atol=1e-5)


def test_missing_revision_keeps_finished_checkpoints(workspace, tmp_path):
    sources = _sources(workspace) + sources_lib.checkpoint_sources([str(workspace / "step9000-missing")])
    cache = tmp_path / "out" / "cache"
    with pytest.raises(CheckpointError, match="step9000-missing"):
        pipeline.run_pipeline(sources, {"train": _split(workspace)}, str(tmp_path / "out"), batch_size=8,
                              progress=False)
    assert len(os.listdir(cache)) == len(STEPS)


def test_second_analysis_of_an_out_dir_is_refused(workspace, tmp_path):
    from moe_grok.locking import DirectoryLock

    out = tmp_path / "out"
    out.mkdir()
    with DirectoryLock(str(out), pipeline.LOCK_FILE, "analyzed", "out_dir"), pytest.raises(
            RuntimeError, match=rf"{out} is being analyzed by another process \(pid {os.getpid()}.*another out_dir"):
        pipeline.run_pipeline(_sources(workspace), {"train": _split(workspace)}, str(out), progress=False)
    assert os.listdir(out) == [pipeline.LOCK_FILE]  # refused before any checkpoint was computed


def test_checkpoint_specs():
    assert sources_lib.parse_checkpoint_spec("allenai/OLMoE-1B-7B-0924@step245000-tokens1027B") == (
        "allenai/OLMoE-1B-7B-0924", "step245000-tokens1027B", 245000)
    assert sources_lib.parse_checkpoint_spec("/ckpts/final=1100000") == ("/ckpts/final", None, 1100000)
    with pytest.raises(ValueError, match="cannot tell the training step"):
        sources_lib.parse_checkpoint_spec("/ckpts/final")


def test_too_long_sequences_are_refused(workspace, tmp_path):
    long_split = data.load_jsonl_ids([workspace / "math.jsonl"], seq_len=80, groups_from_files=True)  # model: 64
    with pytest.raises(ValueError, match="longer than the model's limit 64"):
        cache_lib.collect_checkpoint_stats(_sources(workspace)[:1], {"train": long_split}, str(tmp_path),
                                          progress=False)


def test_experiment_script(workspace, tmp_path, capsys):
    """The olmoe job (`moe-grok olmoe`, `python experiments/olmoe_grokking.py`) wires config -> data ->
    checkpoints -> report, with every input file. Run in this process: the launcher script only hands its
    command line to this job (test_model and test_cache run the convert launcher as a script), and the job
    then reuses what this module's tests compiled."""
    from absl import logging

    from moe_grok.cli import run_job

    checkpoints = ",".join(str(_checkpoint_dir(workspace, s)) for s in STEPS)
    argv = ["--config=olmoe_grokking",  # a shipped config by name
           f"--config.checkpoints={checkpoints}", "--config.dtype=float32", "--config.batch_size=8",
           "--config.moe_impl=dense",
           "--config.data.format=jsonl_ids",
           f"--config.data.paths={workspace / 'math.jsonl'},{workspace / 'code.jsonl'}",
           f"--config.validation_paths={workspace / 'val' / 'math.jsonl'},{workspace / 'val' / 'code.jsonl'}",
           "--config.data.seq_len=16", f"--config.test_correctness_csv={workspace / 'test_correctness.csv'}",
           f"--config.train_embeddings={workspace / 'train_embeddings.npy'}",
           f"--config.test_embeddings={workspace / 'test_embeddings.npy'}",
           f"--config.out_dir={tmp_path / 'run'}", "--config.analysis.max_pairs=50", "--config.analysis.delta=0.3"]
    verbosity = logging.get_verbosity()
    try:
        run_job("olmoe", argv, prog="python experiments/olmoe_grokking.py")
    finally:
        logging.set_verbosity(verbosity)  # the job quiets absl's logging, as a launcher does
    stdout = capsys.readouterr().out
    assert "== math" in stdout and "pathway distance (memorized)" in stdout
    assert "Pretrain@" in stdout and "-> Test@" in stdout
    for name in ("analysis.png", "groups.png", "pairs.png", "table1.csv"):
        assert os.path.exists(tmp_path / "run" / "report" / name)
    recorded = strict_json.load(tmp_path / "run" / pipeline.RUN_CONFIG_FILE)  # the resolved config, strict JSON
    assert recorded["checkpoints"] == checkpoints and recorded["dtype"] == "float32"
    assert recorded["analysis"]["max_pairs"] == 50 and recorded["analysis"]["delta"] == 0.3
    assert recorded["analysis"]["eps"] is None and recorded["data"]["seq_len"] == 16


def test_bad_options_are_refused_before_any_checkpoint_loads(workspace, tmp_path):
    from moe_grok.studies import olmoe_run

    config = load_config("olmoe_grokking")
    config.checkpoints = ",".join(str(_checkpoint_dir(workspace, s)) for s in STEPS)
    config.data.format, config.data.paths = "jsonl_ids", f"{workspace / 'math.jsonl'},{workspace / 'code.jsonl'}"
    config.out_dir, config.analysis.tau = str(tmp_path / "bad"), 1.5
    with pytest.raises(ValueError, match=r"tau and tau_sweep must lie in \(0, 1\]"):
        olmoe_run.run(config)
    assert not os.path.exists(tmp_path / "bad")


def test_cross_domain_control_curve(workspace, tmp_path):
    from moe_grok.analysis import grokking, metrics, pathways

    split = _split(workspace)
    options = options_lib.AnalysisOptions(max_pairs=None, delta=0.3)
    report = pipeline.run_pipeline(_sources(workspace), {"train": split}, str(tmp_path / "out"), batch_size=8,
                                   options=options, progress=False, with_plots=False)
    curve = report["cross_domain_distance"]["math|code"]
    assert len(curve) == len(STEPS)
    # Recompute the last checkpoint's control by hand from the cache and the memorized sets.
    stats = cache_lib.collect_checkpoint_stats(_sources(workspace), {"train": split}, str(tmp_path / "out" / "cache"),
                                               progress=False)
    loss = np.stack([s.splits["train"]["loss"] for s in stats])
    memorized = {}
    for name in split.group_names:
        rows = split.rows(name)
        eps = report["domains"][name]["memorization"]["eps"]
        t_star = grokking.memorization_steps(loss[:, rows], np.array(STEPS), eps, delta=0.3)
        memorized[name] = rows[(t_star >= 0) & (t_star < STEPS[-1])]
    weights = stats[-1].splits["train"]["mean_weights"]
    expected = metrics.cross_group_distance(pathways.pathway_strings(weights[memorized["math"]]),
                                            pathways.pathway_strings(weights[memorized["code"]]))
    assert np.isclose(curve[-1], expected)
