"""Gaussian-cluster regression data of the paper's synthetic check of the routing-kernel theory."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class ClusterData(NamedTuple):
    """x_* [n, dim] float32; y_train [n] noisy labels; f_* [n] clean labels; cluster_* [n] int."""

    x_train: np.ndarray
    y_train: np.ndarray
    f_train: np.ndarray
    cluster_train: np.ndarray
    x_test: np.ndarray
    f_test: np.ndarray
    cluster_test: np.ndarray


def make_cluster_data(
    seed: int, *, dim: int, n_clusters: int, spread: float, n_train: int, n_test: int, noise_std: float
) -> ClusterData:
    """Gaussian clusters: centers ~ N(0, I_dim), x = center + spread * N(0, I_dim), then rescaled to
    norm sqrt(dim) (the ReLU NTK depends only on angles there, and router logits keep one scale
    whatever the spread). Labels: balanced +-1 per cluster; y_train adds N(0, noise_std^2)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    labels = rng.permutation(np.where(np.arange(n_clusters) % 2 == 0, 1.0, -1.0))

    def sample(count):
        cluster = rng.integers(n_clusters, size=count)
        x = centers[cluster] + spread * rng.standard_normal((count, dim))
        x *= math.sqrt(dim) / np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), labels[cluster].astype(np.float32), cluster

    x_train, f_train, cluster_train = sample(n_train)
    x_test, f_test, cluster_test = sample(n_test)
    y_train = (f_train + noise_std * rng.standard_normal(n_train)).astype(np.float32)
    return ClusterData(x_train, y_train, f_train, cluster_train, x_test, f_test, cluster_test)

