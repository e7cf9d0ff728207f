"""Every correlation and confidence interval of the package, as numpy / scipy functions.

Correlations return NaN statistics where they are undefined (too few points, a constant input)
instead of raising, so that a report of a short or degenerate run still has every entry.
Intervals are two-sided at `confidence` (0.95: the 2.5% and 97.5% quantiles).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import scipy.stats

NAN_CORRELATIONS = {"pearson_r": np.nan, "pearson_p": np.nan, "spearman_r": np.nan, "spearman_p": np.nan}


def pearson_spearman(x, y) -> dict[str, Any]:
    """Pearson and Spearman correlation of x and y ([n] each, finite): {"pearson_r", "pearson_p",
    "spearman_r", "spearman_p", "n"}; the four statistics are NaN when n < 3 or either is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    result = {**NAN_CORRELATIONS, "n": int(x.shape[0])}
    if x.shape[0] < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    pearson = scipy.stats.pearsonr(x, y)
    spearman = scipy.stats.spearmanr(x, y)
    result.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
                  spearman_r=float(spearman.statistic), spearman_p=float(spearman.pvalue))
    return result


def pearson_r(x, y) -> float:
    """Pearson r over the pairs where both x and y are finite ([n] each); NaN with fewer than 3
    such pairs or a constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return float("nan")
    return float(scipy.stats.pearsonr(x[keep], y[keep]).statistic)


def partial_correlation(x, y, controls) -> dict[str, Any]:
    """Pearson correlation of x and y after removing from each its least-squares fit on the
    controls (plus an intercept). x, y: [n]; controls: [n, c]. Returns {"r", "p", "n", "df"}; r and p
    NaN when n <= c + 2, an input is not finite, or a residual is constant. p from the t distribution
    with df = n - 2 - c degrees of freedom."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    controls = np.asarray(controls, np.float64)
    controls = controls if controls.ndim == 2 else controls.reshape(len(x), -1)
    n, c = controls.shape
    result = {"r": np.nan, "p": np.nan, "n": int(n), "df": int(n - 2 - c)}
    if n <= c + 2 or not (np.isfinite(x).all() and np.isfinite(y).all() and np.isfinite(controls).all()):
        return result
    design = np.column_stack([np.ones(n), controls])
    residual_x = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    residual_y = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    if np.ptp(residual_x) < 1e-12 * max(1.0, np.abs(x).max()) or np.ptp(residual_y) < 1e-12 * max(1.0, np.abs(y).max()):
        return result
    r = float(np.clip(np.corrcoef(residual_x, residual_y)[0, 1], -1.0, 1.0))
    dof = n - 2 - c
    t = r * np.sqrt(dof / max(1e-300, 1.0 - r * r))
    result.update(r=r, p=float(2 * scipy.stats.t.sf(abs(t), dof)))
    return result


def fisher_interval(r: float, n: int, confidence: float = 0.95) -> list[float]:
    """Confidence interval [low, high] of a Pearson r from n pairs (Fisher z); NaN when n < 4 or r is NaN."""
    if n < 4 or not np.isfinite(r):
        return [float("nan"), float("nan")]
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    half = scipy.stats.norm.ppf(0.5 + confidence / 2) / np.sqrt(n - 3)
    return [float(np.tanh(z - half)), float(np.tanh(z + half))]


def t_half_width(standard_error: float, dof: int, confidence: float = 0.95) -> float:
    """Half width of a t-distribution confidence interval: t quantile (dof degrees of freedom) x standard error."""
    return scipy.stats.t.ppf(0.5 + confidence / 2, dof) * standard_error


def mean_ci(values, confidence: float = 0.95) -> dict[str, Any]:
    """Mean and t-distribution confidence interval of the finite values (None and NaN skipped):
    {"mean", "ci95": [low, high], "n"}; the interval is NaN with fewer than 2 values."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    if values.size == 1:
        return {"mean": float(values[0]), "ci95": [float("nan"), float("nan")], "n": 1}
    half = t_half_width(values.std(ddof=1), values.size - 1, confidence) / np.sqrt(values.size)
    return {"mean": float(values.mean()), "ci95": [float(values.mean() - half), float(values.mean() + half)],
            "n": int(values.size)}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> list[float]:
    """Wilson score interval [low, high] of a share successes / n (stays inside [0, 1], sensible
    at 0 and n successes); NaN when n == 0."""
    if n <= 0:
        return [float("nan"), float("nan")]
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")  # may be fractional: share_ci
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def _finite(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)


def _fisher_z(correlations) -> np.ndarray:
    """arctanh of the finite correlations (None and NaN skipped), r clipped to +-(1 - 1e-12): +-1 stays finite."""
    return np.arctanh(np.clip(_finite(correlations), -1.0 + 1e-12, 1.0 - 1e-12))


def fisher_mean_ci(correlations, confidence: float = 0.95) -> dict[str, Any]:
    """Mean of correlations (e.g. one Pearson r per seed) through Fisher's z: z = arctanh(r) (r
    clipped to +-(1 - 1e-12)), the t interval of the mean z (n - 1 degrees of freedom), both
    back-transformed with tanh, so mean and interval stay inside [-1, 1]. None and NaN skipped.
    {"mean", "ci95": [low, high], "n", "interval": "fisher_z_t"}; the interval is NaN with fewer than 2 values."""
    summary = mean_ci(_fisher_z(correlations), confidence)
    return {"mean": float(np.tanh(summary["mean"])), "ci95": [float(np.tanh(b)) for b in summary["ci95"]],
            "n": summary["n"], "interval": "fisher_z_t"}


def fisher_z_difference(correlations_a, correlations_b, confidence: float = 0.95) -> dict[str, Any]:
    """Difference of two groups' mean Fisher z (z = arctanh r, r clipped to +-(1 - 1e-12); e.g. one
    Pearson r per seed in two arms), mean z_a - mean z_b, with Welch's t interval (Welch-Satterthwaite
    degrees of freedom). In z units (unbounded: no back-transform, as a difference of z is no
    correlation). None and NaN skipped. {"mean", "ci95", "n": [n_a, n_b], "interval": "fisher_z_welch_t"};
    NaN where a group has fewer than 2 values."""
    z_a, z_b = _fisher_z(correlations_a), _fisher_z(correlations_b)
    result = {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": [int(z_a.size), int(z_b.size)],
              "interval": "fisher_z_welch_t"}
    if z_a.size < 2 or z_b.size < 2:
        return result
    var_a, var_b = z_a.var(ddof=1) / z_a.size, z_b.var(ddof=1) / z_b.size
    difference = float(z_a.mean() - z_b.mean())
    if var_a + var_b == 0:
        return {**result, "mean": difference}
    dof = (var_a + var_b) ** 2 / (var_a ** 2 / (z_a.size - 1) + var_b ** 2 / (z_b.size - 1))
    half = float(scipy.stats.t.ppf(0.5 + confidence / 2, dof) * np.sqrt(var_a + var_b))
    return {**result, "mean": difference, "ci95": [difference - half, difference + half]}


def share_ci(values, confidence: float = 0.95) -> dict[str, Any]:
    """Share with its Wilson score interval (`wilson_interval`) from per-unit values in [0, 1]
    (1 = yes; a unit's own share, e.g. of its domains, counts fractionally), n = units with a value.
    None and NaN skipped. {"mean", "ci95", "n", "interval": "wilson"}."""
    values = _finite(values)
    if np.any((values < 0) | (values > 1)):
        raise ValueError(f"a share needs values in [0, 1], got {values}")
    if values.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0, "interval": "wilson"}
    return {"mean": float(values.mean()), "ci95": wilson_interval(float(values.sum()), int(values.size), confidence),
            "n": int(values.size), "interval": "wilson"}


def bounded_mean_ci(values, low: float, high: float, confidence: float = 0.95) -> dict[str, Any]:
    """`mean_ci` of values that lie in [low, high] (a difference of correlations, a share of samples),
    its interval clipped to that range; "clipped" says whether a bound was moved.
    {"mean", "ci95", "n", "interval": "t_clipped", "clipped"}."""
    summary = mean_ci(values, confidence)
    a, b = summary["ci95"]
    clipped = bool(np.isfinite(a) and (a < low or b > high))
    if np.isfinite(a):
        summary["ci95"] = [float(max(a, low)), float(min(b, high))]
    return {**summary, "interval": "t_clipped", "clipped": clipped}
