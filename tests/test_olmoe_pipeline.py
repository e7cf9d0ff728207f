"""OLMoE pipeline end to end: three tiny random HF checkpoints stand in for three revisions."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hf_reference import save_hf_model
from moe_grok import pipeline
from moe_grok.analysis import analyze, test_accuracy
from moe_grok.analysis import sources as sources_lib
from moe_grok.analysis import stats as stats_lib
from moe_grok.data import corpus as data
from moe_grok.model.hf import CheckpointError
from moe_grok.sharding import make_mesh

ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS = (1000, 2000, 3000)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmoe")
    for seed, step in enumerate(STEPS):
        save_hf_model(root / f"step{step}-tokens{step // 250}B", seed=seed)
    rng = np.random.default_rng(0)
    for domain in ("math", "code"):
        with open(root / f"{domain}.jsonl", "w") as f:
            for _ in range(12):
                ids = rng.integers(0, 96, rng.integers(3, 20)).tolist()
                f.write(json.dumps({"input_ids": ids}) + "\n")
    with open(root / "test_accuracy.csv", "w") as f:
        f.write("step,group,accuracy\n")
        for step, acc in zip(STEPS, (0.1, 0.4, 0.8)):
            for domain in ("math", "code"):
                f.write(f"{step},{domain},{acc}\n")
    return root


def _split(root):
    return data.load_jsonl_ids([root / "math.jsonl", root / "code.jsonl"], seq_len=16, groups_from_files=True)


def _sources(root, mesh=None):
    return sources_lib.checkpoint_sources([str(root / f"step{s}-tokens{s // 250}B") for s in STEPS],
                                          dtype="float32", mesh=mesh)


def test_pipeline_end_to_end_and_resume(workspace, tmp_path, monkeypatch):
    split = _split(workspace)
    _, accuracy = test_accuracy.load_test_accuracy_csv(workspace / "test_accuracy.csv", steps=STEPS)
    out = str(tmp_path / "out")
    report = pipeline.run_pipeline(_sources(workspace), {"train": split}, out, test_accuracy=accuracy,
                                   options=analyze.AnalysisOptions(max_pairs=50), batch_size=8, progress=False)
    assert report["steps"] == list(STEPS)
    assert set(report["groups"]) == {"math", "code"}
    for group in report["groups"].values():
        assert group["n_train"] == 12 and group["n_memorized"] >= 2
        assert len(group["curves"]["pathway_distance"]) == 3
        assert "pathway_consistency" in group["correlations"]
    assert sorted(os.listdir(os.path.join(out, "cache"))) == [f"step_{s:010d}.npz" for s in STEPS]

    from moe_grok.model import hf

    def refuse(*args, **kwargs):
        raise AssertionError("a finished checkpoint was loaded again")

    monkeypatch.setattr(hf, "load_hf", refuse)
    again = pipeline.run_pipeline(_sources(workspace), {"train": split}, out, test_accuracy=accuracy,
                                  options=analyze.AnalysisOptions(max_pairs=50), batch_size=8, progress=False)
    assert json.dumps(again, default=float) == json.dumps(report, default=float)


def test_sharded_pipeline_equals_single_device(workspace, tmp_path):
    split = _split(workspace)
    single = stats_lib.collect_checkpoint_stats(_sources(workspace)[:1], {"train": split}, str(tmp_path / "a"),
                                               batch_size=8, progress=False)
    mesh = make_mesh(data=4, expert=2)
    sharded = stats_lib.collect_checkpoint_stats(_sources(workspace, mesh)[:1], {"train": split},
                                                str(tmp_path / "b"), batch_size=8, mesh=mesh, progress=False)
    for field in stats_lib.STAT_FIELDS:
        np.testing.assert_allclose(sharded[0].splits["train"][field], single[0].splits["train"][field], atol=1e-5)


def test_missing_revision_keeps_finished_checkpoints(workspace, tmp_path):
    sources = _sources(workspace) + sources_lib.checkpoint_sources([str(workspace / "step9000-missing")])
    cache = tmp_path / "out" / "cache"
    with pytest.raises(CheckpointError, match="step9000-missing"):
        pipeline.run_pipeline(sources, {"train": _split(workspace)}, str(tmp_path / "out"), batch_size=8,
                              progress=False)
    assert len(os.listdir(cache)) == 3


def test_checkpoint_specs():
    assert sources_lib.parse_checkpoint_spec("allenai/OLMoE-1B-7B-0924@step245000-tokens1027B") == (
        "allenai/OLMoE-1B-7B-0924", "step245000-tokens1027B", 245000)
    assert sources_lib.parse_checkpoint_spec("/ckpts/final=1100000") == ("/ckpts/final", None, 1100000)
    with pytest.raises(ValueError, match="cannot tell the training step"):
        sources_lib.parse_checkpoint_spec("/ckpts/final")


def test_too_long_sequences_are_refused(workspace, tmp_path):
    long_split = data.load_jsonl_ids([workspace / "math.jsonl"], seq_len=80, groups_from_files=True)  # model: 64
    with pytest.raises(ValueError, match="longer than the model's limit 64"):
        stats_lib.collect_checkpoint_stats(_sources(workspace)[:1], {"train": long_split}, str(tmp_path),
                                          progress=False)


def test_experiment_script(workspace, tmp_path):
    """The absl launcher wires config -> data -> checkpoints -> report."""
    checkpoints = ",".join(str(workspace / f"step{s}-tokens{s // 250}B") for s in STEPS)
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "olmoe_grokking.py"),
           f"--config={os.path.join(ROOT, 'configs', 'olmoe_grokking.py')}",
           f"--config.checkpoints={checkpoints}", "--config.dtype=float32", "--config.batch_size=8",
           "--config.data.format=jsonl_ids", f"--config.data.paths={workspace / 'math.jsonl'},{workspace / 'code.jsonl'}",
           "--config.data.seq_len=16", f"--config.test_accuracy_csv={workspace / 'test_accuracy.csv'}",
           f"--config.out_dir={tmp_path / 'run'}", "--config.analysis.max_pairs=50"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "math" in result.stdout and "r(dist)" in result.stdout
    assert os.path.exists(tmp_path / "run" / "report" / "analysis.png")


def test_cross_group_control_curve(workspace, tmp_path):
    from moe_grok.analysis import metrics
    from moe_grok.extraction import pathways

    split = _split(workspace)
    report = pipeline.run_pipeline(_sources(workspace), {"train": split}, str(tmp_path / "out"), batch_size=8,
                                   options=analyze.AnalysisOptions(max_pairs=None), progress=False)
    curve = report["cross_group_distance"]["math|code"]
    assert len(curve) == 3
    # Recompute the last checkpoint's control by hand from the cache and the memorized sets.
    stats = stats_lib.collect_checkpoint_stats(_sources(workspace), {"train": split}, str(tmp_path / "out" / "cache"),
                                              progress=False)
    from moe_grok.analysis import grokking

    loss = np.stack([s.splits["train"]["loss"] for s in stats])
    memorized = {}
    for g, name in enumerate(split.group_names):
        rows = np.flatnonzero(split.groups == g)
        eps = grokking.calibrate_eps(loss[:, rows]).eps
        memorized[name] = rows[grokking.memorization_steps(loss[:, rows], np.array(STEPS), eps) >= 0]
    weights = stats[-1].splits["train"]["mean_weights"]
    expected = metrics.cross_group_distance(pathways.pathway_strings(weights[memorized["math"]]),
                                            pathways.pathway_strings(weights[memorized["code"]]))
    assert np.isclose(curve[-1], expected)
