"""Hand-built checkpoint statistics for the analysis tests (tests/test_analysis.py, tests/test_atomic_writes.py)."""
import numpy as np

from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.data.splits import EvalSplit

STEPS = np.array([0, 100, 200, 300, 400, 500])
LAYERS, EXPERTS, HIDDEN = 3, 4, 5


def _split(groups, names):
    n = len(groups)
    tokens = np.ones((n, 4), np.int32)
    return EvalSplit(tokens, tokens, tokens, tokens, np.asarray(groups, np.int32), names)


def _settling_losses(settle_index, n_checkpoints=None):
    """Loss 3.0 until checkpoint settle_index, then 0.01 (never settles when settle_index is None)."""
    n_checkpoints = len(STEPS) if n_checkpoints is None else n_checkpoints
    loss = np.full(n_checkpoints, 3.0)
    if settle_index is not None:
        loss[settle_index:] = 0.01
    return loss


def build_stats(rng, train_settle, n_test_per_domain=6, domains=("a", "b"), layers=LAYERS):
    """CheckpointStats for a train split whose sample i settles at checkpoint train_settle[i]
    (domains alternate), and a test split whose samples become correct at increasing checkpoints."""
    n_train = len(train_settle)
    train_groups = np.arange(n_train) % len(domains)
    test_groups = np.repeat(np.arange(len(domains)), n_test_per_domain)
    train_loss = np.stack([_settling_losses(s) for s in train_settle], axis=1)  # [C, N]
    # test sample j is correct from checkpoint onset[j] on
    onset = np.tile(np.arange(n_test_per_domain) % 4 + 2, len(domains))
    stats = []
    for c, step in enumerate(STEPS):
        def split_stats(n, loss, correct):
            weights = rng.dirichlet(np.full(EXPERTS, 0.5), size=(n, layers)).astype(np.float32)
            entropy = rng.uniform(0.5, 1.3, (n, layers)).astype(np.float32)
            return {"mean_weights": weights, "scored_mean_weights": weights, "routing_entropy": entropy,
                    "scored_routing_entropy": 2.0 - entropy,  # in [0.7, 1.5]: unlike the all-token entropy
                    "loss": loss.astype(np.float32), "correct": correct.astype(np.float32)}
        splits = {"train": split_stats(n_train, train_loss[c], (train_loss[c] < 1).astype(float)),
                  "test": split_stats(len(test_groups), np.full(len(test_groups), 1.0), (c >= onset).astype(float))}
        sample = {"layers/moe/router": rng.normal(size=20).astype(np.float32), "layers/moe/router#size": np.int64(20)}
        stats.append(CheckpointStats(int(step), f"step {step}", splits,
                                     rng.normal(size=(layers, EXPERTS, HIDDEN)).astype(np.float32), sample))
    split_names = tuple(domains)
    return stats, {"train": _split(train_groups, split_names), "test": _split(test_groups, split_names)}
