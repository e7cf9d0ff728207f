"""The paper's sample groups and their pairing (docs/method.md, "Groups and pairing").

Pretrain@p: one domain's training samples memorized from the same checkpoint p (t* = p < T).
Test@q:     one domain's test samples that generalize from the same checkpoint q (t# = q).
Each Pretrain group is paired one-to-one with a Test group by the Hungarian algorithm on the
mean cross-group similarity of per-sample embeddings; the grokking delay of a pair is q - p.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import scipy.optimize

from moe_grok import npy_files
from moe_grok.analysis.grokking import NEVER


def pretrain_group_name(step: int) -> str:
    return f"Pretrain@{int(step)}"


def test_group_name(step: int) -> str:
    return f"Test@{int(step)}"


@dataclasses.dataclass(frozen=True)
class SampleGroup:
    """name: "Pretrain@<step>" / "Test@<step>"; step: the shared t* or t#; rows: sample indices [n]."""

    name: str
    step: int
    rows: np.ndarray


def groups_by_step(event_steps, rows, last_step: int | None, name_of) -> list[SampleGroup]:
    """Samples sharing an event step, earliest first. event_steps: [n] (NEVER = no event);
    rows: [n] the samples' indices in their split; steps equal to `last_step` are dropped
    (t* = T holds trivially and does not count as memorization)."""
    event_steps, rows = np.asarray(event_steps), np.asarray(rows)
    keep = event_steps != NEVER
    if last_step is not None:
        keep &= event_steps != last_step
    return [SampleGroup(name_of(step), int(step), rows[keep & (event_steps == step)])
            for step in np.unique(event_steps[keep])]


def _normalized(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def mean_cross_similarity(embeddings_a: np.ndarray, embeddings_b: np.ndarray) -> float:
    """Mean cosine similarity over all pairs (a, b). embeddings_*: [n, d]."""
    return float(np.mean(_normalized(embeddings_a) @ _normalized(embeddings_b).T))


def similarity_matrix(pretrain: list[SampleGroup], test: list[SampleGroup], train_embeddings: np.ndarray | None,
                      test_embeddings: np.ndarray | None) -> np.ndarray:
    """[n_pretrain, n_test] mean cross-group embedding similarity; all ones without embeddings
    (the groups then share only their domain)."""
    if train_embeddings is None or test_embeddings is None:
        return np.ones((len(pretrain), len(test)))
    # reshape: with no pretrain (or no test) groups the comprehension alone gives shape (0,), not [0, n_test]
    return np.array([[mean_cross_similarity(train_embeddings[p.rows], test_embeddings[q.rows]) for q in test]
                     for p in pretrain], np.float64).reshape(len(pretrain), len(test))


def pair_groups(similarity: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (pretrain index, test index) pairs maximizing the total similarity
    (scipy's linear_sum_assignment; min(n_pretrain, n_test) pairs, in pretrain order).

    Ties (e.g. no embeddings: every pair equally similar) go to relative chronological rank, by a
    tie-break term far below any similarity difference: ranks scaled to [0, 1] (groups are given
    earliest first), so equal counts pair k-th with k-th and unequal counts pair first with first
    and last with last (docs/method.md)."""
    similarity = np.asarray(similarity, np.float64)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be [n_pretrain, n_test], got shape {similarity.shape}")
    if not np.isfinite(similarity).all():
        raise ValueError("similarity has non-finite entries")
    if 0 in similarity.shape:
        return []
    n_p, n_q = similarity.shape
    spread = max(float(np.ptp(similarity)), 1.0)
    rank_gap = np.abs(np.arange(n_p)[:, None] / max(n_p - 1, 1) - np.arange(n_q)[None, :] / max(n_q - 1, 1))
    cost = -similarity + 1e-9 * spread * rank_gap
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=False)]


def check_embeddings(name: str, embeddings, n_samples: int) -> np.ndarray:
    """[n_samples, d] finite float embeddings, or ValueError naming the split and the mismatch."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] != n_samples:
        raise ValueError(f"{name} embeddings have shape {embeddings.shape}, need [{n_samples}, dim]: one row per "
                         f"sample of the split, in its order")
    if embeddings.dtype.kind not in "fiu" or not np.isfinite(embeddings).all():
        raise ValueError(f"{name} embeddings must be finite numbers (dtype {embeddings.dtype})")
    return embeddings.astype(np.float64)


def load_embeddings(path: str, split_name: str, n_samples: int) -> np.ndarray:
    """[n_samples, d] embeddings of split `split_name` from the .npy file at `path`, checked as by
    check_embeddings; FileNotFoundError if there is no such file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"embeddings of split {split_name!r}: no such file {path}")
    return check_embeddings(f"split {split_name!r} ({path})", npy_files.load_npy(path), n_samples)
