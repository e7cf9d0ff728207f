"""The `moe-grok` command: its help, its subcommands' flags, config names, print-config, the wheel it ships in."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import ml_collections
import pytest
from absl import logging as absl_logging

from moe_grok import cli, configs
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.cli import config_keys, jobs

ROOT = os.path.join(os.path.dirname(__file__), "..")
# Each subcommand's flags, as the experiments/ launchers took them before the command existed.
FLAGS = {
    "toy": ["--config", "--workdir", "--[no]skip_training"],
    "protocol": ["--config", "--workdir", "--[no]summarize_only"],
    "rederive": ["--from_dir", "--workdir", "--docs_dir", "--analysis", "--arms"],
    "olmoe": ["--config"],
    "convert": ["--hf_path", "--revision", "--out", "--dtype", "--[no]overwrite"],
    "theory": ["--config"],
    "report": ["--history_dir", "--out_dir", "--[no]plots"],
    "print-config": [],
}


@pytest.fixture(autouse=True)
def _absl_verbosity_restored():
    """A job sets absl's verbosity (WARNING unless --verbosity), as the launchers always did: not for later tests."""
    verbosity = absl_logging.get_verbosity()
    yield
    absl_logging.set_verbosity(verbosity)


def _run(argv, capsys):
    """(exit code, stdout, stderr) of `moe-grok <argv>`, run in this process."""
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _leaf_paths(config, prefix=""):
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaf_paths(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_the_command_lists_every_subcommand_with_a_line(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(listed) == set(FLAGS) == set(jobs.JOBS)
    for name, job in jobs.JOBS.items():
        assert job.summary in listed[name]
    code, _, err = _run([], capsys)  # no command: the same list, as an error
    assert code == 2 and "print-config" in err
    code, _, err = _run(["tyo"], capsys)
    assert code == 2 and "no command 'tyo'" in err


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_subcommand_says_what_it_does_and_names_its_flags(name, capsys):
    code, out, _ = _run([name, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: moe-grok {name} [flags]")
    assert jobs.JOBS[name].description in out
    named = re.findall(r"^  (--\S+):$", out, flags=re.MULTILINE)
    assert named == FLAGS[name]


def test_usage_errors_exit_2_with_a_message(capsys):
    code, _, err = _run(["toy", "--no_such_flag=1"], capsys)
    assert code == 2 and "no_such_flag" in err
    code, _, err = _run(["convert", "--out=x"], capsys)  # --hf_path is required
    assert code == 2 and "--hf_path" in err
    code, _, err = _run(["toy", "--config=no_such_config"], capsys)
    assert code == 2 and "toy_grokking" in err  # names the shipped configs
    code, _, err = _run(["print-config"], capsys)
    assert code == 2 and "NAME" in err
    code, _, err = _run(["toy", "--config.train.stepz=1"], capsys)  # a key the config lacks
    assert code == 2 and 'Did you mean "steps"' in err


def test_a_config_given_by_name_resolves_from_the_package(capsys, monkeypatch):
    assert os.path.dirname(configs.path("toy_mixture")) == os.path.dirname(configs.__file__)  # in the package
    assert set(configs.names()) >= {"toy_grokking", "toy_mixture", "toy_protocol", "olmoe_grokking", "verify_theory"}
    seen = {}

    def record(flag_values, args, command):
        seen.update(config=flag_values["config"].value, workdir=flag_values.workdir, command=command)

    monkeypatch.setitem(jobs.JOBS, "toy", dataclasses.replace(jobs.TOY, run=record))
    code, _, _ = _run(["toy", "--config", "toy_mixture", "--config.train.steps=7", "--workdir=w"], capsys)
    assert code == 0
    assert seen["config"].task.p == 59 and seen["config"].train.steps == 7 and seen["workdir"] == "w"
    assert seen["command"] == "moe-grok toy --config toy_mixture --config.train.steps=7 --workdir=w"
    code, _, _ = _run(["toy", f"--config={configs.path('toy_grokking')}"], capsys)  # a path works too
    assert code == 0 and seen["config"].task.p == 97 and seen["config"].train.steps == 2000


@pytest.mark.parametrize("name", configs.names())
def test_every_key_of_every_shipped_config_has_help_and_print_config_names_it(name, capsys):
    keys = config_keys.config_keys(name)
    assert [key.path for key in keys if not key.help] == []
    code, out, _ = _run(["print-config", name], capsys)
    assert code == 0
    printed = [line.split(" = ")[0] for line in out.splitlines() if not line.startswith("#")]
    assert printed == list(_leaf_paths(configs.load(name)))


def test_a_key_takes_the_comment_that_declares_it(tmp_path):
    """Help comes from the declaring comment (dict keywords, assignments and their continuation lines,
    a section function's dataclass fields), through configs built on others; an uncommented key has none."""
    keys = {key.path: key for key in config_keys.config_keys("toy_protocol_round3")}
    assert keys["arms.mixture.train.steps"].default == 5000
    assert keys["arms.mixture.train.steps"].help == "optimizer steps"  # declared in toy_grokking, not round 3
    assert keys["arms.mixture.task.p"].help == "prime modulus"
    assert keys["arms.mixture.analysis.tau"].help.startswith("pathway: experts kept")  # AnalysisOptions.tau
    olmoe = {key.path: key.help for key in config_keys.config_keys("olmoe_grokking")}
    assert olmoe["validation_paths"].endswith("and the held-out control of every metric (\"\" = none)")
    (tmp_path / "base.py").write_text(
        "import ml_collections\n\n\ndef get_config():\n    config = ml_collections.ConfigDict()\n"
        "    config.steps = 3  # how many\n    config.width = 8\n    return config\n")
    (tmp_path / "derived.py").write_text(
        "import os\n\nfrom moe_grok.studies.launch import config_module\n\n\ndef get_config():\n"
        "    config = config_module(os.path.dirname(os.path.abspath(__file__)), 'base').get_config()\n"
        "    config.steps = 5  # more\n    return config\n")
    keys = config_keys.config_keys(str(tmp_path / "derived.py"))
    assert [(key.path, key.default, key.help) for key in keys] == [("steps", 5, "how many"), ("width", 8, "")]


def test_the_wheel_ships_the_configs_and_the_command(tmp_path):
    """A non-editable install's contents: the configs as package files, the console script's entry point."""
    source = tmp_path / "source"
    shutil.copytree(os.path.join(ROOT, "moe_grok"), source / "moe_grok",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), source)
    # setuptools' PEP 517 hook, what `pip wheel --no-build-isolation` calls, without pip's start-up
    build = f"import setuptools.build_meta as backend; backend.build_wheel({str(tmp_path / 'wheel')!r})"
    subprocess.run([sys.executable, "-c", build], cwd=source, check=True, capture_output=True, timeout=120)
    (wheel,) = (tmp_path / "wheel").iterdir()
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        entry_points = next(archive.read(f).decode() for f in files if f.endswith(".dist-info/entry_points.txt"))
    assert {f"moe_grok/configs/{name}.py" for name in configs.names()} <= files
    assert "moe_grok/cli/__init__.py" in files
    assert re.search(r"^\[console_scripts\]\nmoe-grok = moe_grok\.cli:main$", entry_points, flags=re.MULTILINE)


def test_rederive_reads_analysis_options_as_json_or_text():
    from moe_grok.checkpoints import run_artifact

    overrides = jobs.parse_option_overrides(["memorized_set=fixed", "tau=0.6", "tau_sweep=[0.5, 0.7]"])
    assert overrides == {"memorized_set": "fixed", "tau": 0.6, "tau_sweep": [0.5, 0.7]}
    options = run_artifact.options_from_json(run_artifact.options_to_json(AnalysisOptions()), overrides)
    assert (options.memorized_set, options.tau, options.tau_sweep) == ("fixed", 0.6, (0.5, 0.7))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        jobs.parse_option_overrides(["tau"])
    with pytest.raises(ValueError, match="unknown analysis option"):
        run_artifact.options_from_json({}, {"no_such_option": 1})


def test_toy_keeps_its_artifact_and_rederive_derives_each_seed_again(tmp_path, capsys, monkeypatch):
    """`moe-grok toy` writes workdir/artifacts/seed_<seed>.npz with a manifest; `moe-grok rederive`
    on a run's artifacts derives each seed's report into workdir/seed_<seed>/analysis (the functions
    themselves are tested in test_protocol; here the wiring, with both replaced)."""
    import numpy as np

    from moe_grok import pipeline
    from moe_grok.report import files
    from moe_grok.studies import toy_run

    written = {}

    def analyze_run(config, workdir, artifact=None):
        written["artifact"] = artifact
        os.makedirs(os.path.dirname(artifact))
        np.savez(artifact, x=np.zeros(1))
        return {}

    monkeypatch.setattr(toy_run, "analyze_run", analyze_run)
    monkeypatch.setattr(files, "format_table", lambda report: "table")
    workdir = tmp_path / "toy"
    code, _, _ = _run(["toy", "--skip_training", f"--workdir={workdir}", "--config.train.seed=3"], capsys)
    assert code == 0 and written["artifact"] == str(workdir / "artifacts" / "seed_3.npz")
    manifest = json.loads((workdir / "artifacts" / "manifest.json").read_text())
    assert list(manifest["files"]) == ["seed_3.npz"] and manifest["record"] == {"kind": "run"}
    derived = []
    monkeypatch.setattr(pipeline, "rederive", lambda *args: derived.append(args))
    code, _, _ = _run(["rederive", f"--from_dir={workdir / 'artifacts'}", f"--workdir={tmp_path / 'again'}",
                       "--analysis=tau=0.6"], capsys)
    assert code == 0
    assert derived == [(str(workdir / "artifacts" / "seed_3.npz"), str(tmp_path / "again" / "seed_3" / "analysis"),
                        {"tau": 0.6})]


def test_rederive_passes_its_arms_to_a_protocol_and_refuses_them_for_a_toy_run(tmp_path, capsys, monkeypatch):
    """--arms reaches protocol.rederive (the wiring; the function is tested in test_protocol); a toy
    run's artifacts have no arms, and saying so beats deriving every seed silently."""
    from moe_grok.checkpoints import run_artifact
    from moe_grok.studies import protocol, protocol_pages

    calls = []
    monkeypatch.setattr(run_artifact, "verify_manifest", lambda source: {"record": {"kind": "protocol"}})
    monkeypatch.setattr(protocol, "rederive", lambda *args, arms=None: calls.append((args, arms)) or {})
    monkeypatch.setattr(protocol_pages, "markdown", lambda results, quantities: "page")
    code, out, _ = _run(["rederive", "--from_dir=a", f"--workdir={tmp_path}", "--arms=grokking,late"], capsys)
    assert code == 0 and out.strip() == "page"
    assert calls == [(("a", str(tmp_path), {}, ""), ["grokking", "late"])]
    code, _, _ = _run(["rederive", "--from_dir=a", f"--workdir={tmp_path}"], capsys)
    assert code == 0 and calls[-1][1] is None
    monkeypatch.setattr(run_artifact, "verify_manifest", lambda source: {"record": {"kind": "run"}})
    with pytest.raises(ValueError, match="--arms selects a protocol run's arms"):
        _run(["rederive", "--from_dir=a", f"--workdir={tmp_path}", "--arms=grokking"], capsys)
