"""The devices the tests run on: the 8 simulated CPU devices of the CPU suite (conftest), or a real
accelerator's when MOE_GROK_TEST_PLATFORM names one (benchmarks/accelerator.py runs the tests whose code
path differs by backend so).

The mesh tests are written for 8 devices and keep their meshes wherever the devices allow, so the CPU
suite runs exactly them; on fewer real devices `fit_mesh` cuts a mesh down to what there is (one GPU:
1 x 1, still through the shard_map dispatch), and `needs_devices` skips a test whose point needs more,
naming the count.
"""
import jax
import pytest

DEVICES = jax.device_count()
PLATFORM = jax.default_backend()


def fit_mesh(data: int, expert: int) -> tuple[int, int]:
    """(data, expert) where DEVICES allow it; else expert = the largest power of two <= expert that divides
    DEVICES and data = min(data, DEVICES // expert)."""
    if data * expert <= DEVICES:
        return data, expert
    fitted = 1
    while fitted * 2 <= expert and DEVICES % (fitted * 2) == 0:
        fitted *= 2
    return max(1, min(data, DEVICES // fitted)), fitted


def needs_devices(count: int):
    """Skip the test where fewer than `count` devices exist (a real accelerator with fewer than the CPU suite's 8)."""
    return pytest.mark.skipif(count > DEVICES, reason=f"needs {count} devices; the {PLATFORM} platform has {DEVICES}")
