"""Group pathway distances as the analysis measures them: rapidfuzz in the calling thread vs on all cores, one run.

  python benchmarks/group_distances.py                  # 8 analyses in threads, as the toy protocol runs them
  python benchmarks/group_distances.py --threads=1      # one analysis alone

The analysis measures every sample set (Pretrain@t* groups, their controls) at every checkpoint:
thousands of `group_pathway_distance` calls of at most `max_pairs` pairs each, one seed's analysis
per thread. The reference is the previous form of that call: rapidfuzz on all cores
(`workers=-1`, which starts a thread pool per call) and the sampled pairs drawn again on every
call. The current form (`metrics.group_pathway_distance`) runs calls below
`metrics.PARALLEL_MIN_DISTANCES` distances in the calling thread and keeps each (size, seed)'s
sampled pairs. Both are checked equal on every call, then timed in interleaved rounds; prints the
medians and their ratio. Workload per thread: `--samples` pathway strings per checkpoint from
Dirichlet(`--concentration`) router weights (4 layers, 8 experts, tau 0.7, seed = thread), and
`--groups` nested sample sets of 5 .. `--samples` samples measured at each of `--checkpoints`.
"""
from __future__ import annotations

import concurrent.futures

import numpy as np
from absl import app, flags
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from timing import interleaved_times

_THREADS = flags.DEFINE_integer("threads", 8, "Analyses run at once, one thread each (the protocol runs 8).")
_SAMPLES = flags.DEFINE_integer("samples", 4000, "Samples of the split.")
_CHECKPOINTS = flags.DEFINE_integer("checkpoints", 10, "Checkpoints each set is measured at.")
_GROUPS = flags.DEFINE_integer("groups", 30, "Sample sets, sizes spaced logarithmically from 5 to --samples.")
_MAX_PAIRS = flags.DEFINE_integer("max_pairs", 2000, "Sampled pairs per distance (the analysis' default).")
_CONCENTRATION = flags.DEFINE_float("concentration", 0.3, "Dirichlet concentration of the router weights.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")


def _reference_distance(pathways: list[str], max_pairs: int, seed: int) -> float:
    """group_pathway_distance before this change: all cores per call, pairs drawn per call."""
    from moe_grok.analysis import metrics

    count = len(pathways)
    total_pairs = count * (count - 1) // 2
    if total_pairs <= max_pairs:
        matrix = process.cdist(pathways, pathways, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        return float(matrix.sum(dtype=np.float64) / (count * (count - 1)))
    condensed = np.random.default_rng(seed).choice(total_pairs, size=max_pairs, replace=False)
    pairs = metrics.unordered_pairs(count, condensed)
    distances = process.cpdist([pathways[i] for i in pairs[:, 0]], [pathways[j] for j in pairs[:, 1]],
                               scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
    return float(distances.mean(dtype=np.float64))


def _workload(seed: int) -> tuple[list[list[str]], list[np.ndarray]]:
    """(pathway strings per checkpoint, sample sets) of one analysis."""
    from moe_grok.analysis import pathways

    rng = np.random.default_rng(seed)
    strings = []
    for _ in range(_CHECKPOINTS.value):
        weights = rng.dirichlet(np.full(8, _CONCENTRATION.value), size=(_SAMPLES.value, 4))
        strings.append(pathways.strings_of(pathways.layer_pathways(weights, 0.7)))
    order = rng.permutation(_SAMPLES.value)
    sizes = np.unique(np.geomspace(5, _SAMPLES.value, _GROUPS.value).astype(int))
    return strings, [np.sort(order[:size]) for size in sizes]


def main(argv):
    del argv
    from moe_grok.analysis import metrics

    max_pairs = _MAX_PAIRS.value
    workloads = [_workload(seed) for seed in range(_THREADS.value)]

    def analysis(distance, workload) -> list[float]:
        strings, sets = workload
        return [distance([every[i] for i in rows.tolist()], max_pairs, 0) for every in strings for rows in sets]

    def current(pathways, max_pairs, seed):
        return metrics.group_pathway_distance(pathways, max_pairs=max_pairs, seed=seed)

    pool = concurrent.futures.ThreadPoolExecutor(_THREADS.value)

    def all_analyses(distance):
        return list(pool.map(lambda workload: analysis(distance, workload), workloads))

    if all_analyses(_reference_distance) != all_analyses(current):
        raise SystemExit("the two forms disagree")
    times = interleaved_times({"reference": lambda: all_analyses(_reference_distance),
                               "current": lambda: all_analyses(current)}, _ROUNDS.value, settle_s=0.1)
    median = {name: float(np.median(t)) for name, t in times.items()}
    calls = _THREADS.value * _CHECKPOINTS.value * len(workloads[0][1])
    print(f"{_THREADS.value} analyses in threads, {calls} group distances per round ({_SAMPLES.value} samples, "
          f"{_CHECKPOINTS.value} checkpoints, {len(workloads[0][1])} sets, max_pairs {max_pairs}), "
          f"{_ROUNDS.value} rounds")
    for name, seconds in median.items():
        print(f"  {name:10s} median {seconds * 1e3:8.1f} ms")
    print(f"  reference / current: {median['reference'] / median['current']:.2f}x")
    pool.shutdown()


if __name__ == "__main__":
    app.run(main)
