"""The pathway monitor: per-step metrics with their controls, the provisional detector, the history
and its report (docs/monitor.md)."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from moe_grok.analysis import registry, test_results
from moe_grok.analysis.analyze import analyze
from moe_grok.analysis.grokking import memorization_steps
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.monitor import PathwayMonitor, ProbeSet, report_from_history
from moe_grok.monitor.pathway_monitor import CONTRAST, SETS
from moe_grok.monitor.training_callback import HISTORY_DIR, MonitorCallback, monitor_callbacks
from moe_grok.studies import toy_run
from moe_grok.training import loop
from moe_grok.training.checkpointing import RunCheckpoints
from moe_grok.training.metrics_log import read_metrics

from tensorboard_reader import read_scalars
from training_helpers import metrics_without_time, tiny_config

# The "sets" metrics of an engine without answer labels (the monitor's): registry `requires` None.
PATHWAY_SET_METRICS = tuple(m.name for m in registry.metrics("sets") if m.requires is None)

N_TRAIN, N_HELD_OUT, LAYERS, EXPERTS, WIDTH = 24, 12, 3, 4, 6
TRAIN_LABELS = ["add"] * 12 + ["mul"] * 12
HELD_OUT_LABELS = ["add"] * 6 + ["mul"] * 6
STEPS = (0, 10, 20, 30, 40, 50)
OPTIONS = AnalysisOptions(max_pairs=50, tau_sweep=(0.7,), delta_sweep=(0.05,), eps_sweep=(1.0,))


@dataclasses.dataclass
class MemoryWriter:
    """A scalar writer keeping what it is given."""

    rows: list = dataclasses.field(default_factory=list)
    flushed: int = 0
    closed: bool = False

    def write_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed = True


def _probe_outputs(rng, n, index, with_correct):
    """One probe's outputs at checkpoint `index`: routing that sharpens, losses that fall at
    per-sample speeds and then settle (so the rule memorizes some samples before the end)."""
    logits = rng.normal(size=(n, LAYERS, EXPERTS)) * (1 + index)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    speed = np.tile(np.linspace(0.3, 2.5, n // 2), 2)  # each domain: slow to fast learners
    loss = 3.0 * np.exp(-speed * index) + 0.01 * rng.random(n)
    out = {"mean_weights": weights.astype(np.float32),
           "routing_entropy": (-(weights * np.log(weights)).sum(-1)).astype(np.float32),
           "loss": loss.astype(np.float32)}
    if with_correct:
        out["correct"] = (rng.random(n) < index / len(STEPS)).astype(np.float32)
    return out


def _checkpoint(index):
    """(outputs, router, param_sample) of checkpoint `index`, the same for every call."""
    rng = np.random.default_rng(index)
    outputs = {"train": _probe_outputs(rng, N_TRAIN, index, True),
               "held_out": _probe_outputs(rng, N_HELD_OUT, index, True)}
    router = rng.normal(size=(LAYERS, EXPERTS, WIDTH)).astype(np.float32)
    params = {"layers/moe/router": router.reshape(-1), "layers/moe/router#size": np.asarray(router.size, np.int64)}
    return outputs, router, params


def _monitor(**kwargs):
    return PathwayMonitor({"train": TRAIN_LABELS, "held_out": HELD_OUT_LABELS}, test="held_out", options=OPTIONS,
                          **kwargs)


def _without_test_metric(metrics):
    """The metrics without the metric the `monitored` fixture registers only while it updates."""
    return {k: v for k, v in metrics.items() if "first_expert_weight" not in k}


def _same_report(a, b):
    assert json.dumps(a, default=float, sort_keys=True) == json.dumps(b, default=float, sort_keys=True)


@pytest.fixture(scope="module")
def monitored():
    """A monitor fed every checkpoint with an in-memory writer and a test-registered metric:
    (monitor, writer, [each update's metrics])."""
    def first_expert_weight(engine, split, rows, checkpoint):
        return float(engine.paths.weights(split, checkpoint)[rows, :, 0].mean()) if rows.size else np.nan

    metric = registry.Metric("first_expert_weight", first_expert_weight, "diagnostic", "first expert weight",
                             "first expert weight", "mean weight of expert 0", computed_on=("sets",))
    writer = MemoryWriter()
    with registry.registered(metric):
        monitor = _monitor(writers=[writer])
        updates = [monitor.update(step, *_checkpoint(i)) for i, step in enumerate(STEPS)]
    return monitor, writer, updates


def test_metrics_cover_every_sets_metric_on_each_set_with_the_contrast(monitored):
    monitor, writer, updates = monitored
    names = [*PATHWAY_SET_METRICS, "first_expert_weight"]
    for domain in ("add", "mul"):
        for metric in names:
            for name in (*SETS, CONTRAST):
                assert f"monitor/{domain}/{name}/{metric}" in updates[-1], (domain, name, metric)
            mem, held, contrast = (updates[-1][f"monitor/{domain}/{s}/{metric}"] for s in ("memorized", "held_out",
                                                                                               CONTRAST))
            np.testing.assert_equal(contrast, mem - held)
        assert updates[-1][f"monitor/{domain}/held_out/n"] == updates[-1][f"monitor/{domain}/memorized/n"] or \
            updates[-1][f"monitor/{domain}/memorized/n"] < 2
    assert all(isinstance(v, float) for v in updates[-1].values())
    assert [step for step, _ in writer.rows] == list(STEPS)
    assert writer.rows[-1][1] == updates[-1]


def test_provisional_detector_is_the_rule_on_the_steps_so_far(monitored):
    """At each step the memorized set is the analysis' rule on the checkpoints seen so far; its metric
    values are the last point of analyze()'s memorized curves on that prefix."""
    monitor, _, updates = monitored
    stats = monitor.stats()
    loss = np.stack([s.splits["train"]["loss"] for s in stats]).astype(np.float64)
    probes = monitor.probes
    for k in range(2, len(STEPS) + 1):
        assert updates[k - 1]["monitor/provisional"] == 1.0
        report = analyze(stats[:k], probes, "train", None, "held_out", None, None, OPTIONS)
        for domain in ("add", "mul"):
            entry = report["domains"][domain]
            t_star = memorization_steps(loss[:k, probes["train"].rows(domain)], STEPS[:k],
                                        entry["memorization"]["eps"], OPTIONS.delta)
            n = int(((t_star >= 0) & (t_star < STEPS[k - 1])).sum())
            assert updates[k - 1][f"monitor/{domain}/detector/n_memorized"] == n
            assert updates[k - 1][f"monitor/{domain}/detector/eps"] == entry["memorization"]["eps"]
            for name in SETS:
                assert updates[k - 1][f"monitor/{domain}/{name}/n"] == entry["sets"][name]["n"]
                for metric in PATHWAY_SET_METRICS:
                    np.testing.assert_equal(updates[k - 1][f"monitor/{domain}/{name}/{metric}"],
                                            entry["sets"][name]["curves"][metric][-1], err_msg=f"{k} {name} {metric}")
    assert any(u["monitor/add/detector/n_memorized"] > 0 for u in updates)
    final = monitor.finish()
    assert final["monitor/provisional"] == 0.0
    assert json.dumps({**final, "monitor/provisional": 1.0}) == json.dumps(_without_test_metric(updates[-1]))


def test_report_is_analyze_over_the_history(monitored, tmp_path):
    monitor, _, _ = monitored
    probes = {"train": ProbeSet.from_labels(TRAIN_LABELS), "held_out": ProbeSet.from_labels(HELD_OUT_LABELS)}
    test = test_results.test_results_from_split(monitor.stats(), "held_out", probes["held_out"])
    reference = analyze(monitor.stats(), probes, "train", test, "held_out", None, None, OPTIONS)
    assert "test_accuracy" in reference["domains"]["add"]["curves"]
    report = monitor.report()
    assert report.pop("checkpoints") == [f"step {s}" for s in STEPS]
    _same_report(report, reference)


def test_resumed_monitor_equals_an_uninterrupted_one(monitored, tmp_path):
    monitor, _, updates = monitored
    directory = str(tmp_path / "history")
    first = _monitor(directory=directory)
    for i, step in enumerate(STEPS[:4]):
        first.update(step, *_checkpoint(i))
    stray = _checkpoint(9)  # a step the killed run did after its last checkpoint: redone on resume
    first.update(STEPS[4], *stray)
    resumed = _monitor(directory=directory)
    assert [s.step for s in resumed.stats()] == list(STEPS[:5])
    resumed.update(STEPS[3], *_checkpoint(3))  # resumed from the checkpoint at STEPS[3]: later entries go
    assert [s.step for s in resumed.stats()] == list(STEPS[:4])
    for i, step in list(enumerate(STEPS))[4:]:
        last = resumed.update(step, *_checkpoint(i))
    assert json.dumps(last) == json.dumps(_without_test_metric(updates[-1]))
    _same_report(resumed.report(), monitor.report())
    out = str(tmp_path / "out")
    from_disk = report_from_history(directory, out, with_plots=False)
    _same_report(from_disk, monitor.report())
    assert (tmp_path / "out" / "report" / "table.txt").exists()
    with pytest.raises(ValueError, match="records another monitor"):
        PathwayMonitor({"train": TRAIN_LABELS, "held_out": HELD_OUT_LABELS}, directory=directory)


def test_light_probe_forms_and_refused_outputs():
    monitor = PathwayMonitor({"train": N_TRAIN, "held_out": N_HELD_OUT}, options=OPTIONS)  # sizes of the others:
    assert monitor.probes["train"].group_names == ("all",)  # ... their compiled consistency serves
    rng = np.random.default_rng(0)
    outputs = {"train": _probe_outputs(rng, N_TRAIN, 1, False), "held_out": _probe_outputs(rng, N_HELD_OUT, 1, False)}
    metrics = monitor.update(0, outputs, rng.normal(size=(LAYERS, EXPERTS, WIDTH)))
    assert "monitor/all/contrast/distance" in metrics and "monitor/all/test_accuracy" not in metrics
    assert np.isnan(monitor.stats()[0].splits["train"]["correct"]).all()
    bad = {**outputs, "held_out": {**outputs["held_out"], "loss": np.zeros(5)}}
    with pytest.raises(ValueError, match="probe 'held_out': loss has shape"):
        monitor.update(1, bad, rng.normal(size=(LAYERS, EXPERTS, WIDTH)))
    with pytest.raises(ValueError, match="no outputs for probe"):
        monitor.update(1, {"train": outputs["train"]}, rng.normal(size=(LAYERS, EXPERTS, WIDTH)))
    with pytest.raises(ValueError, match="the held_out probe 'held_out' is not among"):
        PathwayMonitor({"train": 8})


@pytest.fixture(scope="module")
def toy_monitored_run(tmp_path_factory):
    """The tests' tiny toy run (checkpoints at every evaluation) trained with the toy run's callbacks,
    the monitor among them: (config, workdir)."""
    workdir = str(tmp_path_factory.mktemp("toy"))
    config = tiny_config()  # test_training's run: its programs are in the session's compilation cache
    config.train.eval_batch_size = config.analysis.batch_size  # the same float rounding as the analysis'
    callbacks = toy_run.training_callbacks(config)
    assert [type(c) for c in callbacks] == [toy_run.AnalysisCacheWriter, MonitorCallback]
    # Without the cache writer: the analysis extracts every checkpoint itself, independently of the monitor.
    loop.train(config, workdir, progress=False, callbacks=callbacks[1:])
    return config, workdir


def test_toy_run_monitor_report_equals_the_analysis_of_its_checkpoints(toy_monitored_run, tmp_path):
    config, workdir = toy_monitored_run
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert [r["monitor/provisional"] for r in rows] == [1.0, 1.0, 1.0, 0.0]
    for domain in ("add", "mul"):
        assert {f"monitor/{domain}/{s}/{m}" for s in (*SETS, CONTRAST) for m in PATHWAY_SET_METRICS} <= set(rows[-1])
    # TensorBoard's reader finds every monitor scalar of metrics.jsonl in the run's directory, at its steps
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    for name in (k for k in rows[-1] if k.startswith("monitor/")):
        want = [(r["step"], r[name]) for r in rows if name in r]
        got = scalars[name]
        assert [step for step, _ in got] == [step for step, _ in want], name
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-6, err_msg=name)
    history = os.path.join(workdir, HISTORY_DIR)
    from_history = report_from_history(history, str(tmp_path / "out"), with_plots=False)
    reference = toy_run.analyze_run(config, workdir, progress=False, with_plots=False)
    _same_report(from_history, reference)
    # issue 34, defect 7: the held-out control is the validation half, independent of the test accuracy's half
    assert {d["sets"]["held_out"]["split"] for d in reference["domains"].values()} == {"validation"}
    for name in ("table.txt", "per_checkpoint.csv", "table1.csv", "groups.csv", "param_dynamics.csv"):
        with open(os.path.join(workdir, "analysis", "report", name), "rb") as f:
            assert (tmp_path / "out" / "report" / name).read_bytes() == f.read(), name


def test_the_report_command_reads_a_monitor_history(toy_monitored_run, tmp_path, capsys):
    """`moe-grok report --history_dir --out_dir`: the history's report files, its table printed."""
    from absl import logging

    from moe_grok import cli

    _, workdir = toy_monitored_run
    verbosity = logging.get_verbosity()
    try:
        cli.main(["report", f"--history_dir={os.path.join(workdir, HISTORY_DIR)}", f"--out_dir={tmp_path}",
                  "--noplots"])
    finally:
        logging.set_verbosity(verbosity)  # the command quiets absl's logging, as a launcher does
    printed = capsys.readouterr().out
    table = (tmp_path / "report" / "table.txt").read_text()
    assert table.strip() in printed and f"report: {tmp_path / 'report'}" in printed
    assert not list((tmp_path / "report").glob("*.png"))


def test_toy_held_out_control_is_the_validation_split_with_the_test_split_as_option():
    """Issue 34, defect 7: the held-out control of every metric is the validation split by default."""
    config = tiny_config()
    config.monitor.enabled = True
    assert toy_run.held_out_split(config) == "validation"
    assert toy_run.monitor_callbacks(config)[0].held_out_split == "validation"
    config.analysis.held_out_split = "test"
    assert toy_run.held_out_split(config) == "test" and toy_run.monitor_callbacks(config)[0].held_out_split == "test"
    config.analysis.held_out_split = "train"
    with pytest.raises(ValueError, match="held_out_split"):
        toy_run.held_out_split(config)


def test_toy_run_monitor_resumes_with_the_run(toy_monitored_run, tmp_path):
    """A run killed after step 20 and resumed from its state at step 10 (the newer one lost): the
    monitor's history drops what the resumed run will not redo and ends as the uninterrupted run's."""
    config, reference = toy_monitored_run
    workdir = str(tmp_path / "resumed")
    callbacks = monitor_callbacks(config)
    loop.train(config, workdir, stop_at=20, progress=False, callbacks=callbacks)
    shutil.rmtree(RunCheckpoints(workdir).state_dir(20))
    history = os.path.join(workdir, HISTORY_DIR)
    shutil.copy(os.path.join(history, "step_0000000020.npz"), os.path.join(history, "step_0000000015.npz"))
    loop.train(config, workdir, progress=False, callbacks=callbacks)  # the same callback object: its monitor too
    resumed, uninterrupted = PathwayMonitor.from_history(history), PathwayMonitor.from_history(
        os.path.join(reference, HISTORY_DIR))
    assert [s.step for s in resumed.stats()] == [0, 10, 20, 30]
    for a, b in zip(resumed.stats(), uninterrupted.stats(), strict=True):
        for probe in a.splits:
            for field in a.splits[probe]:
                np.testing.assert_array_equal(a.splits[probe][field], b.splits[probe][field])
        np.testing.assert_array_equal(a.router, b.router)
    assert json.dumps(metrics_without_time(workdir)) == json.dumps(metrics_without_time(reference))
