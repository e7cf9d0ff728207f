"""Toy pipeline end to end: training, exact resume, checkpoint analysis with caching, reports."""
import contextlib
import dataclasses
import functools
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from moe_grok.checkpoints import cache as stats_lib
from moe_grok.checkpoints import sources as sources_lib
from moe_grok.config import MoEConfig, toy
from moe_grok.data import tasks
from moe_grok.data.splits import EvalSplit
from moe_grok.model import params as model_lib
from moe_grok.studies import toy_bounds, toy_run
from moe_grok.training import loop, metrics_log
from moe_grok.training import step as step_lib
from moe_grok.training.checkpointing import RunCheckpoints
from moe_grok.training.evaluation import mean_pathway_length
from moe_grok.training.metrics_log import read_metrics
from moe_grok.training.run_config import model_config_of, task_spec

from config_files import CONFIG_DIR, load_config
from report_checks import check_report
from tensorboard_reader import read_scalars
from training_helpers import StepRecorder, metrics_without_time, tiny_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    with contextlib.redirect_stderr(io.StringIO()) as stderr:  # not a terminal: progress lines, as in a batch job
        loop.train(config, workdir)
    with open(os.path.join(workdir, "stderr.txt"), "w") as f:
        f.write(stderr.getvalue())
    return config, workdir


def _tensorboard_rows(workdir):
    """The run's TensorBoard scalars as metrics.jsonl rows ({"step", key: value}, keys by metrics_log's tags)."""
    keys = {metrics_log.tensorboard_tag(key): key for row in read_metrics(workdir) for key in row if key != "step"}
    rows = {}
    for tag, events in read_scalars(os.path.join(workdir, metrics_log.TENSORBOARD_DIR)).items():
        for step, value in events:
            rows.setdefault(step, {"step": step})[keys[tag]] = value
    return [rows[step] for step in sorted(rows)]


def test_training_writes_its_metrics_as_tensorboard_scalars_and_progress_lines(finished_run):
    """Every metrics.jsonl row is in workdir/tensorboard (float32), under grouped tags; a batch job's log
    gets progress lines with a rate, not carriage returns."""
    _, workdir = finished_run
    rows = read_metrics(workdir)
    scalars = _tensorboard_rows(workdir)
    assert [r["step"] for r in scalars] == [r["step"] for r in rows] == [0, 10, 20, 30]
    for row, logged in zip(rows, scalars, strict=True):
        assert logged.keys() == row.keys()
        np.testing.assert_allclose([logged[k] for k in row], [row[k] for k in row], rtol=1e-6)
    tags = set(read_scalars(os.path.join(workdir, "tensorboard")))
    assert {"train/loss", "train/grad_norm", "eval/test_accuracy", "eval/train_accuracy/add", "time/elapsed_s"} <= tags
    with open(os.path.join(workdir, "stderr.txt")) as f:
        log = f.read()
    assert "\r" not in log and "train 1 seed: 30/30 step (100%)" in log and "ETA" in log and "step/s" in log


def test_training_learns_and_writes_checkpoints(finished_run):
    config, workdir = finished_run
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [0, 10, 20, 30]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.3
    assert set(metrics[-1]) >= {"train_accuracy/add", "test_accuracy/mul", "balance_loss", "ce"}
    assert RunCheckpoints(workdir).steps() == [0, 10, 20, 30]


def test_resume_after_kill_is_identical(finished_run, tmp_path):
    config, reference = finished_run
    workdir = str(tmp_path / "resumed")
    loop.train(config, workdir, stop_at=20, progress=False)  # "killed" after step 20
    assert RunCheckpoints(workdir).steps() == [0, 10, 20]
    loop.train(config, workdir, progress=False)
    assert metrics_without_time(workdir) == metrics_without_time(reference)
    # TensorBoard holds each step once, as metrics.jsonl does: the redone steps replaced, not added
    assert len(os.listdir(os.path.join(workdir, metrics_log.TENSORBOARD_DIR))) == 1
    without_time = lambda rows: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]
    assert without_time(_tensorboard_rows(workdir)) == without_time(_tensorboard_rows(reference))
    sources = {s.step: s for s in toy_run.run_checkpoint_sources(workdir)}
    ref_sources = {s.step: s for s in toy_run.run_checkpoint_sources(reference)}
    jax.tree.map(np.testing.assert_array_equal, sources[30].load()[1], ref_sources[30].load()[1])


def test_user_callback_runs_at_its_cadence_and_again_after_a_resume(finished_run, tmp_path):
    """A callback every 3 steps and at the end sees each due step once, after the built-in callbacks of
    that step, with that step's params; a resume continues its cadence; the run's numbers do not change."""
    config, reference = finished_run
    workdir = str(tmp_path / "recorded")
    first, second = StepRecorder(every_steps=3), StepRecorder(every_steps=3)
    loop.train(config, workdir, stop_at=20, progress=False, callbacks=[first])
    loop.train(config, workdir, progress=False, callbacks=[second])  # resumes from the train state at 20
    assert [c[1] for c in first.calls] == [0, 3, 6, 9, 12, 15, 18]
    assert [c[1] for c in second.calls] == [21, 24, 27, 30]
    assert {c[0] for c in first.calls + second.calls} == {config.train.seed}
    assert metrics_without_time(workdir) == metrics_without_time(reference)
    for _, step, _, metrics, written in first.calls + second.calls:  # what the built-in callbacks made
        assert (step % 10 == 0) == bool(metrics) == written, step
        assert not metrics or {"test_accuracy", "train_pathway_length"} <= set(metrics)
        assert ("grad_norm" in metrics) == (step > 0 and bool(metrics))  # no optimizer step before step 0
    params = {s.step: s.load()[1] for s in toy_run.run_checkpoint_sources(workdir)}
    assert set(params) == {0, 10, 20, 30}
    for _, step, checksum, *_ in first.calls + second.calls:
        if step in params:
            assert checksum == float(np.sum(np.asarray(params[step]["embed"]["embedding"], np.float64)))


def test_measuring_callback_is_logged_and_a_failing_callback_is_reported_by_name(tmp_path):
    """A callback with before_checkpoint adds to the logged row; an exception in a callback stops training,
    with a note naming it, after the built-in callbacks of that step (its checkpoint is saved)."""

    class Measuring:
        name, every_steps, at_end, before_checkpoint = "measuring", 5, False, True

        def on_step(self, state):
            state.metrics["measured_step"] = float(state.step)

    class Exploding:
        name, every_steps, at_end = "exploding", 5, False

        def on_step(self, state):
            if state.step == 10:
                raise ValueError("boom")

    workdir = str(tmp_path / "failing")
    with pytest.raises(ValueError, match="boom") as failure:
        loop.train(tiny_config(), workdir, progress=False, callbacks=[Exploding(), Measuring()])
    assert f"in training callback 'exploding' at step 10 of seed 0 ({workdir})" in failure.value.__notes__
    assert RunCheckpoints(workdir).steps() == [0, 10]
    rows = read_metrics(workdir)
    assert [(m["step"], m["measured_step"]) for m in rows] == [(0, 0.0), (10, 10.0)]  # step 5: nothing logged
    assert list(rows[1])[-2:] == ["measured_step", "elapsed_s"] and "test_accuracy" in rows[1]


def test_callback_cadence():
    from moe_grok.training.callbacks import SaveCheckpoint, is_due, next_due_step, step_callbacks

    every_4, at_end = SaveCheckpoint(every_steps=4, at_end=False), SaveCheckpoint(every_steps=None)
    assert [s for s in range(11) if is_due(every_4, s, 10)] == [0, 4, 8]
    assert [s for s in range(11) if is_due(at_end, s, 10)] == [10]
    assert [next_due_step([every_4, at_end], s, 10) for s in (0, 3, 4, 8, 9, 10)] == [4, 4, 8, 10, 10, 12]
    assert next_due_step([every_4], 8, 10) == 12 and next_due_step([at_end], 10, 10) is None
    with pytest.raises(ValueError, match="'save_checkpoint': every_steps must be a positive integer or None, got 0"):
        step_callbacks(tiny_config(), [SaveCheckpoint(every_steps=0)])


def test_workdir_with_other_model_is_refused(finished_run):
    config, workdir = finished_run
    other = tiny_config()
    other.model.hidden_size = 32
    with pytest.raises(ValueError, match="different run.*model.hidden_size: 16 -> 32"):
        loop.train(other, workdir, progress=False)


def test_run_recorded_before_attention_impl_resumes_with_the_matmul_form(finished_run, tmp_path):
    """A run.json written before `attention_impl` existed: those runs trained with the matmul form,
    so resuming with it continues the run, and the default ("auto") is refused, naming the field."""
    import shutil

    config, reference = finished_run
    workdir = str(tmp_path / "old")
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("analysis"))
    identity_path = os.path.join(workdir, "run.json")
    with open(identity_path) as f:
        identity = json.load(f)
    del identity["model"]["attention_impl"]
    with open(identity_path, "w") as f:
        json.dump(identity, f)
    before = _files(workdir)
    with pytest.raises(ValueError, match="model.attention_impl: 'matmul' -> 'auto'"):
        loop.train(config, workdir, progress=False)
    assert _files(workdir) == before
    matmul = config.copy_and_resolve_references()
    matmul.model.attention_impl = "matmul"
    # Finished: resumed from its last train state with nothing left to train (no matmul step compiled).
    assert loop.train(matmul, workdir, progress=False) == read_metrics(reference)[-1]
    assert metrics_without_time(workdir) == metrics_without_time(reference)


def _files(workdir):
    return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
            for root, _, names in os.walk(workdir) for name in names if name != "train.lock"}


@pytest.mark.parametrize("changes, message", [
    ({"train.seed": 1}, r"train\.seed: 0 -> 1"),
    ({"task.train_fraction": 0.6, "train.steps": 350}, r"task\.train_fraction: 0\.5 -> 0\.6"),
    ({"train.learning_rate": 3e-3, "task.random_labels": True}, r"task\.random_labels: False -> True.*"
                                                                 r"train\.learning_rate: 0\.01 -> 0\.003"),
])
def test_rerun_with_another_identity_is_refused_and_changes_nothing(finished_run, changes, message):
    """Issue 12.2: another seed or split on a finished workdir used to resume (or report) the old run."""
    config, workdir = finished_run
    other = tiny_config()
    for key, value in changes.items():
        section, name = key.split(".")
        other[section][name] = value
    before = _files(workdir)
    with pytest.raises(ValueError, match=message):
        loop.train(other, workdir, progress=False)
    assert _files(workdir) == before


def test_rerun_of_a_finished_run_returns_its_last_evaluation(finished_run):
    config, workdir = finished_run
    last = loop.train(config, workdir, progress=False)
    assert last == read_metrics(workdir)[-1] and last["step"] == 30


def test_steps_may_grow(finished_run, tmp_path):
    config, reference = finished_run
    workdir = str(tmp_path / "grown")
    loop.train(tiny_config(steps=20), workdir, progress=False)
    loop.train(config, workdir, progress=False)  # steps 20 -> 30: same identity, resumes
    assert metrics_without_time(workdir) == metrics_without_time(reference)


def test_workdir_without_identity_is_refused(finished_run, tmp_path):
    """A workdir with training output but no run.json (an older moe_grok) cannot be resumed safely."""
    config, _ = finished_run
    os.makedirs(tmp_path / "old" / "checkpoints" / "100")
    with pytest.raises(ValueError, match="holds training output but no run.json"):
        loop.train(config, str(tmp_path / "old"), progress=False)


def test_metrics_line_cut_by_a_kill_is_dropped(tmp_path):
    rows = [{"step": 0, "loss": 1.0}, {"step": 10, "loss": 0.5}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + '\n{"step": 20, "lo')
    assert read_metrics(str(tmp_path)) == rows
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 0\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1 is not valid JSON"):
        read_metrics(str(tmp_path))


def test_second_writer_is_refused(finished_run):
    from moe_grok.training import run_dir

    config, workdir = finished_run
    with run_dir.workdir_lock(workdir), pytest.raises(RuntimeError, match=f"another process \\(pid {os.getpid()}"):
        loop.train(config, workdir, progress=False)
    assert loop.train(config, workdir, progress=False)["step"] == 30  # released with the holder


MODEL_FLAGS = {"moe_impl": "dense", "expert_chunk_size": "64", "expert_chunk_granule": "16"}  # not the defaults


def _toy_models(config) -> dict[str, dict]:
    """{flag prefix: model section} of a toy config (toy_protocol.py holds one toy config per arm)."""
    if "arms" in config:
        return {f"arms.{arm}.model": c.model.to_dict() for arm, c in config.arms.items()}
    return {"model": config.model.to_dict()}


TOY_CONFIGS = ("toy_grokking", "toy_mixture", "toy_protocol")


@pytest.fixture(scope="module")
def configs_from_command_line(tmp_path_factory):
    """{config name: the config an absl launcher parses from MODEL_FLAGS given on its command line}, from one
    subprocess that defines one config flag per toy config."""
    script = tmp_path_factory.mktemp("flags") / "show_configs.py"
    definitions = "\n".join(f"_CONFIGS[{name!r}] = config_flags.DEFINE_config_file({name!r}, "
                            f"{os.path.join(CONFIG_DIR, f'{name}.py')!r})" for name in TOY_CONFIGS)
    script.write_text(textwrap.dedent("""
        import json
        from absl import app
        from ml_collections import config_flags
        _CONFIGS = {}
        """) + definitions + textwrap.dedent("""
        app.run(lambda argv: print(json.dumps({name: json.loads(c.value.to_json()) for name, c in _CONFIGS.items()})))
        """))
    flags = [f"--{name}.{prefix}.{key}={value}" for name in TOY_CONFIGS
             for prefix in _toy_models(load_config(name)) for key, value in MODEL_FLAGS.items()]
    result = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return {name: ml_collections.ConfigDict(config)
            for name, config in json.loads(result.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("name", TOY_CONFIGS)
def test_toy_model_sections_declare_the_dispatch_settings_and_take_them_as_flags(name, configs_from_command_line):
    """The model section is passed whole to toy(): its keys are MoEConfig fields, the dispatch settings
    are declared with MoEConfig's defaults, and each is settable from the command line."""
    fields = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    models = _toy_models(load_config(name))
    for model in models.values():
        assert set(model) <= set(fields), set(model) - set(fields)
        assert {key: model[key] for key in MODEL_FLAGS} == {key: fields[key] for key in MODEL_FLAGS}
    parsed = _toy_models(configs_from_command_line[name])
    assert set(parsed) == set(models)
    for model in parsed.values():
        assert {key: str(model[key]) for key in MODEL_FLAGS} == MODEL_FLAGS


@pytest.mark.parametrize("key, value", [("eval_every", 0), ("batch_size", 0), ("steps", -5), ("eval_batch_size", 0),
                                        ("warmup_steps", -1), ("learning_rate", 0.0), ("b2", 1.0),
                                        ("label_smoothing", 1.0), ("label_smoothing", -0.1)])
def test_bad_train_config_is_refused_before_any_work(tmp_path, key, value):
    """Issue 12.9: eval_every=0 / batch_size=0 raised ZeroDivisionError mid-run; steps=-5 was accepted."""
    config = tiny_config()
    config.train[key] = value
    with pytest.raises(ValueError, match=f"config.train: .*{key} must be"):
        loop.train(config, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")


def test_label_smoothing_is_the_cross_entropy_against_smoothed_labels():
    """ce = -sum_c q_c log p_c with q = (1 - a) one_hot + a / V; nll stays the plain NLL; a = 0 is plain CE."""
    config = tiny_config()
    spec = task_spec(config)
    params = step_lib.initial_params(model_config_of(config, spec), seed=0)
    model_config = dataclasses.replace(model_config_of(config, spec), moe_impl="dense")  # compiles fastest
    data = tasks.make_dataset(spec)
    inputs, answers = data.train_inputs[:16], data.train_targets[:16]
    smoothing = 0.2

    @jax.jit
    def logits_and_losses(params):
        out = model_lib.forward(model_config, params, inputs, np.ones(inputs.shape, np.int32))
        losses = [step_lib.loss_fn(params, model_config, inputs, answers, 0.0, 0.0, a)[1] for a in (0.0, smoothing)]
        return out.logits[:, tasks.ANSWER_POSITION], *losses

    logits, plain, smoothed = logits_and_losses(params)
    log_p = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)), np.float64)
    nll = -np.mean(log_p[np.arange(16), answers])
    q = (1 - smoothing) * np.eye(log_p.shape[-1])[answers] + smoothing / log_p.shape[-1]
    np.testing.assert_allclose([plain["ce"], plain["nll"], smoothed["nll"]], nll, rtol=1e-5)
    np.testing.assert_allclose(smoothed["ce"], -np.mean(np.sum(q * log_p, -1)), rtol=1e-5)
    assert abs(float(smoothed["ce"]) - nll) > 1e-3  # smoothing really changes the optimized loss


def test_resume_from_step_zero_logs_it_once(finished_run, tmp_path):
    """Issue 12.9: a run killed right after its step-0 checkpoint logged step 0 twice on resume."""
    config, reference = finished_run
    workdir = str(tmp_path / "zero")
    loop.train(config, workdir, stop_at=0, progress=False)
    assert [m["step"] for m in read_metrics(workdir)] == [0]
    loop.train(config, workdir, progress=False)
    assert metrics_without_time(workdir) == metrics_without_time(reference)


def _corrupt(state_dir):
    """Truncate every file of an orbax step directory (a disk that lost its data)."""
    for root, _, names in os.walk(state_dir):
        for name in names:
            open(os.path.join(root, name), "w").close()


def test_corrupt_train_state_falls_back_to_the_previous_one(finished_run, tmp_path, caplog):
    """Issue 12.5: a corrupt train state could not be resumed and only one state was kept."""
    import shutil

    config, reference = finished_run
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("analysis"))
    assert RunCheckpoints(workdir).state_steps() == [20, 30]
    _corrupt(os.path.join(workdir, "train_state", "30"))
    with caplog.at_level("WARNING"):
        assert loop.train(config, workdir, progress=False)["step"] == 30
    assert f"train state {os.path.join(workdir, 'train_state', '30')} cannot be restored" in caplog.text
    assert [name.split(".")[0] for name in os.listdir(os.path.join(workdir, "corrupt"))] == ["train_state_30"]
    assert metrics_without_time(workdir) == metrics_without_time(reference)  # 20 -> 30 redone, same numbers
    jax.tree.map(np.testing.assert_array_equal, toy_run.run_checkpoint_sources(workdir)[-1].load()[1],
                 toy_run.run_checkpoint_sources(reference)[-1].load()[1])
    assert RunCheckpoints(workdir).state_steps() == [20, 30]  # a fresh state 30 replaced the bad one

    for step in (20, 30):
        _corrupt(os.path.join(workdir, "train_state", str(step)))
    with pytest.raises(RuntimeError, match=r"no usable train state.*train_state/30.*train_state/20"):
        loop.train(config, workdir, progress=False)


def test_analysis_end_to_end_and_cache(finished_run, monkeypatch):
    config, workdir = finished_run
    report = toy_run.analyze_run(config, workdir, progress=False)
    assert report["steps"] == [0, 10, 20, 30]
    for name in ("add", "mul"):
        domain = report["domains"][name]
        assert domain["memorization"]["eps_source"] in ("calibrated", "unreachable")
        assert set(domain["sets"]) == {"memorized", "held_out", "random_train"}
        assert len(domain["sets"]["held_out"]["curves"]["distance"]) == 4
        held_out = domain["sets"]["held_out"]  # the growing memorized set's size: NaN below 2 samples
        defined = np.asarray(held_out["n_per_checkpoint"]) >= 2
        assert np.all(np.isfinite(held_out["curves"]["consistency"]) == defined)
        assert held_out["split"] == "validation"
        assert {"memorized/distance", "held_out/consistency", "train_loss", "validation_loss"} <= set(domain["table1"])
        assert all(n.startswith("Pretrain@") for n in domain["pretrain_groups"])
        assert domain["test_groups"] and all(n.startswith("Test@") for n in domain["test_groups"])
    out = os.path.join(workdir, "analysis", "report")
    for name in ("summary.json", "per_checkpoint.csv", "table1.csv", "groups.csv", "pairs.csv", "table.txt",
                 "analysis.png", "distances.png", "groups.png", "pairs.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    check_report(report, out, num_layers=config.model.num_layers, num_experts=config.model.num_experts)
    with open(os.path.join(out, "table.txt")) as f:
        assert "== add" in f.read()

    # A second analysis reads every checkpoint from the cache: no model is loaded.
    def refuse(*args, **kwargs):
        raise AssertionError("a cached checkpoint was recomputed")

    monkeypatch.setattr(RunCheckpoints, "restore_params", refuse)
    again = toy_run.analyze_run(config, workdir, progress=False, with_plots=False)
    assert json.dumps(again, default=float) == json.dumps(report, default=float)


def test_training_hands_its_evaluation_to_the_analysis_cache(tmp_path, monkeypatch):
    """With train.eval_batch_size = analysis.batch_size, each evaluated checkpoint's extraction becomes
    the analysis' cache entry: the analysis extracts only the other checkpoints, and its report and
    entries equal those of an analysis that extracts every checkpoint itself."""
    import shutil

    config = tiny_config(steps=20)
    config.train.update(checkpoint_every=5, eval_batch_size=64)  # steps 5 and 15: checkpoints not evaluated
    handed = str(tmp_path / "handed")
    loop.train(config, handed, progress=False, callbacks=toy_run.analysis_cache_callbacks(config))
    cache = os.path.join(handed, "analysis", "cache")
    assert sorted(os.listdir(cache)) == [f"step_{s:010d}.npz" for s in (0, 10, 20)]
    fresh = str(tmp_path / "fresh")
    shutil.copytree(handed, fresh, ignore=shutil.ignore_patterns("analysis"))

    restored = []
    restore = RunCheckpoints.restore_params
    monkeypatch.setattr(RunCheckpoints, "restore_params",
                        lambda self, step, abstract: restored.append(step) or restore(self, step, abstract))
    report = toy_run.analyze_run(config, handed, progress=False, with_plots=False)
    assert restored == [5, 15]
    restored.clear()
    reference = toy_run.analyze_run(config, fresh, progress=False, with_plots=False)
    assert restored == [0, 5, 10, 15, 20]
    assert json.dumps(report, default=float) == json.dumps(reference, default=float)
    for step in (0, 10, 20):
        name = f"step_{step:010d}.npz"
        with np.load(os.path.join(cache, name)) as a, np.load(os.path.join(fresh, "analysis", "cache", name)) as b:
            assert a.files == b.files
            for array in a.files:
                if array != "key":  # the key names each run's own checkpoint files
                    np.testing.assert_array_equal(a[array], b[array], err_msg=f"{name}: {array}")
            # the logged "test" metrics are over both held-out halves
            logged = next(m for m in read_metrics(handed) if m["step"] == step)
            held_out = np.concatenate([a["test/correct"], a["validation/correct"]])
            assert logged["test_accuracy"] == pytest.approx(float(held_out.mean()))
            held_out_weights = np.concatenate([a["test/mean_weights"], a["validation/mean_weights"]])
            assert logged["test_pathway_length"] == pytest.approx(mean_pathway_length(held_out_weights, 0.7))

    # A resume below the newest checkpoint redoes steps whose checkpoints are already on disk (or, with
    # another checkpoint_every, were never written): nothing is handed over for them.
    shutil.rmtree(RunCheckpoints(handed).state_dir(20))
    os.remove(os.path.join(cache, "step_0000000020.npz"))
    resumed = config.copy_and_resolve_references()
    resumed.train.update(eval_every=4, checkpoint_every=4)  # steps 16 and 20 evaluated again from step 15
    loop.train(resumed, handed, progress=False, callbacks=toy_run.analysis_cache_callbacks(resumed))
    assert sorted(os.listdir(cache)) == [f"step_{s:010d}.npz" for s in (0, 5, 10, 15)]  # 5, 15: the analyses'
    assert [m["step"] for m in read_metrics(handed)] == [0, 10, 16, 20]

    config.train.eval_batch_size = 128  # another batch size rounds differently: the analysis extracts itself
    assert toy_run.analysis_cache_callbacks(config) == []


def test_analysis_pairs_groups_by_embedding_files(finished_run, tmp_path):
    """config.analysis.train_embeddings / test_embeddings: .npy files pair the groups; a file with
    the wrong row count is named before any checkpoint is analysed."""
    import shutil

    config, reference = finished_run
    splits = tasks.evaluation_splits(tasks.make_dataset(task_spec(config)))
    sizes = {split: len(splits[split]) for split in ("train", "test")}
    rng = np.random.default_rng(0)
    config = config.copy_and_resolve_references()
    for split, n in sizes.items():
        np.save(tmp_path / f"{split}.npy", rng.normal(size=(n, 4)))
        config.analysis[f"{split}_embeddings"] = str(tmp_path / f"{split}.npy")
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)  # with its analysis cache: nothing is extracted again
    report = toy_run.analyze_run(config, workdir, progress=False, with_plots=False)
    assert [d["pairing_similarity"] for d in report["domains"].values()] == ["embeddings", "embeddings"]

    np.save(tmp_path / "short.npy", np.zeros((3, 4)))
    fresh = str(tmp_path / "fresh")
    shutil.copytree(reference, fresh, ignore=shutil.ignore_patterns("analysis"))
    for split, n in sizes.items():
        bad = config.copy_and_resolve_references()
        bad.analysis[f"{split}_embeddings"] = str(tmp_path / "short.npy")
        with pytest.raises(ValueError, match=rf"split '{split}' \(.*short.npy\) embeddings have shape \(3, 4\), "
                                             rf"need \[{n}, dim\]"):
            toy_run.analyze_run(bad, fresh, progress=False, with_plots=False)
    assert not os.path.exists(os.path.join(fresh, "analysis"))
    config.analysis.test_embeddings = str(tmp_path / "missing.npy")
    with pytest.raises(FileNotFoundError, match="embeddings of split 'test': no such file .*missing.npy"):
        toy_run.analyze_run(config, fresh, progress=False, with_plots=False)


def test_analysis_metrics_match_direct_computation(finished_run):
    """The cached per-checkpoint routing equals a fresh forward pass + pathway metrics."""
    from moe_grok.extraction.routing import extract_dataset

    config, workdir = finished_run
    data = tasks.make_dataset(task_spec(config))
    splits = tasks.evaluation_splits(data)
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
    small = toy(vocab_size=8, num_layers=2, hidden_size=16, head_dim=8, num_heads=2, num_kv_heads=2,
                moe_impl="dense")  # the dispatch plays no part here: the one that compiles fastest
    big = small.replace(hidden_size=32)
    init = jax.jit(model_lib.init_params, static_argnums=0)  # compiled: the op-by-op init takes seconds
    params = {small: lambda: init(small, jax.random.key(0)),  # big: refused before its params are used, so
              big: lambda: jax.eval_shape(functools.partial(model_lib.init_params, big), jax.random.key(0))}  # shapes
    sources = [sources_lib.CheckpointSource(s, f"ckpt{s}", lambda c=c: (c, params[c]()))
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
    toy_run.analyze_run(config, workdir, progress=False, with_plots=False)  # fills the cache the bounds read
    rows = toy_bounds.toy_run_bounds(workdir, n_samples=30, lam=0.1)
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    for r in rows:
        assert 0 < r["d_eff"] < 30 and np.isclose(r["bound"], r["bias"] + r["variance"] + 0.1**2 * np.log(20) / 30,
                                                   rtol=1e-4)
        assert 0.0 <= r["test_error"] <= 1.0
    text = toy_bounds.format_toy_bounds(rows)
    assert "d_eff ~ test error over 4 checkpoints" in text
    # The last row equals the theory module applied directly to that checkpoint's routing.
    data = tasks.make_dataset(task_spec(config))
    chosen = np.sort(np.random.default_rng(0).choice(len(data.train_targets), 30, replace=False))
    stats = stats_lib.collect_checkpoint_stats(toy_run.run_checkpoint_sources(workdir), tasks.evaluation_splits(data),
                                              os.path.join(workdir, "analysis", "cache"), progress=False)
    gram = theory.multilayer_routing_gram(stats[-1].splits["train"]["mean_weights"][chosen])
    y = np.eye(config.task.p)[data.train_targets[chosen]] - 1.0 / config.task.p
    direct = theory.generalization_bound(gram, y, 0.1, 0.1, 0.05)
    assert np.isclose(float(direct.total), rows[-1]["bound"], rtol=1e-5)


def test_mesh_training_equals_single_device(finished_run, tmp_path):
    from moe_grok.sharding import make_mesh

    config, reference = finished_run  # the single-device run
    single = read_metrics(reference)[1]
    multi = loop.train(config, str(tmp_path / "mesh"), mesh=make_mesh(data=4, expert=2), stop_at=10, progress=False)
    assert single["step"] == multi["step"] == 10
    for key in ("loss", "train_loss", "test_loss", "train_accuracy", "test_accuracy"):
        np.testing.assert_allclose(multi[key], single[key], rtol=2e-4, atol=1e-5)


@pytest.fixture(scope="module")
def compiled_gradients():
    """(params, batch, {remat_layers: (lowered, compiled)}) of the toy loss's value_and_grad on 32 training
    samples of tiny_config()'s model, without and with remat_layers (compiled without compiler options), with
    the dense expert dispatch: the one that compiles fastest (remat and the compiler options act on any)."""
    config = tiny_config()
    spec = task_spec(config)
    data = tasks.make_dataset(spec)
    base = dataclasses.replace(model_config_of(config, spec), moe_impl="dense")
    params = step_lib.initial_params(base, seed=0)
    batch = (data.train_inputs[:32], data.train_targets[:32])
    programs = {}
    for remat_layers in (False, True):
        model_config = dataclasses.replace(base, remat_layers=remat_layers)
        loss = functools.partial(lambda p, mc: step_lib.loss_fn(p, mc, *batch, 0.01, 0.001)[0], mc=model_config)
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
        programs[remat_layers] = lowered, lowered.compile()
    return params, batch, programs


def test_remat_layers_changes_only_how_gradients_are_computed(compiled_gradients):
    """Recomputing each layer's forward in the backward pass gives the same loss and gradients
    (to float32 summation order); the toy configs train with it."""
    assert load_config("toy_grokking").model.remat_layers
    params, _, programs = compiled_gradients
    (loss, grads), (loss_remat, grads_remat) = (programs[remat][1](params) for remat in (False, True))
    np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-6)
    flat, flat_remat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_remat)
    for (path, g), g_remat in zip(flat, flat_remat, strict=True):
        scale = float(np.abs(np.asarray(g)).max())
        np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g), atol=1e-5 * scale, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_cpu_train_step_compiler_options_take_effect_and_are_dropped_when_unknown(compiled_gradients, monkeypatch,
                                                                                  caplog):
    """On CPU the train step's gradients hand XLA only matmuls for YNNPACK (fewer library fusions in the
    compiled program than without the option); an XLA that does not know the option gets a warning, not an error."""
    _, _, programs = compiled_gradients
    lowered, plain = programs[True]
    options = step_lib.train_step_compiler_options("cpu")
    assert options == step_lib.CPU_TRAIN_STEP_OPTIONS
    assert step_lib.train_step_compiler_options("gpu") is None
    with_options = lowered.compile(compiler_options=options)
    assert with_options.as_text().count("ynn_fusion") < plain.as_text().count("ynn_fusion")
    step_lib.train_step_compiler_options.cache_clear()
    monkeypatch.setattr(step_lib, "CPU_TRAIN_STEP_OPTIONS",
                        {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NOT_A_TYPE"})
    try:
        assert step_lib.train_step_compiler_options("cpu") is None
        assert "not accepted" in caplog.text
    finally:
        step_lib.train_step_compiler_options.cache_clear()
