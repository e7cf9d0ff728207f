"""The metric engine of one analysis: every registered metric of a set of samples, at every checkpoint.

Distances, consistencies and pathways are cached: the same set recurs (the primary distance is
also a variant; the sweeps' centre is the memorized set), so each (set, checkpoint, form) is
measured once.
"""
from __future__ import annotations

import numpy as np

from moe_grok.analysis import metrics, registry
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.analysis.options import POSITIONS, AnalysisOptions
from moe_grok.analysis.pathway_cache import PathwayCache

Rows = np.ndarray | list  # sample rows [n] int, the same at every checkpoint, or a list of one [n_c] per checkpoint


def rows_at(rows: Rows, checkpoint: int) -> np.ndarray:
    """The sample rows of a set at a checkpoint (a per-checkpoint list, or the same rows everywhere)."""
    return np.asarray(rows[checkpoint] if isinstance(rows, list) else rows, np.int64)


class SetMetrics:
    """Metric curves of sample sets of the splits of `stats` (per-checkpoint statistics sorted by step)."""

    def __init__(self, stats: list[CheckpointStats], options: AnalysisOptions, positions: str,
                 answers: dict[str, np.ndarray] | None = None):
        """answers: {split: [N] int answer label of every sample} (registry.REQUIREMENTS "answers"; None:
        the metrics that need them are left out)."""
        self.stats, self.options = stats, options
        self.answers = dict(answers or {})
        self.steps = np.array([s.step for s in stats])
        weights_field, self.entropy_field = POSITIONS[positions]
        self.paths = PathwayCache(stats, weights_field)
        self.router = [s.router for s in stats]
        self._consistency: dict = {}
        self._distances: dict = {}

    def distance(self, split: str, rows: np.ndarray, checkpoint: int, level: str, normalized: bool,
                 tau: float | None = None) -> float:
        """Mean pairwise pathway edit distance of the samples `rows` of `split` at a checkpoint
        (characters or experts; a fraction when normalized); NaN with fewer than 2 samples."""
        tau = self.options.tau if tau is None else tau
        key = (split, checkpoint, level, normalized, tau, np.asarray(rows, np.int64).tobytes())
        if key not in self._distances:
            source = self.paths.strings if level == "char" else self.paths.tokens
            every = source(split, checkpoint, tau)
            self._distances[key] = metrics.group_pathway_distance(
                [every[i] for i in np.asarray(rows).tolist()], level, normalized, self.options.max_pairs,
                self.options.seed, on_small="nan")
        return self._distances[key]

    def has(self, requirement: str | None) -> bool:
        """Whether this engine holds the input a metric `requires` (None: nothing beyond pathways)."""
        return requirement is None or (requirement == "answers" and bool(self.answers))

    def answer_aligned(self, split: str, rows: np.ndarray, checkpoint: int, level: str, normalized: bool) -> float:
        """metrics.answer_aligned_distance of the samples `rows` of `split` at a checkpoint, their answer
        labels from `answers` (the random-pair mean is the set's cached `distance`); NaN with fewer than
        2 samples or no two sharing an answer."""
        rows = np.asarray(rows, np.int64)
        if rows.size < 2:
            return np.nan
        source = self.paths.strings if level == "char" else self.paths.tokens
        every = source(split, checkpoint, self.options.tau)
        same = metrics.same_answer_distance([every[i] for i in rows.tolist()], self.answers[split][rows], level,
                                            normalized, self.options.max_pairs, self.options.seed)
        return same - self.distance(split, rows, checkpoint, level, normalized)

    def consistency_all(self, split: str, checkpoint: int) -> tuple[np.ndarray, np.ndarray]:
        """(consistency [N], unbounded flag [N] bool) of every sample of a split at a checkpoint."""
        key = (split, checkpoint)
        if key not in self._consistency:
            weights = self.paths.weights(split, checkpoint)
            if weights.shape[1] < 2:
                self._consistency[key] = (np.full(len(weights), np.nan), np.zeros(len(weights), bool))
            else:
                router = self.router[checkpoint]
                consistency = np.asarray(metrics.pathway_consistency(weights, router), np.float64)
                self._consistency[key] = (consistency, metrics.consistency_edge_cases(weights, router)["unbounded"])
        return self._consistency[key]

    def routing_entropy(self, split: str, checkpoint: int) -> np.ndarray:
        """[N, L] routing entropy (nats) of every sample of a split at a checkpoint, per layer."""
        return self.stats[checkpoint].splits[split][self.entropy_field]

    def set_curves(self, split: str, rows: Rows, scope: str) -> dict[str, np.ndarray]:
        """Every registered metric measured in `scope` (registry.SCOPES) of the samples `rows` of
        `split` -> {metric name: [checkpoints] float64}, in registration order. rows: the same [n]
        rows at every checkpoint, or a list of per-checkpoint rows (a growing set), whose every
        metric is NaN at a checkpoint where it holds fewer than 2 samples. Metrics whose input this
        engine lacks (`has`) are left out."""
        per_checkpoint = isinstance(rows, list)

        def value(metric, c: int) -> float:
            r = rows_at(rows, c)
            return np.nan if per_checkpoint and r.size < 2 else metric.compute(self, split, r, c)

        return {metric.name: np.asarray([value(metric, c) for c in range(len(self.stats))], np.float64)
                for metric in registry.metrics(scope) if self.has(metric.requires)}

    def cross_distance(self, split_a: str, rows_a: np.ndarray, split_b: str, rows_b: np.ndarray) -> np.ndarray:
        """[checkpoints] mean primary distance over pairs (a in rows_a, b in rows_b)."""
        o = self.options
        out = []
        for c in range(len(self.stats)):
            source = self.paths.strings if o.distance_level == "char" else self.paths.tokens
            a, b = source(split_a, c, o.tau), source(split_b, c, o.tau)
            out.append(metrics.cross_group_distance([a[i] for i in rows_a.tolist()], [b[i] for i in rows_b.tolist()],
                                                    o.distance_level, o.distance_normalized, o.max_pairs, o.seed,
                                                    on_small="nan"))
        return np.asarray(out)

    def per_layer_distance(self, split: str, rows: Rows) -> np.ndarray:
        """[checkpoints, layers] mean pairwise distance (characters) of the single-layer pathway strings (Fig. 5)."""
        o = self.options
        num_layers = self.paths.weights(split, 0).shape[1]
        out = np.full((len(self.stats), num_layers), np.nan)
        for c in range(len(self.stats)):
            for layer in range(num_layers):
                strings = self.paths.layer_strings(split, c, o.tau, layer)
                out[c, layer] = metrics.group_pathway_distance([strings[i] for i in rows_at(rows, c).tolist()], "char",
                                                               o.distance_normalized, o.max_pairs, o.seed,
                                                               on_small="nan")
        return out


def control_rows(pool: np.ndarray, size: int, seed: int, salt: str) -> np.ndarray:
    """A random subset of `pool` (sample rows) of `size` samples, sorted (all of them if fewer),
    seeded by `seed` and the control's name `salt` so that every control draws its own samples."""
    if pool.size <= size:
        return np.sort(pool)
    rng = np.random.default_rng([seed, *map(ord, salt)])
    return np.sort(rng.choice(pool, size, replace=False))


def nested_control_rows(pool: np.ndarray, sizes: list[int], seed: int, salt: str) -> list[np.ndarray]:
    """Per checkpoint, a random subset of `pool` of sizes[c] samples (all of them if fewer), sorted;
    nested: each is the first sizes[c] of one seeded permutation (seed and `salt` as control_rows)."""
    order = np.random.default_rng([seed, *map(ord, salt)]).permutation(pool)
    return [np.sort(order[:min(size, pool.size)]) for size in sizes]


def memorized_set_and_controls(domain: str, train_split: str, memorized: Rows, not_memorized: np.ndarray,
                               held_out_split: str | None, held_out_pool: np.ndarray, seed: int
                               ) -> dict[str, tuple[str, Rows]]:
    """A domain's memorized set and its controls: {"memorized": (train_split, memorized rows),
    "held_out": (held_out_split, rows) when `held_out_pool` (the domain's held-out rows) is not
    empty, "random_train": (train_split, rows drawn from `not_memorized`)}. A fixed set's controls
    have its size (at least 2, so that distances are defined), drawn by `control_rows`; a growing
    set's (a per-checkpoint list) have its size at every checkpoint (`nested_control_rows`)."""
    sets: dict[str, tuple[str, Rows]] = {"memorized": (train_split, memorized)}
    pools = {"held_out": (held_out_split, held_out_pool)} if held_out_pool.size else {}
    pools["random_train"] = (train_split, not_memorized)
    for name, (split, pool) in pools.items():
        if isinstance(memorized, list):
            sizes = [int(np.asarray(r).size) for r in memorized]
            sets[name] = (split, nested_control_rows(pool, sizes, seed, f"{name}/{domain}"))
        else:
            sets[name] = (split, control_rows(pool, max(memorized.size, 2), seed, f"{name}/{domain}"))
    return sets
