"""What the analysis reads of one checkpoint: per-split routing, loss and correctness, the router
matrices and a parameter sample (`checkpoints.cache` produces and caches them)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class CheckpointStats:
    """What one checkpoint gives.

    splits: per split {mean_weights [N, L, E], scored_mean_weights [N, L, E], routing_entropy
    [N, L] (nats), scored_routing_entropy [N, L] (nats), loss [N] (nats), correct [N] (fraction of
    scored positions predicted exactly)} (extraction.routing.RoutingStats); router: the router
    matrices [L, E, D] float32 (pathway consistency); param_sample: a fixed sample of every
    parameter (param_dynamics.parameter_sample).
    """

    step: int
    name: str
    splits: dict[str, dict[str, np.ndarray]]
    router: np.ndarray
    param_sample: dict[str, np.ndarray]
