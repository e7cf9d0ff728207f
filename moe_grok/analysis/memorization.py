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
    entry: dict[str, Any] = {"delta": o.delta, "target_fraction": list(o.target_fraction)}
    if o.eps is not None:
        eps = o.eps
        entry.update(eps=eps, eps_source="fixed", in_target_range=None)
    else:
        try:
            calibration = grokking.calibrate_eps(loss, steps, o.delta, o.target_fraction, o.eps_grid_step,
                                                 o.eps_unit)
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
    t_star = grokking.memorization_steps(loss, steps, eps, o.delta)
    before_end = (t_star >= 0) & (t_star < steps[-1])
    entry.update(share_before_end=float(before_end.mean()), n_memorized_before_end=int(before_end.sum()),
                 n_memorized_at_end=int((t_star == steps[-1]).sum()), n_samples=int(loss.shape[1]),
                 t_star_counts={str(int(s)): int(n) for s, n in zip(*np.unique(t_star[before_end],
                                                                                return_counts=True), strict=False)})
    return entry, t_star
