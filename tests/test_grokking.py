"""Memorization / onset / correlation rules on hand-made curves with hand-computed answers."""
import math
import warnings

import numpy as np
import pytest
import scipy.stats

from moe_grok.analysis import grokking

STEPS5 = np.array([0, 100, 200, 300, 400])


def memorization_reference(loss, steps, eps, delta):
    """Literal loop form of SPEC's rule, for cross-checking the vectorized version."""
    result = []
    for sample in loss.T:
        ok = [all(sample[t] <= eps and abs(sample[t] - sample[-1]) <= delta
                  for t in range(start, len(sample)))
              for start in range(len(sample))]
        result.append(steps[ok.index(True)] if True in ok else -1)
    return np.array(result)


def test_memorization_hand_computed():
    loss = np.array([
        # dips below eps at 100, rises to 0.5 at 200, stays low from 300
        [2.0, 0.05, 0.5, 0.04, 0.03],
        # below eps from 100, but within delta=0.05 of the final 0.01 only at 400
        [1.0, 0.09, 0.08, 0.07, 0.01],
        # never below eps
        [1.0, 0.5, 0.3, 0.2, 0.15],
        # memorized from the first checkpoint
        [0.01, 0.01, 0.01, 0.01, 0.01],
        # always below eps, delta first satisfied at 200
        [0.09, 0.09, 0.03, 0.02, 0.01],
    ]).T
    result = grokking.memorization_steps(loss, STEPS5, eps=0.1, delta=0.05)
    assert result.dtype == np.int64
    assert result.tolist() == [300, 400, -1, 0, 200]


def test_memorization_delta_and_per_sample_eps():
    loss = np.array([[0.09, 0.09, 0.03, 0.02, 0.01]]).T
    assert grokking.memorization_steps(loss, STEPS5, eps=0.1, delta=0.1).tolist() == [0]
    two = np.array([[0.3, 0.2, 0.2, 0.2, 0.2], [0.3, 0.2, 0.2, 0.2, 0.2]]).T
    per_sample = grokking.memorization_steps(two, STEPS5, eps=np.array([0.25, 0.1]))
    assert per_sample.tolist() == [100, -1]


def test_memorization_matches_loop_reference_on_random_curves():
    rng = np.random.default_rng(0)
    loss = np.abs(rng.normal(0.1, 0.08, size=(12, 300)))
    steps = np.arange(12) * 50
    expected = memorization_reference(loss, steps, eps=0.15, delta=0.05)
    assert 0 < (expected == -1).sum() < 300  # the population mixes both outcomes
    assert len(set(expected.tolist())) > 3
    np.testing.assert_array_equal(
        grokking.memorization_steps(loss, steps, eps=0.15, delta=0.05), expected)


def test_memorization_input_errors():
    loss = np.full((5, 3), 0.1)
    with pytest.raises(ValueError, match="steps must have shape"):
        grokking.memorization_steps(loss, STEPS5[:4], eps=0.1)
    with pytest.raises(ValueError, match="strictly increasing"):
        grokking.memorization_steps(loss, [0, 100, 100, 300, 400], eps=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        grokking.memorization_steps(np.zeros((5, 0)), STEPS5, eps=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        grokking.memorization_steps(np.zeros(5), STEPS5, eps=0.1)
    with pytest.raises(ValueError, match="eps must be a scalar or have shape"):
        grokking.memorization_steps(loss, STEPS5, eps=np.array([0.1, 0.2]))
    loss[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN at checkpoint 2, sample 1"):
        grokking.memorization_steps(loss, STEPS5, eps=0.1)


def test_calibrate_eps_hand_computed():
    final = np.array([0.4, 0.1, 0.8, 0.3, 0.2, 0.6, 0.7, 0.5])
    loss = np.stack([final + 1.0, final])
    calibration = grokking.calibrate_eps(loss)
    # candidate fractions k/8; 2/8 = 0.25 is closest to the range middle 0.225
    assert calibration == grokking.EpsCalibration(eps=0.25, fraction_memorized=0.25,
                                                  in_target_range=True)
    # the fraction closest to the middle of the range wins, not the range's edge
    assert grokking.calibrate_eps(loss, target_fraction=(0.0, 0.5)).fraction_memorized == 0.25


def test_calibrate_eps_hits_range_on_synthetic_population():
    rng = np.random.default_rng(1)
    n_checkpoints, n_samples = 8, 2000
    decay = np.exp(-np.linspace(0, 1, n_checkpoints))[:, None] * rng.uniform(1, 6, n_samples)
    loss = decay * rng.lognormal(-1.0, 1.0, n_samples)
    calibration = grokking.calibrate_eps(loss)
    assert calibration.in_target_range
    assert 0.20 <= calibration.fraction_memorized <= 0.25
    memorized = grokking.memorization_steps(loss, np.arange(n_checkpoints), calibration.eps)
    assert np.mean(memorized >= 0) == calibration.fraction_memorized


def test_calibrate_eps_reports_miss_when_ties_make_range_unreachable():
    loss = np.array([[0.1] * 5 + [0.5] * 5])
    calibration = grokking.calibrate_eps(loss)
    # reachable fractions are 0, 0.5, 1: 0 is closest to 0.225
    assert not calibration.in_target_range
    assert calibration.fraction_memorized == 0.0
    assert calibration.eps < 0.1
    with pytest.raises(ValueError, match="target_fraction"):
        grokking.calibrate_eps(loss, target_fraction=(0.3, 0.2))


def test_onset_one_later_error_allowed_two_not():
    steps = np.arange(10) * 10
    correct = np.array([
        [0, 1, 1, 1, 1, 0, 1, 1, 1, 1],  # from 1: one later error, mean 8/9 -> onset 10
        [0, 1, 1, 0, 1, 1, 0, 1, 1, 1],  # from 1/2: two later errors; from 4: one, 5/6
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # never
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # correct only at the last checkpoint
        [0, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # not correct at 0 itself, although later ok
    ], dtype=bool).T
    assert grokking.generalization_onset(correct, steps).tolist() == [10, 40, -1, 90, 10]


def test_onset_later_error_limit_without_threshold():
    steps = np.arange(10) * 10
    two_errors = np.array([[0, 1, 1, 0, 1, 1, 0, 1, 1, 1]], dtype=bool).T
    assert grokking.generalization_onset(two_errors, steps, threshold=0.0).tolist() == [40]
    assert grokking.generalization_onset(two_errors, steps, threshold=0.0,
                                         max_later_errors=2).tolist() == [10]


def test_onset_mean_threshold_is_strict():
    # from checkpoint 1: five checkpoints, one error -> mean exactly 0.8, not > 0.8
    correct = np.array([[0, 1, 1, 0, 1, 1]], dtype=bool).T
    assert grokking.generalization_onset(correct, np.arange(6)).tolist() == [4]
    with pytest.raises(ValueError, match="NaN at checkpoint 3, sample 0"):
        grokking.generalization_onset(np.array([[1.0], [1.0], [1.0], [np.nan]]), np.arange(4))


def test_accuracy_onset():
    assert grokking.accuracy_onset([0.1, 0.85, 0.5, 0.9, 0.95], STEPS5) == 300
    assert grokking.accuracy_onset([0.9, 0.9, 0.9, 0.9, 0.8], STEPS5) == -1
    assert grokking.accuracy_onset([0.9, 0.9, 0.9, 0.9, 0.9], STEPS5) == 0
    with pytest.raises(ValueError, match="NaN at checkpoint 1"):
        grokking.accuracy_onset([0.1, np.nan, 0.5, 0.9, 0.95], STEPS5)


def test_grokking_delay():
    assert grokking.grokking_delay(500, 200) == 300.0
    assert math.isnan(grokking.grokking_delay(-1, 200))
    assert math.isnan(grokking.grokking_delay(500, -1))
    delay = grokking.grokking_delay(np.array([500, -1, 100, np.nan]), 200)
    np.testing.assert_array_equal(delay, [300.0, np.nan, -100.0, np.nan])


def test_sustained_rise_start():
    # level = 0.02 + 0.1 * 0.93 = 0.113; acc stays above it from index 4
    assert grokking.sustained_rise_start([0.02, 0.03, 0.02, 0.05, 0.2, 0.5, 0.9, 0.95]) == 3
    # early blip above the level does not count: it drops back at index 2
    assert grokking.sustained_rise_start([0.0, 0.2, 0.05, 0.3, 0.6, 1.0]) == 2
    assert grokking.sustained_rise_start([0.0, 0.2, 0.05, 0.3, 0.6, 1.0], rise_fraction=0.25) == 2
    assert grokking.sustained_rise_start([0.0, 0.2, 0.05, 0.3, 0.6, 1.0], rise_fraction=0.5) == 3
    assert grokking.sustained_rise_start([0.4, 0.4, 0.4]) == -1
    assert grokking.sustained_rise_start([0.0, 1.0, 0.0]) == -1


def test_correlations_equal_scipy_over_window():
    metric = np.array([-4.0, 9.0, 5.0, 4.2, 3.1, 2.0, 1.5, 1.4])
    test_acc = np.array([0.0, 0.9, 0.05, 0.1, 0.3, 0.7, 0.8, 0.95])
    result = grokking.metric_correlations(metric, test_acc, start_index=2)
    pearson = scipy.stats.pearsonr(metric[2:], test_acc[2:])
    spearman = scipy.stats.spearmanr(metric[2:], test_acc[2:])
    assert result["n"] == 6
    assert result["pearson_r"] == pytest.approx(pearson.statistic)
    assert result["pearson_p"] == pytest.approx(pearson.pvalue)
    assert result["spearman_r"] == pytest.approx(-1.0)  # strictly decreasing vs increasing
    assert result["spearman_p"] == pytest.approx(spearman.pvalue)
    assert -1.0 < result["pearson_r"] < -0.9
    whole = grokking.metric_correlations(metric, test_acc, start_index=0)
    assert whole["spearman_r"] > -0.9  # the two early points break the monotone relation


def test_correlations_nan_on_too_few_points_or_constant_input():
    metric, test_acc = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.1, 0.4, 0.4, 0.4])
    short = grokking.metric_correlations(metric, np.array([0.1, 0.2, 0.3, 0.5]), start_index=2)
    assert short["n"] == 2
    assert all(math.isnan(short[key])
               for key in ("pearson_r", "pearson_p", "spearman_r", "spearman_p"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flat = grokking.metric_correlations(metric, test_acc, start_index=1)
    assert flat["n"] == 3 and math.isnan(flat["pearson_r"]) and math.isnan(flat["spearman_p"])
    assert not math.isnan(grokking.metric_correlations(metric, test_acc, 0)["pearson_r"])


def test_correlations_input_errors():
    with pytest.raises(ValueError, match="must match"):
        grokking.metric_correlations(np.ones(4), np.ones(5), 0)
    with pytest.raises(ValueError, match="start_index"):
        grokking.metric_correlations(np.ones(4), np.ones(4), -1)
    with pytest.raises(ValueError, match="metric is NaN at checkpoint 2"):
        grokking.metric_correlations(np.array([1.0, 2.0, np.nan]), np.ones(3), 0)
