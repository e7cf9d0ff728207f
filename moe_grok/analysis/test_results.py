"""The test side of the analysis: per-domain test accuracy, per-sample correctness and embeddings."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from moe_grok.analysis import groups
from moe_grok.analysis.checkpoint_stats import CheckpointStats
from moe_grok.data.splits import EvalSplit


@dataclasses.dataclass(frozen=True)
class TestResults:
    """The test side of the analysis, per domain.

    accuracy: {domain: [checkpoints] accuracy}; correct: {domain: [checkpoints, n_test] bool}
    per-sample correctness (gives Test@t# groups; optional); embeddings: {domain: [n_test, dim]}
    rows aligned with `correct`'s samples (optional; used for pairing).
    """

    accuracy: dict[str, np.ndarray]
    correct: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def check(self, domains: Sequence[str], n_checkpoints: int) -> None:
        """ValueError naming test domains that match no training domain, and wrong lengths."""
        unknown = sorted(set(self.accuracy) - set(domains))
        if unknown:
            folded = {d.lower(): d for d in domains}
            hints = [f"{u!r} (did you mean {folded[u.lower()]!r}?)" for u in unknown if u.lower() in folded]
            raise ValueError(f"test results name domain(s) {unknown} that match no training domain "
                             f"{list(domains)}{'; ' + ', '.join(hints) if hints else ''}")
        for domain, acc in self.accuracy.items():
            if len(acc) != n_checkpoints:
                raise ValueError(f"test accuracy of domain {domain!r} has {len(acc)} values for {n_checkpoints} "
                                 "checkpoints")
        for domain, correct in self.correct.items():
            if correct.ndim != 2 or correct.shape[0] != n_checkpoints:
                raise ValueError(f"test correctness of domain {domain!r} has shape {correct.shape}, need "
                                 f"[{n_checkpoints}, samples]")
            if domain in self.embeddings:
                groups.check_embeddings(f"test domain {domain!r}", self.embeddings[domain], correct.shape[1])


def test_results_from_split(stats: list[CheckpointStats], split_name: str, split: EvalSplit,
                            embeddings: np.ndarray | None = None) -> TestResults:
    """TestResults from a test split evaluated at every checkpoint: a sample is correct when every
    scored position is predicted exactly; domain accuracy is the mean per-sample score."""
    if embeddings is not None:
        embeddings = groups.check_embeddings(f"split {split_name!r}", embeddings, len(split))
    score = np.stack([s.splits[split_name]["correct"] for s in stats])  # [C, N] fraction of positions right
    result = TestResults({}, {}, {})
    for domain in split.group_names:
        rows = split.rows(domain)
        result.accuracy[domain] = score[:, rows].mean(axis=1)
        result.correct[domain] = score[:, rows] >= 1.0
        if embeddings is not None:
            result.embeddings[domain] = embeddings[rows]
    return result
