"""The runnable examples (examples/): a tiny HF Qwen3-MoE in a plain torch loop, the same through
the transformers Trainer callback, a user's own Flax MoE; each, for a few steps, leaves the
monitor's history and a report with every per-step metric. Also the Trainer callback driven
through its hooks (the Trainer itself needs accelerate, which the test extras do not hold)."""
import csv
import importlib.util
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import flax_moe  # noqa: E402  (examples/, after the skips)
import hf_torch_loop  # noqa: E402

from moe_grok.analysis import registry  # noqa: E402
from moe_grok.integrations.hf_probes import probe_outputs  # noqa: E402
from moe_grok.integrations.hf_trainer import PathwayMonitorCallback  # noqa: E402
from moe_grok.monitor import PathwayMonitor  # noqa: E402
from moe_grok.monitor.hf_routing import router_matrices_from_hf  # noqa: E402
from moe_grok.monitor.pathway_monitor import CONTRAST, SETS  # noqa: E402

# The "sets" metrics of an engine without answer labels (the monitor's): registry `requires` None.
PATHWAY_SET_METRICS = tuple(m.name for m in registry.metrics("sets") if m.requires is None)

STEPS, EVAL_EVERY = 20, 10
DOMAINS = ("method", "training")  # examples/byte_corpus.py's documents


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models train faster on one thread than on two cores shared with other work (tens of times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_run(result, steps=(0, 10, 20)):
    """The history holds every monitored step, the report its files, the metrics every set's metric."""
    files = sorted(os.listdir(result["history_dir"]))
    assert files == ["monitor.json", *(f"step_{s:010d}.npz" for s in steps)]
    for name in ("summary.json", "table.txt", "per_checkpoint.csv"):
        assert os.path.getsize(os.path.join(result["report_dir"], name)) > 0
    metrics = result["metrics"]
    assert metrics["monitor/provisional"] == 0.0 and metrics["monitor/checkpoints"] == len(steps)
    for domain in DOMAINS:
        for metric in PATHWAY_SET_METRICS:
            for name in (*SETS, CONTRAST):
                assert f"monitor/{domain}/{name}/{metric}" in metrics
        # the held-out control has the memorized set's size (growing set: its size now) and is NaN below 2 samples
        n = metrics[f"monitor/{domain}/memorized/n"]
        assert metrics[f"monitor/{domain}/held_out/n"] == n
        assert np.isfinite(metrics[f"monitor/{domain}/held_out/distance"]) == (n >= 2)
    assert metrics["monitor/method/train_loss"] < 5.0  # trained: a byte vocabulary starts at ln 256 = 5.5 nats
    return metrics


def _step_stats(history_dir, step):
    with np.load(os.path.join(history_dir, f"step_{step:010d}.npz")) as stored:
        return {key: stored[key] for key in stored.files}


@pytest.fixture(scope="module")
def torch_loop(tmp_path_factory):
    return hf_torch_loop.main(str(tmp_path_factory.mktemp("hf_torch_loop")), STEPS, EVAL_EVERY, with_plots=False)


def test_hf_torch_loop(torch_loop):
    _check_run(torch_loop)
    # The parameter sample gives the report every family's parameter dynamics (one row per pair of updates).
    with open(os.path.join(torch_loop["report_dir"], "param_dynamics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert sorted({row["family"] for row in rows}) == ["attention", "experts", "other", "router"]
    assert len(rows) == 4 * 2 and all(float(row["relative_change"]) > 0 for row in rows)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers' Trainer needs accelerate, which is not installed")
def test_hf_trainer(torch_loop, tmp_path):
    import hf_trainer

    result = hf_trainer.main(str(tmp_path), STEPS, EVAL_EVERY, with_plots=False)
    _check_run(result)
    # The same model, seed and probes: before training both runs see the same routing.
    ours, theirs = _step_stats(result["history_dir"], 0), _step_stats(torch_loop["history_dir"], 0)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-6, err_msg=key)


def test_trainer_callback_hooks(tmp_path):
    """What the Trainer calls, without the Trainer: on_evaluate at two steps, on_train_end."""
    from transformers.trainer_callback import TrainerControl, TrainerState

    corpus = hf_torch_loop.load_corpus()
    model = hf_torch_loop.tiny_model().train()
    tokens = {"train": {"input_ids": corpus.train}, "held_out": {"input_ids": corpus.held_out}}
    monitor = PathwayMonitor({"train": corpus.train_domains, "held_out": corpus.held_out_domains})
    callback = PathwayMonitorCallback(monitor, tokens, batch_size=16)  # 32 + 16 samples: 3 batches
    state = TrainerState()
    for step in (0, 10):
        state.global_step = step
        callback.on_evaluate(None, state, TrainerControl(), model=model)
        with torch.no_grad():  # the model moves between evaluations
            model.model.layers[0].mlp.gate.weight.mul_(2.0)
    assert model.training  # the callback restores the training mode
    assert [s.step for s in monitor.stats()] == [0, 10] and callback.last_metrics["monitor/provisional"] == 1.0
    callback.on_train_end(None, state, TrainerControl())
    assert callback.last_metrics["monitor/provisional"] == 0.0
    # Batches of 16 gave what one pass over each probe gives.
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.mul_(0.5)
    direct = probe_outputs(model, tokens, batch_size=32)
    assert model.training
    stored = monitor.stats()[-1]
    for name, fields in direct.items():
        for field, value in fields.items():
            np.testing.assert_allclose(stored.splits[name][field], value, atol=1e-6, err_msg=f"{name} {field}")
    np.testing.assert_array_equal(stored.router, router_matrices_from_hf(model))
    router_sample = stored.param_sample["model.layers.0.mlp.gate.weight/moe/router"]
    np.testing.assert_array_equal(router_sample, stored.router[0].reshape(-1))  # all 8 x 32 entries: fewer than 4096
    with pytest.raises(ValueError, match="held_out"):
        PathwayMonitorCallback(monitor, {"train": tokens["train"]})


def test_flax_moe(tmp_path):
    _check_run(flax_moe.main(str(tmp_path), STEPS, EVAL_EVERY, with_plots=False))
