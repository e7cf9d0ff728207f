"""The OLMoE pipeline as two JAX processes on localhost (2 CPU devices each, gloo collectives), against the
single-process run: a killed process (or one that raises) ends the run within seconds, the rerun resumes from the
cache, and the result equals the single-process run's bit for bit, written by process 0 alone, each process having
read only its own experts and rows.

Every test here has "multiprocess" in its name (`pytest -k multiprocess`). The pair of processes is started by
tests/multiprocess_worker.py, which records what each process reads (see its docstring)."""
import json
import os
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from moe_grok import pipeline, strict_json

from config_files import load_config
from hf_reference import make_hf_model

HERE = os.path.dirname(__file__)
STEPS = (1000, 2000, 3000)
DOMAINS = ("math", "code")
SAMPLES = 12  # per domain
EXPERTS = 8  # hf_reference's tiny model
EXPERT_AXIS = 4  # mesh.expert: the expert axis spans both processes' devices, so each process holds 4 experts
BATCH = 8
HEARTBEAT_S = 2  # a process silent this long counts as dead
RUN_TIMEOUT_S = 180  # a whole run, both processes, on a loaded 2-core machine


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Three revisions of one tiny OLMoE model and two domains of token-id data."""
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("multiprocess")
    model = make_hf_model(seed=0)
    generator = torch.Generator().manual_seed(1)
    for k, step in enumerate(STEPS):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * k * torch.randn(p.shape, generator=generator))
        model.save_pretrained(str(root / f"step{step}"))
    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        with open(root / f"{domain}.jsonl", "w") as f:
            for _ in range(SAMPLES):
                f.write(json.dumps({"input_ids": rng.integers(0, 96, rng.integers(3, 16)).tolist()}) + "\n")
    return root


def _overrides(workspace, out_dir):
    return {"checkpoints": ",".join(str(workspace / f"step{s}") for s in STEPS), "dtype": "float32",
            "moe_impl": "dense", "batch_size": BATCH, "mesh.data": 1, "mesh.expert": EXPERT_AXIS,
            "data.format": "jsonl_ids", "data.paths": ",".join(str(workspace / f"{d}.jsonl") for d in DOMAINS),
            "data.seq_len": 16, "out_dir": str(out_dir), "plots": False, "analysis.max_pairs": 20,
            "analysis.delta": 0.3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_pair(workspace, out_dir, records, crash="none"):
    """Both processes of one run: [(returncode, stderr, Unix time of its exit)] by process id. records: the directory of
    their event files (record_<id>.jsonl, appended to)."""
    port = _free_port()
    # The test session's XLA flags (conftest: its code generation, which sets the float rounding the single-process
    # reference ran with), with 2 devices per process instead of 8.
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join([*xla_flags, "--xla_force_host_platform_device_count=2"]),
               JAX_PLATFORMS="cpu")
    flags = [f"--config.{k}={v}" for k, v in _overrides(workspace, out_dir).items()]
    procs = []
    for process_id in range(2):
        record = str(records / f"record_{process_id}.jsonl")
        cmd = [sys.executable, os.path.join(HERE, "multiprocess_worker.py"), record, str(process_id), crash, "--",
               "olmoe", "--config=olmoe_grokking", *flags, "--config.distributed=true",
               f"--config.cluster.coordinator_address=localhost:{port}", "--config.cluster.num_processes=2",
               f"--config.cluster.process_id={process_id}", f"--config.cluster.heartbeat_timeout_s={HEARTBEAT_S}",
               "--config.cluster.initialization_timeout_s=30"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    start, results = time.monotonic(), []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1.0, RUN_TIMEOUT_S - (time.monotonic() - start)))
            results.append((proc.returncode, err, time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def _events(records, process_id, kind):
    path = records / f"record_{process_id}.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        return [e for e in map(json.loads, f) if e["kind"] == kind]


def _files(root):
    """Every file under root, relative; a TensorBoard event file's name (time, host, pid) as "events"."""
    names = (os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)
    return sorted(os.path.join(os.path.dirname(n), "events") if "tfevents" in n else n for n in names)


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory):
    """The single-process run (in this process, on 4 of its 8 devices), then a two-process run whose process 1 is
    killed as it starts the second checkpoint, then the two-process rerun in the same out_dir."""
    from moe_grok.studies import olmoe_run

    root = tmp_path_factory.mktemp("runs")
    config = load_config("olmoe_grokking")
    for key, value in _overrides(workspace, root / "single").items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    olmoe_run.run(config)
    killed_records, records = root / "killed_records", root / "records"
    killed_records.mkdir()
    records.mkdir()
    killed = _run_pair(workspace, root / "multi", killed_records, crash="1:2")
    killed_cache = _files(root / "multi" / "cache")
    resumed = _run_pair(workspace, root / "multi", records)
    return {"single": root / "single", "multi": root / "multi", "killed": killed, "killed_cache": killed_cache,
            "killed_records": killed_records, "resumed": resumed, "records": records}


def test_multiprocess_kill_fails_the_run_naming_the_lost_process(runs):
    (rc0, err0, exit0), (rc1, _, _) = runs["killed"]
    assert rc1 == -9  # the worker killed itself as it began its second extraction
    assert rc0 != 0, err0[-3000:]
    # Either JAX's coordination service ends the survivor, its log naming the task that stopped sending heartbeats,
    # or a collective fails first (the peer's connection closed) and the launcher names the cause.
    assert ("stopped sending heartbeats" in err0 and "\n1\n" in err0) or (
        "process 0 of 2 failed because another process of the run died or failed" in err0), err0[-3000:]
    (crash,) = _events(runs["killed_records"], 1, "crash")
    assert exit0 - crash["time"] < 2 * HEARTBEAT_S + 10  # not a hang: detected within the heartbeat timeout
    assert runs["killed_cache"] == [f"step_{STEPS[0]:010d}.npz"]  # the first checkpoint was finished and kept
    assert [e["step"] for e in _events(runs["killed_records"], 0, "extracted")] == [STEPS[0]]


def test_multiprocess_rerun_resumes_and_equals_the_single_process_run(runs):
    for rc, err, _ in runs["resumed"]:
        assert rc == 0, err[-3000:]
    for process_id in range(2):  # the cached first checkpoint is not extracted again
        assert [e["step"] for e in _events(runs["records"], process_id, "extracted")] == list(STEPS[1:])
    single, multi = runs["single"], runs["multi"]
    assert _files(multi) == _files(single)
    # Exactly equal: both runs put the same rows on each of 4 devices of a 1 x 4 mesh and run the same per-device
    # program, so every float is computed alike (measured: bitwise equal, jax 0.10.2 on x86-64 CPUs).
    for step in STEPS:
        name = f"step_{step:010d}.npz"
        with np.load(single / "cache" / name) as a, np.load(multi / "cache" / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for field in a.files:
                np.testing.assert_array_equal(b[field], a[field], err_msg=f"{name}/{field}")
    for name in _files(single / "report"):  # table.txt, the CSVs and summary.json, byte for byte
        assert (multi / "report" / name).read_bytes() == (single / "report" / name).read_bytes(), name
    config_single, config_multi = (strict_json.load(d / pipeline.RUN_CONFIG_FILE) for d in (single, multi))
    differing = sorted(k for k in config_single.keys() | config_multi.keys()
                       if config_single.get(k) != config_multi.get(k))
    assert differing == ["cluster", "distributed", "out_dir"]
    recorded = strict_json.load(multi / pipeline.RUN_CONFIG_FILE)
    assert recorded["distributed"] and recorded["cluster"]["num_processes"] == 2


def test_multiprocess_only_process_0_writes(runs):
    """Process 1 runs under umask 077: anything it created in out_dir would lack the world-read bit."""
    multi = runs["multi"]
    for directory, _, names in os.walk(multi):
        for path in [directory, *(os.path.join(directory, n) for n in names)]:
            assert os.stat(path).st_mode & stat.S_IROTH, f"{path} was written by process 1"


def test_multiprocess_each_process_reads_its_experts_and_rows(runs):
    records = runs["records"]
    half = EXPERTS // 2
    for process_id in range(2):
        mine = set(range(process_id * half, (process_id + 1) * half))
        experts = set()
        for event in _events(records, process_id, "tensor"):
            if ".experts." in event["key"]:
                parts = event["key"].split(".experts.")[1].split(".")
                experts.add(int(parts[0]) if parts[0].isdigit() else event["index"][0])
        assert experts == mine, f"process {process_id} read experts {sorted(experts)}"
        # The cached first checkpoint is not read; the others are, from their own directories.
        directories = {os.path.basename(e["directory"]) for e in _events(records, process_id, "tensor")}
        assert directories == {f"step{s}" for s in STEPS[1:]}
        rows = _events(records, process_id, "rows")
        assert rows
        # Each of the 4 devices takes a quarter of every batch: process 0's two devices the first half.
        for batch in {e["shape"][0] for e in rows}:
            quarters = {(e["start"], e["stop"]) for e in rows if e["shape"][0] == batch}
            quarter = batch // 4
            assert quarters == {(process_id * 2 * quarter + d * quarter, process_id * 2 * quarter + (d + 1) * quarter)
                                for d in range(2)}, (batch, quarters)


def test_multiprocess_python_error_ends_every_process(workspace, tmp_path):
    """Process 1 raises as it starts the first extraction: it prints its error and exits at once, and process 0,
    waiting for it in a collective, fails too (rather than both waiting minutes at JAX's shutdown barrier)."""
    records = tmp_path / "records"
    records.mkdir()
    (rc0, err0, exit0), (rc1, err1, exit1) = _run_pair(workspace, tmp_path / "out", records, crash="1:1:raise")
    assert rc1 == 1 and "process 1 of 2 failed" in err1 and "RuntimeError: process 1 failed on purpose" in err1
    assert rc0 != 0, err0[-3000:]
    assert "process 0 of 2 failed" in err0 or "stopped sending heartbeats" in err0, err0[-3000:]
    (crash,) = _events(records, 1, "crash")
    assert max(exit0, exit1) - crash["time"] < 2 * HEARTBEAT_S + 10  # not the 5 minutes of the shutdown barrier
    assert not os.listdir(tmp_path / "out" / "cache")
