"""Toy pipeline end to end: training, exact resume, checkpoint analysis with caching, reports."""
import json
import os

import jax
import numpy as np
import pytest

from config_files import load_config
from moe_grok.analysis import sources as sources_lib
from moe_grok.analysis import stats as stats_lib
from moe_grok.config import toy
from moe_grok.data import tasks
from moe_grok.data.splits import EvalSplit
from moe_grok.model import params as model_lib
from moe_grok.studies import toy_bounds, toy_run
from moe_grok.training import loop as training


def tiny_config(steps=30):
    config = load_config("toy_grokking")
    config.task.p = 11
    config.task.ops = ("add", "mul")
    config.model.update(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
                        num_experts=4, num_experts_per_tok=2, expert_intermediate_size=16)
    config.train.update(steps=steps, batch_size=32, eval_every=10, checkpoint_every=10, learning_rate=1e-2)
    config.analysis.update(batch_size=64, max_pairs=200)
    return config


def _metrics_without_time(workdir):
    return [{k: v for k, v in m.items() if k != "elapsed_s"} for m in training.read_metrics(workdir)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    training.train(config, workdir, progress=False)
    return config, workdir


def test_training_learns_and_writes_checkpoints(finished_run):
    config, workdir = finished_run
    metrics = training.read_metrics(workdir)
    assert [m["step"] for m in metrics] == [0, 10, 20, 30]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.3
    assert set(metrics[-1]) >= {"train_accuracy/add", "test_accuracy/mul", "balance_loss", "ce"}
    assert training.RunCheckpoints(workdir).steps() == [0, 10, 20, 30]


def test_resume_after_kill_is_identical(finished_run, tmp_path):
    config, reference = finished_run
    workdir = str(tmp_path / "resumed")
    training.train(config, workdir, stop_at=20, progress=False)  # "killed" after step 20
    assert training.RunCheckpoints(workdir).steps() == [0, 10, 20]
    training.train(config, workdir, progress=False)
    assert _metrics_without_time(workdir) == _metrics_without_time(reference)
    sources = {s.step: s for s in toy_run.run_checkpoint_sources(workdir)}
    ref_sources = {s.step: s for s in toy_run.run_checkpoint_sources(reference)}
    jax.tree.map(np.testing.assert_array_equal, sources[30].load()[1], ref_sources[30].load()[1])


def test_workdir_with_other_model_is_refused(finished_run):
    config, workdir = finished_run
    other = tiny_config()
    other.model.hidden_size = 32
    with pytest.raises(ValueError, match="different model config"):
        training.train(other, workdir, progress=False)


def test_analysis_end_to_end_and_cache(finished_run, monkeypatch):
    config, workdir = finished_run
    report = toy_run.analyze_run(config, workdir, progress=False)
    assert report["steps"] == [0, 10, 20, 30]
    for name in ("add", "mul"):
        domain = report["domains"][name]
        assert domain["memorization"]["eps_source"] in ("calibrated", "unreachable")
        assert set(domain["sets"]) == {"memorized", "held_out", "random_train"}
        assert len(domain["sets"]["held_out"]["curves"]["distance"]) == 4
        assert np.all(np.isfinite(domain["sets"]["held_out"]["curves"]["consistency"]))
        assert {"memorized/distance", "held_out/consistency", "train_loss", "validation_loss"} <= set(domain["table1"])
        assert all(n.startswith("Pretrain@") for n in domain["pretrain_groups"])
        assert domain["test_groups"] and all(n.startswith("Test@") for n in domain["test_groups"])
    out = os.path.join(workdir, "analysis", "report")
    for name in ("summary.json", "per_checkpoint.csv", "table1.csv", "groups.csv", "pairs.csv", "table.txt",
                 "analysis.png", "groups.png", "pairs.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert "== add" in open(os.path.join(out, "table.txt")).read()

    # A second analysis reads every checkpoint from the cache: no model is loaded.
    def refuse(*args, **kwargs):
        raise AssertionError("a cached checkpoint was recomputed")

    monkeypatch.setattr(training.RunCheckpoints, "restore_params", refuse)
    again = toy_run.analyze_run(config, workdir, progress=False)
    assert json.dumps(again, default=float) == json.dumps(report, default=float)


def test_analysis_metrics_match_direct_computation(finished_run):
    """The cached per-checkpoint routing equals a fresh forward pass + pathway metrics."""
    from moe_grok.extraction.routing import extract_dataset

    config, workdir = finished_run
    data = tasks.make_dataset(training.task_spec(config))
    splits = toy_run.task_splits(data)
    source = toy_run.run_checkpoint_sources(workdir)[-1]
    mconfig, params = source.load()
    stats = stats_lib.collect_checkpoint_stats([source], splits, os.path.join(workdir, "analysis", "cache"),
                                              progress=False)[0]
    train = splits["train"]
    direct = extract_dataset(mconfig, params, train.tokens, train.mask, train.targets, train.target_mask,
                             progress=False)
    np.testing.assert_allclose(stats.splits["train"]["mean_weights"], direct["mean_weights"], atol=1e-6)
    np.testing.assert_allclose(stats.splits["train"]["loss"], direct["loss"], atol=1e-5)
    np.testing.assert_allclose(stats.splits["train"]["routing_entropy"], direct["routing_entropy"], atol=1e-6)


def test_architecture_mismatch_keeps_finished_checkpoints(tmp_path):
    splits = {"train": EvalSplit(np.ones((4, 3), np.int32), np.ones((4, 3), np.int32),
                                          np.ones((4, 3), np.int32), np.ones((4, 3), np.int32),
                                          np.array([0, 0, 1, 1]), ("a", "b"))}
    small = toy(vocab_size=8, num_layers=2, hidden_size=16, head_dim=8, num_heads=2, num_kv_heads=2)
    big = small.replace(hidden_size=32)
    sources = [sources_lib.CheckpointSource(s, f"ckpt{s}", lambda c=c: (c, model_lib.init_params(c, jax.random.key(0))))
               for s, c in ((1, small), (2, small), (3, big))]
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"ckpt3 \(step 3\) differs in architecture.*hidden_size.*16, 32"):
        stats_lib.collect_checkpoint_stats(sources, splits, cache, progress=False)
    assert sorted(os.listdir(cache)) == ["step_0000000001.npz", "step_0000000002.npz"]


def test_empty_group_is_refused():
    tokens = np.ones((2, 3), np.int32)
    with pytest.raises(ValueError, match=r"empty group\(s\) \['b'\]"):
        EvalSplit(tokens, tokens, tokens, tokens, np.array([0, 0]), ("a", "b"))


def test_theory_bounds_along_toy_checkpoints(finished_run):
    from moe_grok.theory import kernels as theory

    config, workdir = finished_run
    toy_run.analyze_run(config, workdir, progress=False)  # fills the cache the bounds read
    rows = toy_bounds.toy_run_bounds(workdir, n_samples=30, lam=0.1)
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    for r in rows:
        assert 0 < r["d_eff"] < 30 and np.isclose(r["bound"], r["bias"] + r["variance"] + 0.1**2 * np.log(20) / 30,
                                                   rtol=1e-4)
        assert 0.0 <= r["test_error"] <= 1.0
    text = toy_bounds.format_toy_bounds(rows)
    assert "d_eff ~ test error over 4 checkpoints" in text
    # The last row equals the theory module applied directly to that checkpoint's routing.
    data = tasks.make_dataset(training.task_spec(config))
    chosen = np.sort(np.random.default_rng(0).choice(len(data.train_targets), 30, replace=False))
    stats = stats_lib.collect_checkpoint_stats(toy_run.run_checkpoint_sources(workdir), toy_run.task_splits(data),
                                              os.path.join(workdir, "analysis", "cache"), progress=False)
    gram = theory.multilayer_routing_gram(stats[-1].splits["train"]["mean_weights"][chosen])
    y = np.eye(config.task.p)[data.train_targets[chosen]] - 1.0 / config.task.p
    direct = theory.generalization_bound(gram, y, 0.1, 0.1, 0.05)
    assert np.isclose(float(direct.total), rows[-1]["bound"], rtol=1e-5)


def test_mesh_training_equals_single_device(tmp_path):
    from moe_grok.sharding import make_mesh

    config = tiny_config(steps=10)
    single = training.train(config, str(tmp_path / "single"), progress=False)
    multi = training.train(config, str(tmp_path / "mesh"), mesh=make_mesh(data=4, expert=2), progress=False)
    for key in ("loss", "train_loss", "test_loss", "train_accuracy", "test_accuracy"):
        np.testing.assert_allclose(multi[key], single[key], rtol=2e-4, atol=1e-5)
