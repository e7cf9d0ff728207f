"""Pathways of whole splits, coded once per checkpoint and shared by every metric of an analysis."""
from __future__ import annotations

import numpy as np

from moe_grok.analysis import pathways
from moe_grok.analysis.checkpoint_stats import CheckpointStats


class PathwayCache:
    """Pathway strings / token tuples / lengths of every sample of a split at a checkpoint, each
    computed once per (split, checkpoint, tau) from the token-mean router weights [N, L, E] of
    `view` ("mean_weights": all tokens, "scored_mean_weights": scored positions)."""

    def __init__(self, stats: list[CheckpointStats], view: str):
        self._stats, self._view, self._cache = stats, view, {}

    def weights(self, split: str, checkpoint: int) -> np.ndarray:
        """[N, L, E] token-mean router weights."""
        return self._stats[checkpoint].splits[split][self._view]

    def _codes(self, split: str, checkpoint: int, tau: float) -> pathways.LayerPathways:
        key = ("codes", split, checkpoint, tau)
        if key not in self._cache:
            self._cache[key] = pathways.layer_pathways(self.weights(split, checkpoint), tau)
        return self._cache[key]

    def _cached(self, kind: str, split: str, checkpoint: int, tau: float, make):
        key = (kind, split, checkpoint, tau)
        if key not in self._cache:
            self._cache[key] = make(self._codes(split, checkpoint, tau))
        return self._cache[key]

    def strings(self, split: str, checkpoint: int, tau: float) -> list[str]:
        return self._cached("strings", split, checkpoint, tau, pathways.strings_of)

    def tokens(self, split: str, checkpoint: int, tau: float) -> list[tuple[int, ...]]:
        return self._cached("tokens", split, checkpoint, tau, pathways.tokens_of)

    def lengths(self, split: str, checkpoint: int, tau: float) -> np.ndarray:
        """[N] experts per layer on each sample's pathway."""
        return self._cached("lengths", split, checkpoint, tau, lambda codes: codes.lengths.mean(axis=1))

    def layer_strings(self, split: str, checkpoint: int, tau: float, layer: int) -> list[str]:
        return self._cached(f"layer_strings/{layer}", split, checkpoint, tau,
                            lambda codes: pathways.layer_strings_of(codes, layer))
