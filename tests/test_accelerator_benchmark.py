"""benchmarks/accelerator.py on the CPU, tiny: its stages' functions in this process (its `--smoke` command
runs the same functions in processes of its own), the report it prints and writes, and the test selection
it hands to pytest on an accelerator."""
import ast
import importlib
import os
import sys

import jax
import pytest

from moe_grok import strict_json
from moe_grok.config import olmoe_1b_7b

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the benchmarks import their siblings (full_size)
accelerator = importlib.import_module("accelerator")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The --smoke run's extraction and HF stages on the tiny checkpoint, and its report (peak 1 TFLOP/s). The
    dispatch kernels are the dispatch tests' concern: here the dense one, the fastest to compile."""
    workdir = str(tmp_path_factory.mktemp("accelerator"))
    args = accelerator.parse_args(["--smoke", "--peak_tflops=1", f"--workdir={workdir}"])
    checkpoint = accelerator.write_config_checkpoint("tiny", workdir, workdir, args.seed)
    run = dict(checkpoint=checkpoint, batch=args.batch, seq=args.seq, repeats=args.repeats, seed=args.seed)
    extract = accelerator.extraction_run(**run, moe_impl="dense")  # compiles in a third of the chunked kernel's time
    hf = accelerator.hf_run(**run, device="cpu")
    device = accelerator.device_info()
    peak, source = accelerator.peak_bf16_flops(device["device_kind"], args.peak_tflops)
    report = accelerator.report_header(device, args, peak, source, accelerator.hf_device(device)[1])
    report["configs"]["tiny"] = accelerator.config_entry(checkpoint, extract, hf, peak)
    return workdir, report


def test_smoke_run_times_both_sides_on_the_same_weights(smoke):
    _, report = smoke
    entry = report["configs"]["tiny"]
    extract, hf, summary = entry["extract"], entry["hf"], entry["summary"]
    assert extract["platform"] == jax.default_backend() and extract["moe_impl"] == "dense"
    assert extract["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0
    assert summary["tokens_per_s_vs_hf"] == pytest.approx(extract["tokens_per_s"] / hf["tokens_per_s"])
    # The same checkpoint and tokens on both sides: the same routing, up to bfloat16 rounding.
    assert extract["mean_weights"].shape == hf["mean_weights"].shape == (2, 2, 8)
    assert summary["mean_weights_max_abs_diff"] < 1e-2
    # MFU = tokens/s x FLOPs per token / peak.
    assert report["peak_bf16_flops"] == 1e12 and report["peak_source"] == "--peak_tflops"
    assert summary["mfu_moe_grok"] == pytest.approx(extract["tokens_per_s"] * entry["flops_per_token"] / 1e12)
    assert summary["mfu_hf"] == pytest.approx(hf["tokens_per_s"] * entry["flops_per_token"] / 1e12)
    if extract["platform"] == "cpu":  # the CPU keeps no device memory statistics: "n/a"
        assert extract["peak_device_bytes"] is None and hf["peak_device_bytes"] is None
        assert "peak_device_x_weights_moe_grok" not in summary


def test_report_prints_a_table_and_writes_strict_json(smoke, capsys):
    workdir, report = smoke
    accelerator.print_report(report)
    table = capsys.readouterr().out
    assert "tiny   moe_grok   yes" in table and "tiny   HF         yes" in table
    assert "n/a" in table and "max |diff|" in table
    path = os.path.join(workdir, "accelerator.json")
    strict_json.dump(accelerator._without_arrays(report), path)
    written = strict_json.load(path)
    assert "mean_weights" not in written["configs"]["tiny"]["extract"]
    assert written["configs"]["tiny"]["extract"]["peak_device_bytes"] is None
    assert written["configs"]["tiny"]["summary"]["tokens_per_s_vs_hf"] > 0


def test_active_parameters_are_what_the_flop_count_multiplies_with():
    config = olmoe_1b_7b()
    seq = 512
    scores = config.num_layers * 2 * 2 * config.num_heads * config.head_dim * (seq + 1) / 2
    assert 2 * accelerator.active_params(config) + scores == config.active_flops_per_token(seq)
    assert accelerator.active_params(config) == 1_075_838_976  # the module docstring's 1.076 G
    assert config.active_flops_per_token(seq) / 1e9 == pytest.approx(2.19, abs=0.005)


def test_peak_flops_by_device_kind():
    assert accelerator.peak_bf16_flops("NVIDIA H100 80GB HBM3") == (989.4e12, "table: H100")
    assert accelerator.peak_bf16_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert accelerator.peak_bf16_flops("NVIDIA L40S")[0] == 362e12  # not L4's
    assert accelerator.peak_bf16_flops("TPU v5 lite")[0] == 197e12
    assert accelerator.peak_bf16_flops("TPU v5")[0] == 459e12
    assert accelerator.peak_bf16_flops("cpu")[0] is None
    assert accelerator.peak_bf16_flops("cpu", peak_tflops=2.0) == (2e12, "--peak_tflops")
    assert accelerator.mfu(100.0, 1e9, None) is None


def test_hf_runs_on_the_device_jax_runs_on():
    base = {"platform": "gpu", "torch_version": "2.13.0", "torch_cuda_device": "NVIDIA H100 80GB HBM3"}
    assert accelerator.hf_device(base)[0] == "cuda"
    assert accelerator.hf_device({**base, "platform": "cpu"})[0] == "cpu"
    device, why = accelerator.hf_device({**base, "torch_cuda_device": None})
    assert device is None and "no CUDA" in why
    assert accelerator.hf_device({**base, "platform": "tpu"})[0] is None


def test_the_tests_stage_selects_existing_tests_on_the_accelerator():
    for node in (*accelerator.TESTS, *accelerator.SMOKE_TESTS):
        path, _, name = node.partition("::")
        assert os.path.exists(os.path.join(ROOT, path)), node
        if name:
            with open(os.path.join(ROOT, path)) as f:
                functions = {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
            assert name.split("[")[0] in functions, node
    command, env = accelerator.tests_command(accelerator.TESTS, "gpu", "/tmp/tests.xml")
    assert env["MOE_GROK_TEST_PLATFORM"] == "gpu" and command[command.index("-n") + 1] == "0"
    assert command[-len(accelerator.TESTS):] == list(accelerator.TESTS)


def test_junit_report_counts():
    xml = """<testsuites><testsuite>
      <testcase classname="tests.test_model" name="test_a"/>
      <testcase classname="tests.test_model" name="test_b"><failure message="AssertionError: off&#10;more"/></testcase>
      <testcase classname="tests.test_expert_parallel" name="test_c"><skipped message="needs 8 devices"/></testcase>
      <testcase classname="tests.test_expert_parallel" name="test_d"><skipped message="needs 8 devices"/></testcase>
      <testcase classname="tests.test_parity" name="test_e"><error message="fixture broke"/></testcase>
    </testsuite></testsuites>"""
    counts = accelerator.junit_counts(xml)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped")} == {
        "passed": 1, "failed": 1, "errors": 1, "skipped": 2}
    assert counts["failed_tests"] == ["tests.test_model::test_b: AssertionError: off",
                                      "tests.test_parity::test_e: fixture broke"]
    assert counts["skip_reasons"] == {"needs 8 devices": 2}


def test_without_the_platform_variable_the_suite_runs_on_8_simulated_cpu_devices():
    if os.environ.get("MOE_GROK_TEST_PLATFORM"):
        pytest.skip("MOE_GROK_TEST_PLATFORM is set: the suite runs on its devices")
    assert os.environ["JAX_PLATFORMS"] == "cpu" and jax.default_backend() == "cpu" and jax.device_count() == 8
