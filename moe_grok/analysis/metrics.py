"""The two pathway metrics (docs/method.md).

Metric 1, pathway distance: Levenshtein edit distance between pathways (rapidfuzz), at
``level="char"`` on pathway strings (paper default, see ``pathways.pathway_strings``) or at
``level="token"`` on token tuples (one symbol per expert id, layer boundaries kept, see
``pathways.pathway_tokens``). ``normalized=True`` divides by the longer length (0 for two
empty pathways).

Metric 2, pathway complexity / consistency of one sample from its token-mean router weights
and the router weight matrices.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from moe_grok.sharding import replicate, round_up_to_data_axis, shard_batch

Level = Literal["char", "token"]
OnSmall = Literal["raise", "nan"]
Pathway = str | Sequence[int]

# rapidfuzz starts a thread pool on every call with workers != 1. The analysis' distances come in
# calls of at most a few thousand pairs, many seeds' analyses run in threads at once, and below
# this many distances per call the pool costs more than it gains (benchmarks/group_distances.py).
PARALLEL_MIN_DISTANCES = 100_000


def _workers(distances: int) -> int:
    """rapidfuzz's `workers` for a call computing `distances` distances: 1 (this thread) or -1 (all cores)."""
    return -1 if distances >= PARALLEL_MIN_DISTANCES else 1

# ---------------------------------------------------------------------------------------
# Metric 1: pathway distance
# ---------------------------------------------------------------------------------------


def _check_pathways(pathways: Sequence[Pathway], level: Level) -> list[Pathway]:
    if level not in ("char", "token"):
        raise ValueError(f"level must be 'char' or 'token', got {level!r}")
    pathways = list(pathways)
    is_str = list(map(isinstance, pathways, itertools.repeat(str)))  # one C-level pass: called per group
    if level == "char" and not all(is_str):
        index = is_str.index(False)
        raise ValueError(
            f"level='char' needs str pathways (pathway_strings); item {index} is "
            f"{type(pathways[index]).__name__}"
        )
    if level == "token" and any(is_str):
        raise ValueError(
            f"level='token' needs integer token sequences (pathway_tokens); item {is_str.index(True)} is str"
        )
    return pathways


def _check_pairs(pairs, num_pathways: int) -> np.ndarray:
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.size == 0:
        pairs = pairs.reshape(0, 2)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be an index array [m, 2], got shape {pairs.shape}")
    if pairs.size and (pairs.min() < 0 or pairs.max() >= num_pathways):
        raise ValueError(f"pair indices must lie in [0, {num_pathways}), got [{pairs.min()}, {pairs.max()}]")
    return pairs


def _scorer_and_dtype(normalized: bool):
    if normalized:
        return Levenshtein.normalized_distance, np.float64
    return Levenshtein.distance, np.int32


def pairwise_pathway_distances(
    pathways: Sequence[Pathway],
    level: Level = "char",
    normalized: bool = False,
    pairs=None,
) -> np.ndarray:
    """Levenshtein distances between pathways (rapidfuzz, all CPU cores).

    pairs: None -> the full symmetric ``[n, n]`` matrix; an int array ``[m, 2]`` of index
    pairs -> ``[m]`` distances of those pairs.
    Returns int32 edit counts, or float64 in [0, 1] when ``normalized``.
    """
    pathways = _check_pathways(pathways, level)
    scorer, dtype = _scorer_and_dtype(normalized)
    if pairs is None:
        return process.cdist(pathways, pathways, scorer=scorer, dtype=dtype, workers=_workers(len(pathways) ** 2))
    pairs = _check_pairs(pairs, len(pathways))
    if not len(pairs):
        return np.zeros(0, dtype)
    return _pair_distances(pathways, pathways, pairs[:, 0].tolist(), pairs[:, 1].tolist(), normalized)


def _pair_distances(group_a: list[Pathway], group_b: list[Pathway], first: Sequence[int], second: Sequence[int],
                    normalized: bool) -> np.ndarray:
    """``[m]`` distances of the pairs (group_a[first[k]], group_b[second[k]])."""
    scorer, dtype = _scorer_and_dtype(normalized)
    return process.cpdist([group_a[i] for i in first], [group_b[j] for j in second], scorer=scorer, dtype=dtype,
                          workers=_workers(len(first)))


def _check_max_pairs(max_pairs: int | None) -> None:
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs}")


def _too_small(message: str, on_small: OnSmall) -> float:
    if on_small == "nan":
        return float("nan")
    if on_small == "raise":
        raise ValueError(message)
    raise ValueError(f"on_small must be 'raise' or 'nan', got {on_small!r}")


def unordered_pairs(num_pathways: int, condensed: np.ndarray) -> np.ndarray:
    """Condensed indices over i<j pairs (order (0,1), (0,2), ..., (1,2), ...) -> ``[m, 2]``."""
    rows = np.arange(num_pathways, dtype=np.int64)
    row_starts = rows * (2 * num_pathways - rows - 1) // 2
    first = np.searchsorted(row_starts, condensed, side="right") - 1
    second = condensed - row_starts[first] + first + 1
    return np.stack([first, second], axis=1)


def group_pathway_distance(
    pathways: Sequence[Pathway],
    level: Level = "char",
    normalized: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
    on_small: OnSmall = "raise",
) -> float:
    """Mean pathway distance over all unordered pairs i<j of one group (metric 1).

    max_pairs: if set and the group has more pairs, the mean over a uniform random subset of
    ``max_pairs`` distinct pairs drawn with ``seed``.
    on_small: a group with fewer than 2 pathways raises ValueError ("raise") or gives NaN ("nan").
    """
    _check_max_pairs(max_pairs)
    pathways = _check_pathways(pathways, level)
    count = len(pathways)
    if count < 2:
        return _too_small(f"group pathway distance needs >= 2 pathways, got {count}", on_small)
    total_pairs = count * (count - 1) // 2
    if max_pairs is None or total_pairs <= max_pairs:
        matrix = pairwise_pathway_distances(pathways, level, normalized)
        return float(matrix.sum(dtype=np.float64) / (count * (count - 1)))  # zero diagonal
    first, second = _sampled_pairs(count, max_pairs, seed)
    return float(_pair_distances(pathways, pathways, first, second, normalized).mean(dtype=np.float64))


@functools.lru_cache(maxsize=1024)
def _sampled_pairs(count: int, max_pairs: int, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ``max_pairs`` distinct pairs i<j of ``count`` pathways drawn with ``seed``, as (firsts, seconds).

    A pure function of its arguments, kept because the analysis measures the same group (same
    size, same seed) at every checkpoint."""
    condensed = np.random.default_rng(seed).choice(count * (count - 1) // 2, size=max_pairs, replace=False)
    pairs = unordered_pairs(count, condensed)
    return tuple(pairs[:, 0].tolist()), tuple(pairs[:, 1].tolist())


def same_label_pairs(labels: np.ndarray) -> np.ndarray:
    """``[m, 2]`` every unordered index pair i < j with labels[i] == labels[j] (labels: [n] ints),
    grouped by label in ascending label order."""
    labels = np.asarray(labels)
    pairs = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        if len(members) >= 2:
            pairs.append(members[np.stack(np.triu_indices(len(members), 1), axis=1)])
    return np.concatenate(pairs).astype(np.int64) if pairs else np.zeros((0, 2), np.int64)


def same_answer_distance(
    pathways: Sequence[Pathway],
    answers: np.ndarray,
    level: Level = "char",
    normalized: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
) -> float:
    """Mean pathway distance over the unordered pairs of samples that share their answer (answers: [n]
    labels); at most ``max_pairs`` of them, drawn with ``seed``. NaN when no two samples share an answer."""
    _check_max_pairs(max_pairs)
    answers = np.asarray(answers)
    if answers.shape != (len(pathways),):
        raise ValueError(f"answers must be [{len(pathways)}], got shape {answers.shape}")
    same = same_label_pairs(answers)
    if not len(same):
        return float("nan")
    if max_pairs is not None and len(same) > max_pairs:
        same = same[np.sort(np.random.default_rng(seed).choice(len(same), size=max_pairs, replace=False))]
    return float(pairwise_pathway_distances(pathways, level, normalized, pairs=same).mean(dtype=np.float64))


def answer_aligned_distance(
    pathways: Sequence[Pathway],
    answers: np.ndarray,
    level: Level = "char",
    normalized: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
) -> float:
    """Answer-aligned routing (round 4's exploratory metric, docs/method.md): `same_answer_distance` minus
    the mean over all pairs of the group (random pairs, `group_pathway_distance`; each mean over at most
    ``max_pairs`` pairs drawn with ``seed``). Negative when samples with the same answer route alike.
    answers: [n] the samples' answer labels (e.g. the scored target token). NaN when no two samples
    share an answer. Unit: that of the distance form (edit operations, or a fraction when normalized)."""
    same = same_answer_distance(pathways, answers, level, normalized, max_pairs, seed)
    if np.isnan(same):
        return same
    return same - group_pathway_distance(pathways, level, normalized, max_pairs, seed, on_small="nan")


def cross_group_distance(
    group_a: Sequence[Pathway],
    group_b: Sequence[Pathway],
    level: Level = "char",
    normalized: bool = False,
    max_pairs: int | None = None,
    seed: int = 0,
    on_small: OnSmall = "raise",
) -> float:
    """Mean distance over all pairs (a_i, b_j) (the paper's math-vs-code control).

    max_pairs / seed: as in ``group_pathway_distance``. An empty group raises ValueError
    (``on_small="raise"``) or gives NaN (``on_small="nan"``).
    """
    _check_max_pairs(max_pairs)
    group_a = _check_pathways(group_a, level)
    group_b = _check_pathways(group_b, level)
    if not group_a or not group_b:
        return _too_small(
            f"cross-group distance needs non-empty groups, got sizes {len(group_a)} and {len(group_b)}",
            on_small,
        )
    total_pairs = len(group_a) * len(group_b)
    if max_pairs is None or total_pairs <= max_pairs:
        scorer, dtype = _scorer_and_dtype(normalized)
        matrix = process.cdist(group_a, group_b, scorer=scorer, dtype=dtype, workers=_workers(total_pairs))
        return float(matrix.mean(dtype=np.float64))
    flat = np.random.default_rng(seed).choice(total_pairs, size=max_pairs, replace=False)
    index_a, index_b = np.divmod(flat, len(group_b))
    return float(_pair_distances(group_a, group_b, index_a.tolist(), index_b.tolist(), normalized)
                 .mean(dtype=np.float64))


# ---------------------------------------------------------------------------------------
# Metric 2: pathway complexity / consistency
# ---------------------------------------------------------------------------------------


def _check_router_shapes(mean_weights: jax.Array, router_matrices: jax.Array) -> None:
    if (
        mean_weights.ndim != 3
        or router_matrices.ndim != 3
        or mean_weights.shape[1:] != router_matrices.shape[:2]
    ):
        raise ValueError(
            "need mean_weights [batch, layers, experts] and router_matrices [layers, experts, hidden]; "
            f"got {mean_weights.shape} and {router_matrices.shape}"
        )


@jax.jit
def _routing_embeddings(mean_weights: jax.Array, router_matrices: jax.Array) -> jax.Array:
    return jnp.einsum(
        "ble,leh->blh",
        mean_weights.astype(jnp.float32),
        router_matrices.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )


@jax.jit
def _layer_cosines(mean_weights: jax.Array, router_matrices: jax.Array) -> jax.Array:
    embeddings = _routing_embeddings(mean_weights, router_matrices)  # [batch, layers, hidden]
    norms = jnp.linalg.norm(embeddings, axis=-1)
    dots = jnp.sum(embeddings[:, :-1] * embeddings[:, 1:], axis=-1)
    return dots / jnp.maximum(norms[:, :-1] * norms[:, 1:], 1e-8)  # [batch, layers - 1]


@jax.jit
def _pathway_complexity(mean_weights: jax.Array, router_matrices: jax.Array) -> jax.Array:
    cosines = _layer_cosines(mean_weights, router_matrices)
    return 1.0 - jnp.mean(cosines / (cosines.max(axis=1, keepdims=True) + 1e-8), axis=1)


def _batch_sharded(kernel, mean_weights, router_matrices, mesh: Mesh | None) -> jax.Array:
    """Run ``kernel`` with the batch axis of ``mean_weights`` sharded over the data axis."""
    if mesh is None:
        return kernel(mean_weights, router_matrices)
    batch = mean_weights.shape[0]
    padded = round_up_to_data_axis(batch, mesh)
    mean_weights = jnp.pad(mean_weights, ((0, padded - batch), (0, 0), (0, 0)))
    return kernel(shard_batch(mean_weights, mesh), replicate(router_matrices, mesh))[:batch]


def routing_embeddings(mean_weights, router_matrices, mesh: Mesh | None = None) -> jax.Array:
    """e_l(i) = sum_k g_l(i, k) v_lk, v_lk = row k of layer l's router matrix W_l.

    mean_weights: ``[batch, layers, experts]`` token-mean router weights g (all experts).
    router_matrices: ``[layers, experts, hidden]`` (W_l stacked). Returns
    ``[batch, layers, hidden]`` float32 (computed in float32 whatever the input dtype).
    """
    mean_weights, router_matrices = jnp.asarray(mean_weights), jnp.asarray(router_matrices)
    _check_router_shapes(mean_weights, router_matrices)
    return _batch_sharded(_routing_embeddings, mean_weights, router_matrices, mesh)


def pathway_complexity(mean_weights, router_matrices, mesh: Mesh | None = None) -> jax.Array:
    """Pathway complexity C_i (metric 2; lower = smoother), ``[batch]`` float32.

    C_i = 1 - (1/(L-1)) sum_l c_l / (max_l c_l + 1e-8), c_l = cos(e_l(i), e_{l+1}(i)).
    Shapes as in ``routing_embeddings``; needs layers >= 2. Cosines use a 1e-8 floor on the
    norm product (a zero embedding gives cosine 0). Implemented literally: if max_l c_l is
    negative (or near 0) the ratio is no longer in [-1, 1] and C_i can leave [0, 2]
    (``consistency_edge_cases`` flags those samples; with 2 layers C_i is always 0).
    """
    mean_weights, router_matrices = jnp.asarray(mean_weights), jnp.asarray(router_matrices)
    _check_router_shapes(mean_weights, router_matrices)
    if mean_weights.shape[1] < 2:
        raise ValueError(f"pathway complexity needs at least 2 layers, got {mean_weights.shape[1]}")
    return _batch_sharded(_pathway_complexity, mean_weights, router_matrices, mesh)


MIN_MAX_COSINE = 0.01
"""Below this largest layer cosine, c_l / max_l c_l is no longer a ratio in [-1, 1] (division
by ~0 or a negative number) and the complexity is unbounded: such samples are flagged."""


def layer_cosines(mean_weights, router_matrices, mesh: Mesh | None = None) -> jax.Array:
    """c_l(i) = cos(e_l(i), e_{l+1}(i)), ``[batch, layers - 1]`` float32 (see ``pathway_complexity``)."""
    mean_weights, router_matrices = jnp.asarray(mean_weights), jnp.asarray(router_matrices)
    _check_router_shapes(mean_weights, router_matrices)
    return _batch_sharded(_layer_cosines, mean_weights, router_matrices, mesh)


def consistency_edge_cases(mean_weights, router_matrices) -> dict:
    """Where the paper's complexity formula stops measuring smoothness (docs/method.md).

    Returns {"unbounded": bool [batch] (max_l c_l <= MIN_MAX_COSINE: the ratio leaves [-1, 1] and
    C_i can be any size, e.g. C_i = +5e7, consistency -5e7, for cosines [0, -1]),
    "two_layers": bool (with 2 layers there
    is one cosine, c / max c = 1, so C_i = 0 and consistency = 1 whatever the routing)}.
    """
    cosines = np.asarray(layer_cosines(mean_weights, router_matrices))
    return {"unbounded": cosines.max(axis=1) <= MIN_MAX_COSINE, "two_layers": cosines.shape[1] == 1}


def pathway_consistency(mean_weights, router_matrices, mesh: Mesh | None = None) -> jax.Array:
    """Pathway consistency 1 - C_i, ``[batch]`` float32 (the paper reports it rising with test
    accuracy). Arguments as in ``pathway_complexity``."""
    return 1.0 - pathway_complexity(mean_weights, router_matrices, mesh)
