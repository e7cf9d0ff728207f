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
                                                           nan_positions[0]))
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


@dataclasses.dataclass(frozen=True)
class EpsCalibration:
    """Result of ``calibrate_eps``: the threshold, the share of samples it memorizes by the end,
    and whether that share lies inside the requested range."""

    eps: float
    fraction_memorized: float
    in_target_range: bool


def calibrate_eps(loss, target_fraction: tuple[float, float] = (0.20, 0.25)) -> EpsCalibration:
    """Choose one group's eps so that the fraction memorized by the end lies in target_fraction.

    A sample is memorized by the end iff loss(T) <= eps: t* = T always satisfies the delta
    condition (|loss(T) - loss(T)| = 0), so delta cannot change this fraction and the search
    runs over final losses only. Candidates are every achievable fraction (sorted unique final
    losses, plus "none"); the chosen one is closest to the middle of the range (ties: the
    smaller eps). eps sits halfway between the last memorized and the first non-memorized
    final loss, so it is robust to float noise. If no candidate lies in the range (ties in
    the final losses), the closest is returned with ``in_target_range=False``.
    loss: [checkpoints, samples] one group's per-sample losses (nats).
    """
    low, high = target_fraction
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"target_fraction needs 0 <= low <= high <= 1, got {target_fraction}")
    final_loss = _checked_matrix("loss", loss, np.float64)[-1]
    values, counts = np.unique(final_loss, return_counts=True)
    fractions = np.concatenate([[0.0], np.cumsum(counts) / final_loss.size])
    midpoints = (values[:-1] + values[1:]) / 2
    candidates_eps = np.concatenate([
        [np.nextafter(values[0], -np.inf)],  # memorizes none
        np.where(np.isfinite(midpoints), midpoints, values[:-1]),
        [values[-1]],  # memorizes all
    ])
    best = int(np.argmin(np.abs(fractions - (low + high) / 2)))  # argmin: first = smaller eps
    fraction = float(fractions[best])
    return EpsCalibration(
        eps=float(candidates_eps[best]),
        fraction_memorized=fraction,
        in_target_range=bool(low <= fraction <= high),
    )


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


def grokking_delay(onset_step, memorization_step):
    """onset - memorization, in steps (float64, broadcast); NaN where either is NEVER (< 0)
    or NaN. May be negative when a test sample generalizes before training data is memorized.
    Scalars in -> float out; arrays in -> float64 array out.
    """
    onset = np.asarray(onset_step, dtype=np.float64)
    memorization = np.asarray(memorization_step, dtype=np.float64)
    missing = ~(onset >= 0) | ~(memorization >= 0)  # NaN compares False, so it counts as missing
    delay = np.where(missing, np.nan, onset - memorization)
    return float(delay) if delay.ndim == 0 else delay


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
    x, y = metric[start_index:], test_acc[start_index:]
    result = {"pearson_r": np.nan, "pearson_p": np.nan,
              "spearman_r": np.nan, "spearman_p": np.nan, "n": int(x.shape[0])}
    if x.shape[0] < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return result
    pearson = scipy.stats.pearsonr(x, y)
    spearman = scipy.stats.spearmanr(x, y)
    result.update(pearson_r=float(pearson.statistic), pearson_p=float(pearson.pvalue),
                  spearman_r=float(spearman.statistic), spearman_p=float(spearman.pvalue))
    return result
