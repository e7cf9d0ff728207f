"""Which training samples a domain memorizes, and when: eps calibration and t* (docs/method.md, "Memorization")."""
from __future__ import annotations

from typing import Any

import numpy as np

from moe_grok.analysis import grokking
from moe_grok.analysis.options import AnalysisOptions
from moe_grok.analysis.run_warnings import RunWarnings


def memorization(domain: str, loss: np.ndarray, steps: np.ndarray, options: AnalysisOptions,
                 warnings: RunWarnings) -> tuple[dict[str, Any], np.ndarray]:
    """(report entry, t* [n] per sample, -1 = never) for one domain's training losses [checkpoints, n]
    (nats) at `steps`: eps fixed by the options or calibrated on its grid, then the paper's rule."""
    o = options
    entry: dict[str, Any] = {"delta": o.delta, "delta_unit": o.delta_unit, "target_fraction": list(o.target_fraction)}
    if o.eps is not None:
        eps = o.eps
        entry.update(eps=eps, eps_source="fixed", in_target_range=None)
    else:
        try:
            calibration = grokking.calibrate_eps(loss, steps, o.delta, o.target_fraction, o.eps_grid_step,
                                                 o.eps_unit, o.delta_unit)
            eps = calibration.eps
            entry.update(eps=eps, eps_source="calibrated", eps_unit=o.eps_unit, eps_unit_nats=calibration.unit,
                         in_target_range=calibration.in_target_range,
                         grid=[[g, s] for g, s in zip(calibration.grid, calibration.shares, strict=False)])
            if not calibration.in_target_range:
                warnings.warn(f"domain {domain!r}: no grid eps gives a share memorized before T inside "
                              f"{o.target_fraction}; the closest, eps={eps:.4g}, gives {calibration.share:.1%}")
        except grokking.EpsCalibrationError as err:
            eps = float(loss.max()) + 1.0
            entry.update(eps=eps, eps_source="unreachable", in_target_range=False, error=str(err))
            warnings.warn(f"domain {domain!r}: {err}")
    delta = grokking.effective_delta(o.delta, eps, o.delta_unit)
    entry["delta_nats"] = delta
    t_star = grokking.memorization_steps(loss, steps, eps, delta)
    before_end = (t_star >= 0) & (t_star < steps[-1])
    entry.update(share_before_end=float(before_end.mean()), n_memorized_before_end=int(before_end.sum()),
                 n_memorized_at_end=int((t_star == steps[-1]).sum()), n_samples=int(loss.shape[1]),
                 t_star_counts={str(int(s)): int(n) for s, n in zip(*np.unique(t_star[before_end],
                                                                                return_counts=True), strict=False)})
    return entry, t_star


def memorized_rows(t_star: np.ndarray, rows: np.ndarray, steps: np.ndarray, mode: str, onset_step: int = -1,
                   min_group_size: int = 5) -> np.ndarray | list[np.ndarray]:
    """Table 1's memorized set of a domain (docs/method.md, "Correlations with test accuracy").

    t_star: [n] memorization steps (-1 = never) of the domain's training rows `rows` [n]; steps:
    [checkpoints]. mode (options.MEMORIZED_SETS): "growing" -> a list, per checkpoint t, of the rows
    with t* <= t and t* < T (the samples memorized by then: the paper's reading); "fixed" -> the
    rows with t* < T, the same at every checkpoint; "early_groups" -> the rows of the Pretrain@t*
    groups of at least `min_group_size` samples with t* before `onset_step` (the test onset; -1:
    never, then t* < T), the same at every checkpoint.
    """
    steps = np.asarray(steps)
    before_end = (t_star >= 0) & (t_star < steps[-1])
    if mode == "fixed":
        return rows[before_end]
    if mode == "growing":
        return [rows[before_end & (t_star <= step)] for step in steps]
    if mode == "early_groups":
        horizon = onset_step if onset_step >= 0 else steps[-1]
        early = before_end & (t_star < horizon)
        group_steps, counts = np.unique(t_star[early], return_counts=True)
        large = group_steps[counts >= min_group_size]
        return rows[early & np.isin(t_star, large)]
    raise ValueError(f"unknown memorized_set {mode!r}")
