"""The accelerator benchmark in one command: the tests whose code path differs by backend, run on the real
devices; extraction against HF's model on the same device, at the small config and at full size; MFU and
peak device memory. Prints a table and writes <workdir>/accelerator.json.

  python benchmarks/accelerator.py                   # on a GPU / TPU machine (setup: docs/benchmarks.md)
  python benchmarks/accelerator.py --no-full_size    # without OLMoE-1B-7B (its 12.9 GiB checkpoint)
  python benchmarks/accelerator.py --smoke           # a tiny version of every stage, on the CPU, < 30 s

Stages, each in a process of its own (this one never starts a JAX backend, so no process holds the
device's memory while another measures it):

  device   JAX's platform, devices and device kind; torch's version and CUDA device, if any
  tests    pytest on TESTS with MOE_GROK_TEST_PLATFORM set to JAX's platform, so they run on the real
           devices (tests/conftest.py); mesh tests fit their meshes to the devices there are
           (tests/mesh_devices.py) and skip where their point needs more, naming the count
  extract  per config: moe_grok.model.hf.load_hf(checkpoint, dtype), then `extract_dataset` without the
           LM head (routing only) on --batch x --seq random tokens: a first call (it compiles), then
           --repeats timed calls; tokens/s of the fastest; peak device memory (`memory_stats()`)
  hf       per config: transformers `OlmoeModel.from_pretrained(checkpoint, dtype)` (no LM head either)
           on the same device, forward with router logits, timed alike; peak `torch.cuda` memory.
           The same device: CUDA when JAX runs on a GPU and torch has CUDA, the CPU when JAX runs on the
           CPU; otherwise skipped, saying why

Configs: seeded random bfloat16 weights in the hub's OLMoE layout (full_size.py's checkpoint writer):
  small  OLMoE-shaped: hidden 512, 8 layers, 64 experts top-8, expert intermediate 256 (config.olmoe_small)
  full   OLMoE-1B-7B-0924, written under --full_size_workdir (full_size.py's default: one checkpoint for both)
  tiny   (--smoke) hidden 64, 2 layers, 8 experts top-2, vocab 256

MFU = tokens/s x FLOPs per token / the device's peak dense bfloat16 FLOP/s (PEAK_BF16_FLOPS by device
kind, or --peak_tflops). FLOPs per token = `MoEConfig.active_flops_per_token(seq)` (2 per multiply-add)
= 2 x active parameters + attention scores, where
  active parameters = layers x (d h hd + 2 d kv hd + h hd d)          q, k, v, o projections
                    + MoE layers x (d E + k x 3 d F)                    router; the k experts' gate, up, down
                    + dense-MLP layers x 3 d F_dense                    (Qwen3-MoE's; OLMoE has none)
  attention scores  = layers x 2 x 2 h hd (seq + 1) / 2                QK^T and AV over the mean causal context
(d hidden, h / kv heads, hd head_dim, E experts, k per token, F expert intermediate). Embeddings are a
lookup (no FLOPs) and the LM head is not computed (routing only): neither is counted. OLMoE-1B-7B:
1.076 G active parameters, 2.19 GFLOP per token at seq 512 (the model card's 1.3 B active parameters
count the embeddings and the head too).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

import numpy as np

import full_size

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# The tests whose code path differs by backend: the dispatch kernels against the dense oracle (ragged_dot
# is the GPU / TPU path), the mesh and expert-parallel tests on the real devices, and HF parity of the
# model, its layers and the extraction (the GPU / TPU dispatch, attention form and matmul precision).
TESTS = (
    "tests/test_model.py::test_dispatch_equals_dense_oracle",
    "tests/test_model.py::test_dispatch_gradients_match_dense",
    "tests/test_model.py::test_logits_and_router_logits_match_hf",
    "tests/test_model.py::test_bfloat16_weights_run_and_stay_close",
    "tests/test_model.py::test_mesh_loading_and_forward_equal_single_device",
    "tests/test_expert_parallel.py",
    "tests/test_parity.py",
    "tests/test_extraction.py::test_extraction_equals_hf",
    "tests/test_extraction.py::test_mesh_extraction_equals_single_device",
)
SMOKE_TESTS = ("tests/test_model.py::test_dispatch_equals_dense_oracle[0.0-ragged]",)  # the GPU / TPU kernel

# HF config.json of each benchmark config (OLMoE-1B-7B-0924's, resized).
CONFIGS = {
    "tiny": {**full_size.OLMOE_CONFIG, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 32,
             "vocab_size": 256, "eos_token_id": None},
    "small": {**full_size.OLMOE_CONFIG, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
              "num_key_value_heads": 8, "intermediate_size": 256},
    "full": full_size.OLMOE_CONFIG,
}

# Peak dense (no structured sparsity) bfloat16 FLOP/s per device, by a name found in JAX's device_kind
# (vendors' datasheets; an SXM board unless named). The first match counts: longer names come first.
PEAK_BF16_FLOPS = (
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


# ----------------------------------------------------------------------------------------
# What is measured
# ----------------------------------------------------------------------------------------
def peak_bf16_flops(device_kind: str, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, where it comes from): --peak_tflops, else the PEAK_BF16_FLOPS entry whose
    name `device_kind` contains, else (None, why)."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak_tflops"
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops, f"table: {name}"
    return None, f"unknown device kind {device_kind!r}: pass --peak_tflops"


def active_params(model_config) -> int:
    """The parameters one token's forward multiplies with, LM head and embeddings aside (the module
    docstring's formula): 2 x this + the attention scores' FLOPs = `active_flops_per_token`."""
    d, h, kv, hd = (model_config.hidden_size, model_config.num_heads, model_config.num_kv_heads,
                    model_config.head_dim)
    attention = d * h * hd + 2 * d * kv * hd + h * hd * d
    experts = model_config.num_experts_per_tok * 3 * d * model_config.expert_intermediate_size
    dense = 3 * d * model_config.dense_intermediate_size
    return (model_config.num_layers * attention + model_config.num_moe_layers * (d * model_config.num_experts + experts)
            + len(model_config.dense_layers) * dense)


def mfu(tokens_per_s: float | None, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization: tokens/s x FLOPs per token / peak FLOP/s (None where either is unknown)."""
    if not tokens_per_s or not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def random_tokens(seed: int, batch: int, seq: int, vocab_size: int) -> np.ndarray:
    return np.random.default_rng([seed, 1]).integers(0, vocab_size, (batch, seq))


def write_config_checkpoint(name: str, workdir: str, full_size_workdir: str, seed: int) -> str:
    """The checkpoint directory of config `name` (written once; reused while its manifest matches)."""
    if name == "full":
        return full_size.write_checkpoints(full_size_workdir, seed, copies=1)[0]
    directory = os.path.join(workdir, "checkpoints", f"olmoe-{name}-random")
    full_size.write_random_checkpoint(directory, CONFIGS[name], seed)
    return directory


def _timed_calls(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(1 + repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return times, out


def device_info() -> dict:
    """JAX's platform and devices; torch's version and CUDA device (None without torch or CUDA)."""
    import jax

    info = {"jax_version": jax.__version__, "platform": jax.default_backend(), "device_count": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "torch_version": None, "torch_cuda_device": None}
    try:
        import torch
    except ImportError:
        return info
    info["torch_version"] = torch.__version__
    if torch.cuda.is_available():
        info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    return info


def extraction_run(checkpoint: str, batch: int, seq: int, repeats: int, seed: int, dtype: str = "bfloat16",
                   **config_overrides) -> dict:
    """load_hf + `extract_dataset` (routing only, no LM head) on JAX's default device, in this process;
    config_overrides go to load_hf (MoEConfig fields, e.g. moe_impl).

    Returns load / first-call / timed-call seconds, tokens/s of the fastest timed call, FLOPs per token,
    active parameters, weight bytes, peak device bytes (None where the backend keeps no memory stats:
    the CPU) and mean_weights [batch, layers, experts] (numpy)."""
    import jax
    import jax.numpy as jnp

    from moe_grok.extraction.routing import extract_dataset
    from moe_grok.model.dispatch import resolve_moe_impl
    from moe_grok.model.hf import load_hf

    started = time.perf_counter()
    model_config, params = load_hf(checkpoint, dtype=jnp.dtype(dtype), **config_overrides)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - started
    tokens = random_tokens(seed, batch, seq, model_config.vocab_size)
    times, out = _timed_calls(lambda: extract_dataset(model_config, params, tokens, batch_size=batch, with_loss=False,
                                                      progress=False), repeats)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"platform": jax.default_backend(), "device_kind": device.device_kind,
            "moe_impl": resolve_moe_impl(model_config.moe_impl, model_config.expert_layout),
            "expert_layout": model_config.expert_layout, "load_s": load_s, "first_call_s": times[0],
            "call_s": times[1:], "tokens_per_s": tokens.size / min(times[1:]),
            "flops_per_token": model_config.active_flops_per_token(seq), "active_params": active_params(model_config),
            "weight_bytes": sum(leaf.nbytes for leaf in jax.tree.leaves(params)),
            "peak_device_bytes": stats.get("peak_bytes_in_use"), "device_bytes_limit": stats.get("bytes_limit"),
            "mean_weights": out["mean_weights"]}


def hf_run(checkpoint: str, batch: int, seq: int, repeats: int, seed: int, device: str,
           dtype: str = "bfloat16") -> dict:
    """transformers' OlmoeModel (no LM head) forward with router logits on torch `device`, in this process.

    Returns load / first-call / timed-call seconds, tokens/s of the fastest timed call, peak device bytes
    (torch.cuda.max_memory_allocated; None on the CPU) and mean_weights [batch, layers, experts] (numpy)."""
    import torch
    from transformers import OlmoeModel

    cuda = device.startswith("cuda")
    started = time.perf_counter()
    model = OlmoeModel.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).to(device).eval()
    load_s = time.perf_counter() - started
    tokens = torch.as_tensor(random_tokens(seed, batch, seq, model.config.vocab_size), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def forward():
        with torch.no_grad():
            out = model(input_ids=tokens, output_router_logits=True)
        if cuda:
            torch.cuda.synchronize(device)
        return out

    times, out = _timed_calls(forward, repeats)
    probs = torch.stack([torch.softmax(r.float(), -1).reshape(batch, seq, -1) for r in out.router_logits], 2)
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch_version": torch.__version__,
            "load_s": load_s, "first_call_s": times[0], "call_s": times[1:],
            "tokens_per_s": tokens.numel() / min(times[1:]),
            "peak_device_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "mean_weights": probs.mean(1).cpu().numpy()}


def hf_device(device: dict) -> tuple[str | None, str]:
    """(torch device for HF's model, why): the device JAX runs on, or None where torch cannot use it."""
    if device["platform"] == "cpu":
        return "cpu", "JAX runs on the CPU"
    if device["torch_version"] is None:
        return None, "torch is not installed: HF's model not timed"
    if device["platform"] == "gpu" and device["torch_cuda_device"]:
        return "cuda", f"torch {device['torch_version']} on {device['torch_cuda_device']}"
    if device["platform"] == "gpu":
        return None, (f"torch {device['torch_version']} has no CUDA: HF's model not timed (install a CUDA build "
                      "of torch)")
    return None, f"HF's model runs on torch, which has no {device['platform']} device: not timed"


def config_summary(extract: dict | None, hf: dict | None, peak_flops: float | None) -> dict:
    """One config's comparison: tokens/s ratio moe_grok / HF, both sides' MFU and peak device memory (also as
    a multiple of the weight bytes), the largest difference of their mean routing weights."""
    summary = {}
    if extract and "tokens_per_s" in extract:
        flops = extract["flops_per_token"]
        summary["mfu_moe_grok"] = mfu(extract["tokens_per_s"], flops, peak_flops)
        if extract.get("peak_device_bytes"):
            summary["peak_device_x_weights_moe_grok"] = extract["peak_device_bytes"] / extract["weight_bytes"]
        if hf and "tokens_per_s" in hf:
            summary["tokens_per_s_vs_hf"] = extract["tokens_per_s"] / hf["tokens_per_s"]
            summary["mfu_hf"] = mfu(hf["tokens_per_s"], flops, peak_flops)
            if hf.get("peak_device_bytes"):
                summary["peak_device_x_weights_hf"] = hf["peak_device_bytes"] / extract["weight_bytes"]
            diff = np.abs(np.asarray(extract["mean_weights"]) - np.asarray(hf["mean_weights"]))
            summary["mean_weights_max_abs_diff"] = float(diff.max())
    return summary


# ----------------------------------------------------------------------------------------
# The tests stage
# ----------------------------------------------------------------------------------------
def tests_command(selection, test_platform: str, junit_path: str) -> tuple[list[str], dict]:
    """(pytest command, environment): one process (-n 0: xdist workers would each claim the device) on
    the `test_platform` devices (MOE_GROK_TEST_PLATFORM), reporting to a JUnit XML file."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", f"--junitxml={junit_path}",
               *selection]
    env = {**os.environ, "PYTHONPATH": ROOT, "MOE_GROK_TEST_PLATFORM": test_platform,
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # processes the tests start share the device
    return command, env


def junit_counts(xml_text: str) -> dict:
    """passed / failed / errors / skipped counts of a pytest JUnit XML report, the failed tests' ids with
    their messages' first lines, and each skip reason with its count."""
    counts = collections.Counter()
    failed, skips = [], collections.Counter()
    for case in ElementTree.fromstring(xml_text).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[kind] += 1
        message = (outcome.get("message") or "").splitlines()
        if kind == "skipped":
            skips[message[0] if message else ""] += 1
        else:
            failed.append(f"{name}: {message[0] if message else outcome.tag}")
    return {**{k: counts[k] for k in ("passed", "failed", "errors", "skipped")}, "failed_tests": failed,
            "skip_reasons": dict(skips)}


def run_tests(selection, test_platform: str, workdir: str, timeout_s: float) -> dict:
    junit_path = os.path.join(workdir, "tests.xml")
    if os.path.exists(junit_path):
        os.remove(junit_path)
    command, env = tests_command(selection, test_platform, junit_path)
    started = time.perf_counter()
    log_path = os.path.join(workdir, "tests.log")
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                        timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    result = {"command": " ".join(command[1:]), "platform": test_platform, "returncode": returncode,
              "wall_s": time.perf_counter() - started, "log": log_path}
    if os.path.exists(junit_path):
        with open(junit_path) as f:
            result.update(junit_counts(f.read()))
    return result


# ----------------------------------------------------------------------------------------
# Running the stages in processes of their own
# ----------------------------------------------------------------------------------------
def run_child(args) -> None:
    from moe_grok import strict_json

    if args.child == "device":
        result = device_info()
    elif args.child == "extract":
        result = extraction_run(args.checkpoint, args.batch, args.seq, args.repeats, args.seed, args.dtype)
    else:
        result = hf_run(args.checkpoint, args.batch, args.seq, args.repeats, args.seed, args.hf_device, args.dtype)
    if "mean_weights" in result:
        np.save(args.mean_weights_out, result.pop("mean_weights"))
    print("RESULT " + strict_json.dumps(result), flush=True)


def child_stage(stage: str, args, workdir: str, env: dict, **options) -> dict:
    """Run `--child=stage` of this script: its RESULT dict, plus returncode, wall_s and its log; mean_weights
    read back from its .npy file."""
    from moe_grok import strict_json

    tag = "_".join([stage, *(str(v) for k, v in options.items() if k == "config")])
    npy = os.path.join(workdir, f"mean_weights_{tag}.npy")
    command = [sys.executable, os.path.abspath(__file__), f"--child={stage}", f"--batch={args.batch}",
               f"--seq={args.seq}", f"--repeats={args.repeats}", f"--seed={args.seed}", f"--dtype={args.dtype}",
               f"--mean_weights_out={npy}"]
    command += [f"--{k}={v}" for k, v in options.items() if k != "config"]
    log_path = os.path.join(workdir, f"{tag}.log")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                        timeout=args.stage_timeout_s).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    with open(log_path) as f:
        lines = f.read().splitlines()
    line = next((x for x in lines if x.startswith("RESULT ")), None)
    result = strict_json.loads(line[len("RESULT "):]) if line else {"log_tail": lines[-20:]}
    if line and os.path.exists(npy):
        result["mean_weights"] = np.load(npy)
    return {**result, "returncode": returncode, "wall_s": time.perf_counter() - started, "log": log_path}


def report_header(device: dict, args, peak_flops: float | None, peak_source: str, hf_note: str) -> dict:
    """The report's fields other than the stages' results (configs filled in by `config_entry`)."""
    return {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "device": {k: v for k, v in device.items() if k != "log"}, "peak_bf16_flops": peak_flops,
            "peak_source": peak_source, "batch": [args.batch, args.seq], "repeats": args.repeats, "dtype": args.dtype,
            "hf_note": hf_note, "configs": {}}


def config_entry(checkpoint: str, extract: dict, hf: dict | None, peak_flops: float | None) -> dict:
    """One config's part of the report: both sides' results and their `config_summary`."""
    return {"checkpoint": checkpoint, "flops_per_token": extract.get("flops_per_token"),
            "active_params": extract.get("active_params"), "summary": config_summary(extract, hf, peak_flops),
            "extract": extract, "hf": hf}


def _gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def _num(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_report(report: dict) -> None:
    device = report["device"]
    print(f"\ndevice: {device.get('device_kind')} ({device.get('platform')}, {device.get('device_count')} "
          f"device(s)), jax {device.get('jax_version')}, torch {device.get('torch_version')}; peak bf16 "
          f"{_num(report['peak_bf16_flops'] and report['peak_bf16_flops'] / 1e12, '.0f', ' TFLOP/s')} "
          f"({report['peak_source']})")
    tests = report.get("tests")
    if tests:
        print(f"tests on {tests['platform']}: {tests.get('passed', '?')} passed, {tests.get('failed', '?')} failed, "
              f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped ({tests['wall_s']:.0f} s, "
              f"return code {tests['returncode']})")
        for name in tests.get("failed_tests", []):
            print(f"  FAILED {name}")
        for reason, count in tests.get("skip_reasons", {}).items():
            print(f"  skipped x{count}: {reason}")
    batch, seq = report["batch"]
    print(f"\nextraction, {batch} x {seq} tokens, {report['dtype']}, routing only (no LM head), fastest of "
          f"{report['repeats']} timed calls after a compiling / warm-up one; HF: {report['hf_note']}")
    print(f"{'config':<7}{'side':<10}{'ok':>4}{'tokens/s':>12}{'vs HF':>9}{'MFU':>8}{'peak dev GiB':>14}"
          f"{'x weights':>10}{'load s':>8}{'1st call s':>11}")
    for name, entry in report["configs"].items():
        summary = entry["summary"]
        for side, key in (("moe_grok", "extract"), ("HF", "hf")):
            r = entry.get(key)
            if r is None:
                continue
            ok = "yes" if r.get("returncode", 0) == 0 and "tokens_per_s" in r else "NO"
            ratio = _num(summary.get("tokens_per_s_vs_hf"), ".2f", "x") if side == "moe_grok" else ""
            print(f"{name:<7}{side:<10}{ok:>4}{_num(r.get('tokens_per_s'), ',.0f'):>12}{ratio:>9}"
                  f"{_num(summary.get(f'mfu_{side.lower()}'), '.1%'):>8}{_gib(r.get('peak_device_bytes')):>14}"
                  f"{_num(summary.get(f'peak_device_x_weights_{side.lower()}'), '.2f'):>10}"
                  f"{_num(r.get('load_s'), '.1f'):>8}{_num(r.get('first_call_s'), '.1f'):>11}")
        if "mean_weights_max_abs_diff" in summary:
            print(f"{'':<7}mean routing weights, moe_grok vs HF: max |diff| {summary['mean_weights_max_abs_diff']:.1e}")
        if entry.get("flops_per_token"):
            print(f"{'':<7}{entry['active_params'] / 1e6:,.1f} M active parameters, "
                  f"{entry['flops_per_token'] / 1e6:,.1f} MFLOP per token")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="Checkpoints, logs and accelerator.json (default: "
                        "/tmp/moe_grok_accelerator; --smoke: a new temporary directory).")
    parser.add_argument("--full_size", action=argparse.BooleanOptionalAction, default=True,
                        help="Also OLMoE-1B-7B (a 12.9 GiB checkpoint, written once under --full_size_workdir).")
    parser.add_argument("--full_size_workdir", default="/tmp/olmoe_full_size",
                        help="Where full_size.py keeps (or finds) the OLMoE-1B-7B checkpoint.")
    parser.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True, help="Run the tests stage.")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="Time HF's model.")
    parser.add_argument("--batch", type=int, default=16, help="Samples per forward.")
    parser.add_argument("--seq", type=int, default=512, help="Tokens per sample.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls after the first (compiling) one.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and the tokens.")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="Weights and compute.")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The device's peak dense bf16 TFLOP/s, where PEAK_BF16_FLOPS does not know it.")
    parser.add_argument("--stage_timeout_s", type=float, default=600, help="A stage running longer fails.")
    parser.add_argument("--smoke", action="store_true", help="The tiny config on the CPU, one timed call, one "
                        "dispatch test: every stage in < 30 s.")
    parser.add_argument("--child", choices=("device", "extract", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--hf_device", help=argparse.SUPPRESS)
    parser.add_argument("--mean_weights_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.full_size = False
        args.batch, args.seq, args.repeats = 2, 16, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return {}
    from moe_grok import strict_json

    workdir = os.path.abspath(args.workdir or (tempfile.mkdtemp(prefix="moe_grok_accelerator_") if args.smoke
                                               else "/tmp/moe_grok_accelerator"))
    os.makedirs(workdir, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ROOT}
    if args.smoke:
        env["JAX_PLATFORMS"] = "cpu"
    started = time.perf_counter()
    print("stage device ...", flush=True)
    device = child_stage("device", args, workdir, env)
    if "platform" not in device:
        raise SystemExit(f"JAX did not start: see {device['log']}\n" + "\n".join(device.get("log_tail", [])))
    peak_flops, peak_source = peak_bf16_flops(device["device_kind"], args.peak_tflops)
    torch_device, hf_note = hf_device(device) if args.hf else (None, "--no-hf")
    report = report_header(device, args, peak_flops, peak_source, hf_note)
    if args.tests:
        print("stage tests ...", flush=True)
        report["tests"] = run_tests(SMOKE_TESTS if args.smoke else TESTS, device["platform"], workdir,
                                    args.stage_timeout_s)
    names = ["tiny"] if args.smoke else ["small"] + (["full"] if args.full_size else [])
    for name in names:
        checkpoint = write_config_checkpoint(name, workdir, args.full_size_workdir, args.seed)
        print(f"stage extract {name} ...", flush=True)
        extract = child_stage("extract", args, workdir, env, config=name, checkpoint=checkpoint)
        hf = None
        if torch_device:
            print(f"stage hf {name} ...", flush=True)
            hf = child_stage("hf", args, workdir, env, config=name, checkpoint=checkpoint, hf_device=torch_device)
        report["configs"][name] = config_entry(checkpoint, extract, hf, peak_flops)
    report["wall_s"] = time.perf_counter() - started
    print_report(report)
    json_path = os.path.join(workdir, "accelerator.json")
    strict_json.dump(_without_arrays(report), json_path, indent=2)
    print(f"\n{report['wall_s']:.0f} s; wrote {json_path}")
    return report


def _without_arrays(report: dict) -> dict:
    """The report less the mean routing weights (kept in the workdir's .npy files)."""
    if isinstance(report, dict):
        return {k: _without_arrays(v) for k, v in report.items() if k != "mean_weights"}
    return report


if __name__ == "__main__":
    main()
