"""Memorization, generalization onset and metric correlations (docs/method.md, "Memorization"
and "Generalization onset"), as pure numpy / scipy functions over per-checkpoint curves.

Conventions: ``steps`` is a [checkpoints] strictly increasing array of non-negative integer
training steps; functions that return a step return -1 for "never". Curves are indexed
[checkpoints] or [checkpoints, samples], with checkpoint T = the last one.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.stats

from moe_grok.analysis import statistics

NEVER = -1
"""Step (or index) returned when the event never happens."""


def _checked_steps(steps, n_checkpoints: int) -> np.ndarray:
    steps = np.asarray(steps)
    if steps.ndim != 1 or len(steps) != n_checkpoints:
        raise ValueError(f"steps must have shape [{n_checkpoints}], got {steps.shape}")
    if not np.all(np.isfinite(steps)) or np.any(steps != np.round(steps)) or np.any(steps < 0):
        raise ValueError(f"steps must be non-negative integers, got {steps}")
    if np.any(np.diff(steps) <= 0):
        raise ValueError(f"steps must be strictly increasing, got {steps}")
    return steps.astype(np.int64)


def _checked_matrix(name: str, values, dtype) -> np.ndarray:
    """[checkpoints, samples] array, non-empty, without NaN."""
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [checkpoints, samples] array, "
                         f"got shape {values.shape}")
    if values.dtype.kind in "fc":
        _raise_on_nan(name, values)
    return values.astype(dtype)


def _checked_curve(name: str, values) -> np.ndarray:
    """Non-empty [checkpoints] float curve without NaN."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [checkpoints] array, got {values.shape}")
    _raise_on_nan(name, values)
    return values


def _raise_on_nan(name: str, values: np.ndarray) -> None:
    nan_positions = np.argwhere(np.isnan(values))
    if len(nan_positions):
        where = ", ".join(f"{axis} {i}" for axis, i in zip(("checkpoint", "sample"),
                                                           nan_positions[0], strict=False))
        raise ValueError(f"{name} is NaN at {where} ({len(nan_positions)} NaN values)")


def _first_index_of_final_run(holds: np.ndarray) -> np.ndarray:
    """First checkpoint from which ``holds`` stays True to the end; NEVER if not True at T.

    holds: [checkpoints, ...] bool -> [...] int64 checkpoint indices.
    """
    holds_from_here_on = np.logical_and.accumulate(holds[::-1], axis=0)[::-1]
    run_length = holds_from_here_on.sum(axis=0)
    return np.where(run_length > 0, holds.shape[0] - run_length, NEVER).astype(np.int64)


def _index_to_step(index: np.ndarray, steps: np.ndarray) -> np.ndarray:
    return np.where(index >= 0, steps[np.maximum(index, 0)], NEVER).astype(np.int64)


def memorization_steps(loss, steps, eps, delta: float = 0.05) -> np.ndarray:
    """Step from which each training sample is memorized (the paper's rule), NEVER (-1) if not by T.

    Sample i is memorized from t* = the first checkpoint such that for every t >= t*:
    loss_i(t) <= eps and |loss_i(t) - loss_i(T)| <= delta.
    loss: [checkpoints, samples] per-sample loss (nats); steps: [checkpoints];
    eps: scalar or [samples] (one group's threshold, or per-sample thresholds); delta: nats.
    Returns [samples] int64 steps.
    """
    loss = _checked_matrix("loss", loss, np.float64)
    steps = _checked_steps(steps, loss.shape[0])
    eps = np.asarray(eps, dtype=np.float64)
    if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != loss.shape[1]):
        raise ValueError(f"eps must be a scalar or have shape [{loss.shape[1]}], got {eps.shape}")
    if np.any(np.isnan(eps)) or not delta >= 0:
        raise ValueError(f"eps must not be NaN and delta must be >= 0, got delta={delta}")
    holds = (loss <= eps) & (np.abs(loss - loss[-1]) <= delta)
    return _index_to_step(_first_index_of_final_run(holds), steps)


EPS_UNITS = ("mean_final_loss", "median_final_loss", "nats")
DELTA_UNITS = ("nats", "eps")  # delta in nats, or as a multiple of eps (scaled with it)


class EpsCalibrationError(ValueError):
    """No eps on the grid memorizes enough samples before the final checkpoint."""


@dataclasses.dataclass(frozen=True)
class EpsCalibration:
    """Result of ``calibrate_eps``.

    eps: the chosen threshold (nats); unit: the grid's unit (nats); share: the share of samples
    memorized before the final checkpoint (t* < T) at eps; in_target_range: share inside the
    target; grid / shares: every eps tried and its share (non-decreasing).
    """

    eps: float
    unit: float
    share: float
    in_target_range: bool
    grid: tuple[float, ...]
    shares: tuple[float, ...]


def effective_delta(delta: float, eps: float, delta_unit: str = "nats") -> float:
    """delta in nats: `delta` itself (delta_unit "nats") or `delta` x eps (delta_unit "eps")."""
    if delta_unit not in DELTA_UNITS:
        raise ValueError(f"delta unit must be one of {DELTA_UNITS}, got {delta_unit!r}")
    return delta * eps if delta_unit == "eps" else delta


def share_memorized_before_end(loss, steps, eps, delta: float = 0.05) -> float:
    """Share of samples with a memorization step t* < T (t* = T holds trivially for any
    sample with loss(T) <= eps and does not count). loss: [checkpoints, samples]."""
    memorized = memorization_steps(loss, steps, eps, delta)
    return float(np.mean((memorized >= 0) & (memorized < np.asarray(steps)[-1])))


def calibrate_eps(loss, steps, delta: float = 0.05, target_fraction: tuple[float, float] = (0.20, 0.25),
                  grid_step: float = 0.1, unit: str = "mean_final_loss",
                  delta_unit: str = "nats") -> EpsCalibration:
    """One group's eps on the grid {grid_step, 2 grid_step, ...} x unit (the paper's search in
    steps of 0.1 by the domain's loss scale) so that the share of samples memorized BEFORE the
    final checkpoint lies in target_fraction.

    unit: "mean_final_loss" (the group's average loss at the last checkpoint: the paper's loss
    scale), "median_final_loss" (its median) or "nats" (an absolute grid). delta_unit: "nats", or
    "eps" (delta is a multiple of each grid eps: `effective_delta`). The share is non-decreasing
    in eps, so the smallest grid eps reaching the lower bound is found by bisection. If it
    overshoots the upper bound, the closer of it and the grid point below to the range's middle
    is chosen (ties: the smaller eps) and ``in_target_range`` is False. grid / shares list the
    grid points evaluated.
    Raises EpsCalibrationError if no eps reaches the lower bound (delta then forbids enough
    samples from settling: raise delta or lower the target).
    loss: [checkpoints, samples] per-sample losses (nats); steps: [checkpoints].
    """
    low, high = target_fraction
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"target_fraction needs 0 <= low <= high <= 1, got {target_fraction}")
    if not grid_step > 0:
        raise ValueError(f"eps grid_step must be > 0, got {grid_step}")
    if unit not in EPS_UNITS:
        raise ValueError(f"eps unit must be one of {EPS_UNITS}, got {unit!r}")
    loss = _checked_matrix("loss", loss, np.float64)
    steps = _checked_steps(steps, loss.shape[0])
    scale = {"mean_final_loss": float(np.mean(loss[-1])), "median_final_loss": float(np.median(loss[-1])),
             "nats": 1.0}[unit]
    effective_delta(delta, 1.0, delta_unit)  # checks the unit before any work
    if not scale > 0:
        scale = float(np.max(loss[-1])) or 1.0  # all final losses zero: the grid needs a positive unit
    last_k = max(1, int(np.ceil(float(loss.max()) / (grid_step * scale))))  # from here on every loss <= eps
    tried: dict[int, float] = {}

    def share_at(k: int) -> float:
        if k not in tried:
            eps = k * grid_step * scale
            tried[k] = share_memorized_before_end(loss, steps, eps, effective_delta(delta, eps, delta_unit))
        return tried[k]

    if share_at(last_k) < low:
        raise EpsCalibrationError(
            f"no eps on the grid reaches {low:.0%} memorized before the final checkpoint: "
            f"eps={last_k * grid_step * scale:.4g}"
            f" nats (every loss below it) memorizes {share_at(last_k):.1%}; delta={delta} keeps the rest from "
            f"settling: raise delta or lower target_fraction")
    lo, hi = 1, last_k  # the share is non-decreasing in k: bisect for the first k reaching `low`
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if share_at(mid) >= low else (mid + 1, hi)
    candidates = [k for k in (lo - 1, lo) if k >= 1]
    if not low <= share_at(lo) <= high:  # overshoot: the closer of the two neighbours (ties: smaller eps)
        best = min(candidates, key=lambda k: (abs(share_at(k) - (low + high) / 2), k))
    else:
        best = lo
    ks = sorted(tried)
    return EpsCalibration(eps=best * grid_step * scale, unit=scale, share=share_at(best),
                          in_target_range=bool(low <= share_at(best) <= high),
                          grid=tuple(k * grid_step * scale for k in ks), shares=tuple(tried[k] for k in ks))


def generalization_onset(correct, steps, threshold: float = 0.8,
                         max_later_errors: int = 1) -> np.ndarray:
    """Step from which each test sample stays correct (the paper's rule), NEVER (-1) if none.

    Onset = the first checkpoint c with: correct at c, mean correctness over c..T > threshold,
    and at most ``max_later_errors`` errors at checkpoints after c.
    correct: [checkpoints, samples] bool; steps: [checkpoints]. Returns [samples] int64 steps.
    """
    correct = _checked_matrix("correct", correct, bool)
    steps = _checked_steps(steps, correct.shape[0])
    errors = ~correct
    errors_from_here_on = np.cumsum(errors[::-1], axis=0)[::-1]
    checkpoints_from_here_on = np.arange(correct.shape[0], 0, -1)[:, None]
    mean_accuracy = 1.0 - errors_from_here_on / checkpoints_from_here_on
    later_errors = errors_from_here_on - errors
    valid = correct & (mean_accuracy > threshold) & (later_errors <= max_later_errors)
    onset_index = np.where(valid.any(axis=0), valid.argmax(axis=0), NEVER)
    return _index_to_step(onset_index, steps)


def accuracy_onset(acc, steps, threshold: float = 0.8) -> int:
    """Group-level onset: the first step from which accuracy stays > threshold through T.

    acc: [checkpoints] accuracy in [0, 1]; steps: [checkpoints]. Returns a step, or NEVER (-1)
    if the final accuracy is <= threshold.
    """
    acc = _checked_curve("acc", acc)
    steps = _checked_steps(steps, acc.shape[0])
    return int(_index_to_step(_first_index_of_final_run(acc > threshold), steps))


GROK_ACCURACY = 0.9
"""A domain has grokked from the first checkpoint whose test accuracy stays strictly above this to the end."""


def grok_onset(acc, steps) -> int:
    """THE onset rule of every onset table and count of grokking seeds (the protocol's pages and
    measurements, the regime benchmark): the first step from which accuracy stays strictly above
    GROK_ACCURACY (> 0.9, not >=) through T; NEVER (-1) if it does not end above it. acc:
    [checkpoints] the domain's test accuracy on the test split (toys: the test half of the held-out
    pairs, the accuracy of the analysis report, not the training log's accuracy over both halves)."""
    return accuracy_onset(acc, steps, GROK_ACCURACY)


def sustained_rise_start(acc, rise_fraction: float = 0.1) -> int:
    """Checkpoint index where accuracy starts its sustained rise, NEVER (-1) if there is none.

    Level = min(acc) + rise_fraction * (max(acc) - min(acc)). Let k be the first checkpoint
    from which acc stays strictly above the level through T; the rise starts at k - 1, the last
    checkpoint at or below the level. A flat curve, or one that ends at or below the level,
    has no sustained rise. acc: [checkpoints].
    """
    acc = _checked_curve("acc", acc)
    if not 0.0 <= rise_fraction < 1.0:
        raise ValueError(f"rise_fraction must be in [0, 1), got {rise_fraction}")
    level = acc.min() + rise_fraction * (acc.max() - acc.min())
    first_above = int(_first_index_of_final_run(acc > level))
    return first_above - 1 if first_above > 0 else NEVER


def metric_correlations(metric, test_acc, start_index: int) -> dict:
    """Pearson and Spearman correlation of a metric with test accuracy over checkpoints
    start_index..T (scipy.stats).

    metric, test_acc: [checkpoints]. Returns {"pearson_r", "pearson_p", "spearman_r",
    "spearman_p", "n"}; the four statistics are NaN when n < 3 or either curve is constant
    over the window.
    """
    metric = _checked_curve("metric", metric)
    test_acc = _checked_curve("test_acc", test_acc)
    if metric.shape != test_acc.shape:
        raise ValueError(f"metric {metric.shape} and test_acc {test_acc.shape} must match")
    if not 0 <= start_index < metric.shape[0]:
        raise ValueError(f"start_index must be in [0, {metric.shape[0]}), got {start_index}")
    return statistics.pearson_spearman(metric[start_index:], test_acc[start_index:])


def correlation_window(acc, rise_fraction: float = 0.1, saturation_fraction: float = 0.95) -> tuple[int, int]:
    """Checkpoint indices [start, end] (inclusive) over which a metric is correlated with accuracy.

    start: ``sustained_rise_start``; end: the first checkpoint at or after start whose accuracy
    reaches min + saturation_fraction * (max - min) (saturation; 1.0 = the full range to T).
    (NEVER, NEVER) without a sustained rise. acc: [checkpoints].
    """
    acc = _checked_curve("acc", acc)
    if not 0.0 < saturation_fraction <= 1.0:
        raise ValueError(f"saturation_fraction must be in (0, 1], got {saturation_fraction}")
    start = sustained_rise_start(acc, rise_fraction)
    if start == NEVER:
        return NEVER, NEVER
    if saturation_fraction == 1.0:
        return start, len(acc) - 1
    level = acc.min() + saturation_fraction * (acc.max() - acc.min())
    reached = np.flatnonzero(acc[start:] >= level)
    return start, start + int(reached[0]) if reached.size else len(acc) - 1


def window_correlations(metric, test_acc, start: int, end: int) -> dict:
    """``metric_correlations`` over the checkpoints start..end (inclusive) where both curves are
    finite (a growing memorized set is NaN while it holds fewer than 2 samples); n counts those
    checkpoints, and the statistics are NaN with fewer than 3. NaN statistics (n = 0) without a window."""
    metric, test_acc = np.asarray(metric, np.float64), np.asarray(test_acc, np.float64)
    nan = {**statistics.NAN_CORRELATIONS, "n": 0}
    if start < 0 or end < start:
        return nan
    x, y = metric[start:end + 1], test_acc[start:end + 1]
    keep = np.isfinite(x) & np.isfinite(y)
    if not keep.any():
        return nan
    return metric_correlations(x[keep], y[keep], 0)


def linear_trend(steps, values, per: float = 1000.0) -> dict:
    """Least-squares slope of values over steps, per `per` steps, with its 95% confidence
    interval (t distribution), p-value and n. NaN when fewer than 3 finite points."""
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    result = {"slope": np.nan, "ci95": [np.nan, np.nan], "p": np.nan, "n": int(steps.size)}
    if steps.size < 3 or np.ptp(steps) == 0:
        return result
    if np.ptp(values) == 0:
        return {**result, "slope": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    fit = scipy.stats.linregress(steps, values)
    half = statistics.t_half_width(fit.stderr, steps.size - 2) * per
    return {"slope": float(fit.slope * per), "ci95": [float(fit.slope * per - half), float(fit.slope * per + half)],
            "p": float(fit.pvalue), "n": int(steps.size)}


def quadratic_trend(steps, values) -> dict:
    """Least-squares quadratic a s^2 + b s + c of values over steps (s in units of 1,000 steps):
    {"coefficients": [a, b, c], "r2", "n"}; NaN with fewer than 4 finite points."""
    steps, values = np.asarray(steps, np.float64) / 1000.0, np.asarray(values, np.float64)
    keep = np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if steps.size < 4:
        return {"coefficients": [np.nan] * 3, "r2": np.nan, "n": int(steps.size)}
    coefficients = np.polyfit(steps, values, 2)
    residual = values - np.polyval(coefficients, steps)
    total = np.sum((values - values.mean()) ** 2)
    r2 = float(1.0 - np.sum(residual**2) / total) if total > 0 else np.nan
    return {"coefficients": [float(c) for c in coefficients], "r2": r2, "n": int(steps.size)}


def moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over the last `window` checkpoints (fewer at the start). values: [checkpoints]."""
    values = np.asarray(values, np.float64)
    if window < 1:
        raise ValueError(f"moving-average window must be >= 1, got {window}")
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(1, len(values) + 1)
    lower = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[lower]) / (index - lower)
