"""Pathway edit distance throughput: rapidfuzz (CPU, all cores) vs the jitted JAX kernel.

Pathways mimic OLMoE at tau = 0.7: 16 layers, 64 experts, token-mean weights drawn from a
Dirichlet(0.5) so each layer keeps ~13-19 experts (strings of ~700 characters).
Run: python benchmarks/edit_distance.py [--pairs 10000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from moe_grok.metrics import pairwise_distances_jax, pairwise_pathway_distances
from moe_grok.pathways import pathway_expert_lists, pathway_strings


def timed(fn, repeats: int):
    """(result of a warm-up call, median wall seconds of ``repeats`` further calls)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="JAX pairs per batch (default: library's)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(64, 0.5), size=(args.samples, 16))  # [samples, layers, experts]
    pathways = pathway_strings(weights, tau=0.7)
    experts_per_layer = [len(layer) for sample in pathway_expert_lists(weights, 0.7) for layer in sample]
    lengths = np.array([len(p) for p in pathways])
    pairs = rng.integers(0, args.samples, size=(args.pairs, 2))
    print(f"backend: {jax.default_backend()} ({jax.device_count()} device(s))")
    print(
        f"{args.pairs} pairs, experts/layer mean {np.mean(experts_per_layer):.1f} "
        f"[{min(experts_per_layer)}, {max(experts_per_layer)}], "
        f"string length mean {lengths.mean():.0f} [{lengths.min()}, {lengths.max()}]"
    )

    cpu, rapidfuzz_s = timed(lambda: pairwise_pathway_distances(pathways, pairs=pairs), args.repeats)
    on_jax, jax_s = timed(lambda: pairwise_distances_jax(pathways, pairs, batch_size=args.batch_size), args.repeats)
    print(f"agree exactly: {bool(np.array_equal(cpu, on_jax))}; mean distance {cpu.mean():.1f}")

    print(f"rapidfuzz (cpdist, workers=-1): {args.pairs / rapidfuzz_s:10,.0f} pairs/s  (median of {args.repeats})")
    print(f"JAX pairwise_distances_jax:     {args.pairs / jax_s:10,.0f} pairs/s  (median of {args.repeats})")
    print(f"rapidfuzz / JAX speed ratio: {jax_s / rapidfuzz_s:.1f}x")


if __name__ == "__main__":
    main()
