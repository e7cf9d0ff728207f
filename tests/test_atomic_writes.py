"""Every file a finished run leaves is whole or absent (issue 35: cases 1, 6, 8, 9, 10, 11 and "Done when").

Each writer is tested by filling the disk half-way through its write (`disk_full`: writes to a
file under a directory raise OSError(ENOSPC) after `budget` bytes) or by killing a
process between its write and its rename: the previous complete file (or report, or
checkpoint) must stay in place, no temporary file may stay behind, and the error must name the
file at fault.
"""
import errno
import functools
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from moe_grok import strict_json
from moe_grok.analysis import analyze as analyze_lib
from moe_grok.analysis import test_results as test_results_lib
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.checkpoints import cache as cache_lib
from moe_grok.checkpoints import sources as sources_lib
from moe_grok.config import MoEConfig, toy
from moe_grok.model import checkpoint_io
from moe_grok.model import params as model_lib
from moe_grok.report.files import write_report

from analysis_helpers import build_stats
from full_disk import disk_full

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTLE = [1, 4, 1, 4, 2, None, 2, None, 3, None, 5, None, None, None, None, None]


def _files(directory) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `directory`."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def _temporaries(directory) -> list[str]:
    return [os.path.join(root, n) for root, dirs, names in os.walk(directory) for n in names + dirs if ".tmp" in n]


# --- JSON files (strict_json) ------------------------------------------------------------------------------------


def test_json_file_survives_a_full_disk(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    strict_json.dump({"old": list(range(100))}, path, indent=1)
    before = _files(tmp_path)
    disk_full(monkeypatch, tmp_path, budget=50)
    with pytest.raises(OSError) as raised:
        strict_json.dump({"new": list(range(200))}, path, indent=1)
    monkeypatch.undo()
    assert _files(tmp_path) == before and strict_json.load(path) == {"old": list(range(100))}
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == path  # names the file


# --- report files (case 9) and the report tree (case 6) ---------------------------------------------------------


@pytest.fixture(scope="module")
def two_reports():
    """Two different reports (of two random draws of the same design)."""
    reports = []
    for seed in (0, 1):
        stats, splits = build_stats(np.random.default_rng(seed), SETTLE)
        test = test_results_lib.test_results_from_split(stats, "test", splits["test"])
        options = AnalysisOptions(eps=0.5, max_pairs=None, tau_sweep=(0.5,), delta_sweep=(0.05,), eps_sweep=(1.0,))
        reports.append(analyze_lib.analyze(stats, splits, "train", test, "test", options=options))
    return reports


@pytest.mark.parametrize("budget", [0, 3000, 60000])
def test_report_files_are_replaced_as_a_set_or_not_at_all(two_reports, tmp_path, monkeypatch, budget):
    """Case 9: a full disk while writing a report leaves the previous report whole (every file
    of the earlier run, none truncated, none of the new run), no temporary file, and the
    error names the report file."""
    old, new = two_reports
    write_report(old, str(tmp_path), with_plots=False)
    before = _files(tmp_path)
    disk_full(monkeypatch, tmp_path, budget)
    with pytest.raises(OSError) as raised:
        write_report(new, str(tmp_path), with_plots=False)
    monkeypatch.undo()
    assert _files(tmp_path) == before and not _temporaries(tmp_path)
    assert raised.value.errno == errno.ENOSPC
    assert os.path.dirname(raised.value.filename or "") == str(tmp_path), raised.value  # names a report file
    write_report(new, str(tmp_path), with_plots=False)  # with room again, the new report replaces it whole
    assert _files(tmp_path) != before and not _temporaries(tmp_path)


def test_plots_are_written_whole(two_reports, tmp_path, monkeypatch):
    from moe_grok.report import plots

    old, new = two_reports
    # Two of the figures (drawing every one is most of this test's time; test_training draws them all): the set
    # of figures is written whole or not at all, whichever figures it holds.
    monkeypatch.setattr(plots, "FIGURES", {name: plots.FIGURES[name] for name in ("groups.png", "per_layer.png")})
    write_report(new, str(tmp_path / "probe"), with_plots=False)
    tables = sum(len(v) for v in _files(tmp_path / "probe").values())
    out = tmp_path / "out"
    write_report(old, str(out))
    before = _files(out)
    assert "groups.png" in before
    disk_full(monkeypatch, out, budget=tables + 100)  # the tables fit, the plots do not
    with pytest.raises(OSError, match=r"\.png"):
        write_report(new, str(out))
    monkeypatch.undo()
    assert _files(out) == before and not _temporaries(out)
    assert {"groups.png", "per_layer.png"} <= set(before)


def _run_pipeline(monkeypatch, out_dir, seed, positions):
    from moe_grok import pipeline

    stats, splits = build_stats(np.random.default_rng(seed), SETTLE)
    monkeypatch.setattr(pipeline, "collect_checkpoint_stats", lambda *args, **kwargs: stats)
    options = AnalysisOptions(eps=0.5, max_pairs=None, tau_sweep=(0.5,), delta_sweep=(0.05,), eps_sweep=(1.0,),
                              positions=positions)
    return pipeline.run_pipeline([], splits, str(out_dir), test_split="test", options=options, progress=False,
                                 with_plots=False, tensorboard=False)  # the report tree alone


def test_a_stale_sub_report_does_not_survive_a_rerun(tmp_path, monkeypatch):
    """Case 6: positions=('all', 'scored'), then ('all',): report/positions_scored/ of the first
    run is gone, not left beside the new report with other settings."""
    _run_pipeline(monkeypatch, tmp_path, 0, ("all", "scored"))
    assert os.path.isfile(tmp_path / "report" / "positions_scored" / "summary.json")
    _run_pipeline(monkeypatch, tmp_path, 1, ("all",))
    assert not os.path.exists(tmp_path / "report" / "positions_scored")
    assert sorted(os.listdir(tmp_path)) == ["analysis.lock", "report"]  # no temporary directory either


def test_pipeline_report_tree_survives_a_full_disk(tmp_path, monkeypatch):
    """Case 9 through the pipeline: the report and its sub-report are one set; a full disk in
    the second one (after the first report of the new run is written) keeps both old ones."""
    _run_pipeline(monkeypatch, tmp_path / "probe", 1, ("all", "scored"))
    size = sum(len(v) for k, v in _files(tmp_path / "probe" / "report").items() if not k.startswith("positions_"))
    out = tmp_path / "out"
    _run_pipeline(monkeypatch, out, 0, ("all", "scored"))
    before = _files(out / "report")
    disk_full(monkeypatch, out, budget=size + 100)  # the new main report fits, its sub-report does not
    with pytest.raises(OSError) as raised:
        _run_pipeline(monkeypatch, out, 1, ("all", "scored"))
    monkeypatch.undo()
    assert _files(out / "report") == before and not _temporaries(out)
    # the error names the file at fault where it would have been (not the temporary directory)
    assert raised.value.errno == errno.ENOSPC, raised.value
    assert raised.value.filename == str(out / "report" / "positions_scored" / "summary.json"), raised.value


# --- cache entries (case 11) ------------------------------------------------------------------------------------


def _cache_inputs(tmp_path):
    from moe_grok.data.splits import EvalSplit

    model_config = toy(vocab_size=8, num_layers=2, hidden_size=8, head_dim=4, num_heads=2, num_kv_heads=2,
                       num_experts=2, num_experts_per_tok=1, expert_intermediate_size=8)
    params = model_lib.init_params(model_config, jax.random.key(0))
    tokens = np.ones((3, 4), np.int32)
    split = EvalSplit(tokens, tokens, tokens, tokens, np.zeros(3, np.int32), ("a",))
    extracted = {"train": {"mean_weights": np.full((3, 2, 2), 0.5, np.float32),
                           "scored_mean_weights": np.full((3, 2, 2), 0.5, np.float32),
                           "routing_entropy": np.ones((3, 2), np.float32),
                           "scored_routing_entropy": np.ones((3, 2), np.float32),
                           "loss": np.arange(3, dtype=np.float32), "correct": np.ones(3, np.float32)}}

    def load():
        raise AssertionError("the cached entry should have been used")

    source = sources_lib.CheckpointSource(100, "step 100", load, identity=lambda: {"name": "ckpt"})
    return model_config, params, {"train": split}, extracted, source


def test_cache_entry_on_a_full_disk_names_the_entry_and_leaves_no_temporary(tmp_path, monkeypatch):
    model_config, params, splits, extracted, source = _cache_inputs(tmp_path)
    cache = str(tmp_path / "cache")
    cache_lib.store_checkpoint_stats(cache, source, splits, extracted, model_config, params)
    before = _files(cache)
    extracted["train"]["loss"] = extracted["train"]["loss"] + 1
    disk_full(monkeypatch, cache, budget=700)
    with pytest.raises(OSError) as raised:
        cache_lib.store_checkpoint_stats(cache, source, splits, extracted, model_config, params)
    monkeypatch.undo()
    assert _files(cache) == before and not _temporaries(cache)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == os.path.join(cache, "step_0000000100.npz")


def test_temporary_cache_entries_of_killed_writers_are_removed_on_resume(tmp_path):
    model_config, params, splits, extracted, source = _cache_inputs(tmp_path)
    cache = str(tmp_path / "cache")
    cache_lib.store_checkpoint_stats(cache, source, splits, extracted, model_config, params)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited: its temporary file is an orphan
    orphan = os.path.join(cache, f"step_0000000200.npz.{dead_pid}-1234.tmp.npz")
    live = os.path.join(cache, f"step_0000000300.npz.{os.getpid()}-99.tmp.npz")  # another writer, still running
    for path in (orphan, live):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
    (stats,) = cache_lib.collect_checkpoint_stats([source], splits, cache, progress=False)
    np.testing.assert_array_equal(stats.splits["train"]["loss"], extracted["train"]["loss"])
    assert not os.path.exists(orphan) and os.path.exists(live)


# --- converted checkpoints (cases 1, 8, 10) ---------------------------------------------------------------------


TINY = toy(vocab_size=8, num_layers=1, hidden_size=8, head_dim=4, num_heads=2, num_kv_heads=2, num_experts=2,
           num_experts_per_tok=1, expert_intermediate_size=8, dtype="float32")


@functools.cache
def _tiny_params(seed: int):
    """TINY's initial params for `seed`, compiled once (eager initialization costs seconds per call)."""
    return jax.jit(model_lib.init_params, static_argnums=0)(TINY, jax.random.key(seed))


@pytest.fixture
def fake_hf(monkeypatch):
    """checkpoint_io.load_hf replaced by a tiny model whose weights follow `weights[path]` (a
    seed per HF source); `calls` records what was loaded."""
    calls, weights = [], {}

    def load_hf(path_or_repo, revision=None, dtype="bfloat16"):
        calls.append(path_or_repo)
        params = _tiny_params(weights.get(path_or_repo, 0))
        return TINY, params

    monkeypatch.setattr(checkpoint_io, "load_hf", load_hf)
    return calls, weights


def _hf_dir(path, tag=b"step1000"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write('{"model_type": "olmoe"}')
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(tag)
    return str(path)


def _router(directory):
    return np.asarray(checkpoint_io.restore_params(directory)[1]["layers"]["moe"]["router"])


def test_convert_into_an_hf_checkpoint_directory_is_refused(tmp_path, fake_hf):
    """Case 1: --out=<an HF checkpoint> is refused before anything is loaded (converting would
    shadow its weights); so is an earlier convert of another source. A re-run of the same
    convert replaces its output; --overwrite replaces anything."""
    calls, weights = fake_hf
    source = _hf_dir(tmp_path / "step2000", b"step2000")
    target = _hf_dir(tmp_path / "step1000")
    before = _files(target)
    with pytest.raises(checkpoint_io.CheckpointError, match=r"--out .*step1000 is not empty: it holds an HF "
                                                            r"checkpoint.*--overwrite"):
        checkpoint_io.convert_hf_checkpoint(source, target)
    assert calls == [] and _files(target) == before

    out = str(tmp_path / "converted")
    checkpoint_io.convert_hf_checkpoint(source, out, dtype="float32")
    weights[source] = 1  # the source was rewritten: the same convert again replaces the output
    checkpoint_io.convert_hf_checkpoint(source, out, dtype="float32")
    np.testing.assert_array_equal(_router(out), _tiny_params(1)["layers"]["moe"]
                                  ["router"])
    other = _hf_dir(tmp_path / "other")
    with pytest.raises(checkpoint_io.CheckpointError, match=r"holds a convert of .*step2000"):
        checkpoint_io.convert_hf_checkpoint(other, out)
    with pytest.raises(checkpoint_io.CheckpointError, match="is the HF checkpoint being converted"):
        checkpoint_io.convert_hf_checkpoint(other, other, overwrite=True)
    checkpoint_io.convert_hf_checkpoint(other, target, dtype="float32", overwrite=True)
    assert sorted(os.listdir(target)) == ["convert.json", "moe_config.json", "params"]
    assert sorted(os.listdir(tmp_path)) == [".converted.convert.lock", ".other.convert.lock", ".step1000.convert.lock",
                                            "converted", "other", "step1000", "step2000"]


def test_convert_that_fails_midway_keeps_the_previous_output(tmp_path, fake_hf, monkeypatch):
    """Case 8 (a full disk): the output is built aside; a failure after the params were written
    leaves the previous convert, restorable, and no temporary directory."""
    calls, weights = fake_hf
    source = _hf_dir(tmp_path / "hf")
    out = str(tmp_path / "out")
    checkpoint_io.convert_hf_checkpoint(source, out, dtype="float32")
    before = _router(out)
    weights[source] = 5

    def full(self, directory):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(directory, "moe_config.json"))

    monkeypatch.setattr(MoEConfig, "save", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint_io.convert_hf_checkpoint(source, out, dtype="float32")
    monkeypatch.undo()
    np.testing.assert_array_equal(_router(out), before)
    assert sorted(os.listdir(tmp_path)) == [".out.convert.lock", "hf", "out"]


def test_convert_killed_before_its_rename_keeps_the_previous_output(tmp_path, fake_hf):
    """Case 8 (a kill): a convert killed after writing params/ and before its output is swapped
    in leaves the previous output whole (restorable); the next convert removes the killed
    one's temporary directory."""
    source = _hf_dir(tmp_path / "hf")
    out = str(tmp_path / "out")
    checkpoint_io.convert_hf_checkpoint(source, out, dtype="float32")
    before = _router(out)
    script = textwrap.dedent(f"""
        import os, jax
        from moe_grok.config import MoEConfig, toy
        from moe_grok.model import checkpoint_io, params as model_lib
        tiny = MoEConfig.load({out!r})
        checkpoint_io.load_hf = lambda *a, **k: (tiny, model_lib.init_params(tiny, jax.random.key(9)))
        MoEConfig.save = lambda self, directory: os._exit(9)  # killed after params/ was written
        checkpoint_io.convert_hf_checkpoint({source!r}, {out!r}, dtype="float32")
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert checkpoint_io.is_checkpoint_dir(out)
    np.testing.assert_array_equal(_router(out), before)
    assert any(".tmp" in name for name in os.listdir(tmp_path))  # the killed convert's unfinished output
    checkpoint_io.convert_hf_checkpoint(source, out, dtype="float32")
    assert sorted(os.listdir(tmp_path)) == [".out.convert.lock", "hf", "out"]


def test_second_convert_into_the_same_output_is_refused(tmp_path, fake_hf):
    """Case 10: while one convert writes --out, a second one into it stops with a RuntimeError
    naming --out, the holder's pid and the lock, before loading anything."""
    calls, _ = fake_hf
    source = _hf_dir(tmp_path / "hf")
    out = str(tmp_path / "out")
    refusal = rf"--out {out} is being written by another process \(pid {os.getpid()}, lock .*\.out\.convert\.lock\)"
    with checkpoint_io.convert_lock(out), pytest.raises(RuntimeError, match=refusal):
        checkpoint_io.convert_hf_checkpoint(source, out, dtype="float32")
    assert calls == [] and not os.path.exists(out)
    checkpoint_io.convert_hf_checkpoint(source, out, dtype="float32")  # once the first is done
    assert checkpoint_io.is_checkpoint_dir(out)


def test_save_params_refuses_a_directory_of_other_files(tmp_path):
    params = _tiny_params(0)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(checkpoint_io.CheckpointError, match=r"notes\.txt.*replaces the directory whole"):
        checkpoint_io.save_params(str(tmp_path), TINY, params)
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("exchange", [True, False])
def test_directory_replaced_whole_with_or_without_an_atomic_exchange(tmp_path, monkeypatch, exchange):
    """replace_directory swaps with renameat2(RENAME_EXCHANGE) where the kernel has it, else two renames
    (the old tree aside first); either way the new tree is in place and nothing else stays."""
    from moe_grok import atomic_files

    if not exchange:
        monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)
    target = tmp_path / "report"
    (target / "positions_scored").mkdir(parents=True)
    (target / "positions_scored" / "summary.json").write_text("old")
    with atomic_files.directory_aside(str(target)) as staging:
        atomic_files.write_text(os.path.join(staging, "summary.json"), "new")
    assert _files(target) == {"summary.json": b"new"} and os.listdir(tmp_path) == ["report"]


def test_metrics_log_is_strict_json_and_reads_nan_back(tmp_path):
    from moe_grok import strict_json
    from moe_grok.training.metrics_log import METRICS_FILE, MetricsLog, read_metrics

    log = MetricsLog(str(tmp_path))
    log.append({"step": 0, "train_loss": float("nan"), "accuracy": 0.5})
    log.append({"step": 10, "train_loss": 1.5, "accuracy": 0.75})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [strict_json.loads(line)["train_loss"] for line in lines] == [None, 1.5]  # strict parsers accept it
    rows = read_metrics(str(tmp_path))
    assert np.isnan(rows[0]["train_loss"]) and rows[1]["train_loss"] == 1.5
    log.keep_up_to(0)  # rewritten whole (aside and renamed), still strict
    assert [strict_json.loads(line)["step"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()] == [0]
