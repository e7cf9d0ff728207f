"""Timing shared by the benchmarks (imported as a sibling module: `python benchmarks/<script>.py`)."""
from __future__ import annotations

import time

import numpy as np


def interleaved_times(fns: dict, rounds: int, settle_s: float = 1.0) -> dict[str, np.ndarray]:
    """Seconds of each fn in each of `rounds` rounds that call every fn once, in turn.

    Each call is followed by an untimed pause: torch's OpenMP workers spin-wait for a while
    after a call, and without the pause they steal the cores from the next (JAX) call.
    """
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            time.sleep(settle_s)
    return {name: np.asarray(t) for name, t in times.items()}
