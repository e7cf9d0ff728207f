"""Test setup: 8 simulated CPU devices so mesh-sharded code paths run in every test session, and one
persistent compilation cache per test session, shared by its processes (xdist workers inherit the
controller's environment, as do the processes the tests start), so a program compiled in one is read
by the others.

MOE_GROK_TEST_PLATFORM=gpu (or tpu, cuda, ...: a JAX_PLATFORMS value) runs the tests on that platform's
real devices instead (benchmarks/accelerator.py runs the backend-dependent tests so; tests/mesh_devices.py fits
the mesh tests to the devices there are). Unset, the tests run on the CPU as always."""
import importlib.metadata
import os
import re
import tempfile


def _jaxlib_at_least(*version: int) -> bool:
    """Whether the installed jaxlib is at least `version` (read from its metadata: jax is not imported yet)."""
    try:
        installed = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in re.findall(r"\d+", installed)[:len(version)]) >= version


os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
if os.environ.get("MOE_GROK_TEST_PLATFORM"):
    os.environ["JAX_PLATFORMS"] = os.environ["MOE_GROK_TEST_PLATFORM"]
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The tests' tiny programs spend more time compiling than running: LLVM without its optimization passes
    # compiles them faster (the CPU time of test_training + test_protocol fell from 128 to 102 s, 2026-12-07).
    # Code generation only (the HLO is the same), but it can round differently (e.g. fused multiply-adds): a test
    # that compares with a run in another process passes these flags on (test_multiprocess does).
    if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    # XLA's LLVM IR fusion emitters compile these programs in about 40% less CPU time than its MLIR fusion
    # emitters (a set of typical test programs: 12.3-13.1 -> 7.3-7.5 CPU s, jaxlib 0.10.2, 2026-12-07); the same
    # HLO. Only on the jaxlib measured and later: XLA aborts on a flag it does not know.
    if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"] and _jaxlib_at_least(0, 10):
        os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # an environment variable reaches spawned processes
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller's, inherited by the workers
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="moe_grok_tests_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402  (must come after XLA_FLAGS is set)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh8():
    """A 1-D data-parallel mesh over the 8 simulated CPU devices."""
    devices = np.array(jax.devices()[:8])
    return jax.sharding.Mesh(devices, ("data",))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The files whose tests take longest (each file's CPU seconds alone, `pytest -n 0`, 2-core Intel Xeon, 2026-12-07;
# test_multiprocess waits on its processes beyond its CPU time), scheduled first: `--dist loadfile` deals whole files
# to the workers in collection order, so a long file dealt last would run alone at the end while the other worker
# idles. Other files keep their alphabetical order after these.
LONGEST_FILES_FIRST = ("test_model.py", "test_training.py", "test_protocol.py", "test_multiprocess.py",
                       "test_qwen3_moe.py", "test_olmoe_pipeline.py", "test_expert_parallel.py", "test_theory.py",
                       "test_atomic_writes.py", "test_cache.py", "test_monitor.py", "test_multiseed.py",
                       "test_analysis.py", "test_extraction.py", "test_monitor_examples.py",
                       "test_checkpoint_errors.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
