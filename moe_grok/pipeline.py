"""The whole experiment, shared by the toy runs and OLMoE: checkpoint stats -> analysis -> report."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_grok.analysis.analyze import AnalysisOptions, analyze
from moe_grok.analysis.sources import CheckpointSource
from moe_grok.analysis.stats import collect_checkpoint_stats
from moe_grok.data.splits import EvalSplit
from moe_grok.report.files import write_report


def run_pipeline(sources: Sequence[CheckpointSource], splits: dict[str, EvalSplit], out_dir: str,
                 train_split: str = "train", test_accuracy: dict[str, np.ndarray] | None = None,
                 test_split: str | None = None, options: AnalysisOptions = AnalysisOptions(),
                 batch_size: int = 32, mesh=None, progress: bool = True) -> dict[str, Any]:
    """The whole experiment: stats per checkpoint (cached in out_dir/cache), the per-group
    report, and its files in out_dir/report.

    Test accuracy per group and checkpoint comes either from `test_accuracy` (group ->
    [checkpoints], ordered like the sorted sources, e.g. from data.load_test_accuracy_csv)
    or from the correctness of a `test_split` evaluated at every checkpoint.
    """
    stats = collect_checkpoint_stats(sources, splits, os.path.join(out_dir, "cache"), batch_size, mesh, progress)
    train = splits[train_split]
    if test_split is not None:
        test = splits[test_split]
        test_accuracy = {name: np.array([s.splits[test_split]["correct"][test.groups == g].mean() for s in stats])
                         for g, name in enumerate(test.group_names)}
    if test_accuracy is not None:
        for name, acc in test_accuracy.items():
            if len(acc) != len(stats):
                raise ValueError(f"test accuracy of group {name!r} has {len(acc)} values for {len(stats)} checkpoints")
    report = analyze(stats, train_split, train.groups, train.group_names, test_accuracy, options)
    report["checkpoints"] = [s.name for s in stats]
    write_report(report, os.path.join(out_dir, "report"))
    return report
