"""The warnings of one analysis: logged as they arise and listed in the report."""
from __future__ import annotations

import numpy as np
from absl import logging

from moe_grok.analysis import metrics

MAX_LISTED_STEPS = 6  # an unbounded-consistency warning lists up to this many steps of a set, else counts them
MAX_LISTED_SETS = 6  # ... and names up to this many sets, the most affected first


class RunWarnings:
    """Warnings of an analysis over checkpoints at `steps` ([checkpoints] training steps)."""

    def __init__(self, steps: np.ndarray):
        self._steps = steps
        self.messages: list[str] = []

    def warn(self, message: str) -> None:
        logging.warning("%s", message)
        self.messages.append(message)

    def warn_unbounded_consistency(self, where: str, curves_by_set: dict[str, dict[str, np.ndarray]]) -> None:
        """One warning naming the sets (and their checkpoints) with samples whose consistency is
        unbounded, the most affected first; the per-checkpoint shares are in the report's curves."""
        flagged = []
        for name, curves in curves_by_set.items():
            share = curves["consistency_unbounded_share"]
            at = share > 0  # NaN (an empty set) is not flagged
            if at.any():
                steps, worst = self._steps[at].tolist(), float(np.max(share[at]))
                where_in_run = (f"step(s) {steps}" if len(steps) <= MAX_LISTED_STEPS else
                                f"{len(steps)} of {len(at)} checkpoints (steps {steps[0]}..{steps[-1]})")
                flagged.append((worst, f"{name} at {where_in_run} (up to {worst:.0%} of samples)"))
        if flagged:
            flagged.sort(key=lambda item: -item[0])  # stable: equal shares keep the sets' order
            listed = [text for _, text in flagged[:MAX_LISTED_SETS]]
            if len(flagged) > MAX_LISTED_SETS:
                listed.append(f"{len(flagged) - MAX_LISTED_SETS} more set(s)")
            self.warn(f"{where}: pathway consistency is unbounded (largest layer cosine at or below "
                      f"{metrics.MIN_MAX_COSINE}) for samples of {'; '.join(listed)}; "
                      "see consistency_unbounded_share (docs/method.md)")
