"""Memorization / onset / correlation rules on hand-made curves with hand-computed answers."""
import math
import warnings

import numpy as np
import pytest
import scipy.stats

from moe_grok.analysis import grokking

STEPS5 = np.array([0, 100, 200, 300, 400])


def memorization_reference(loss, steps, eps, delta):
    """Literal loop form of the memorization rule, for cross-checking the vectorized version."""
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


def _brute_force_shares(loss, steps, grid, delta=0.05):
    """Share with t* < T at every grid eps, by a direct loop over samples and checkpoints."""
    shares = []
    for eps in grid:
        count = 0
        for i in range(loss.shape[1]):
            holds = [loss[t, i] <= eps and abs(loss[t, i] - loss[-1, i]) <= delta for t in range(len(steps))]
            first = next((t for t in range(len(steps)) if all(holds[t:])), None)
            count += first is not None and first < len(steps) - 1
        shares.append(count / loss.shape[1])
    return shares


def test_calibrate_eps_grid_hand_computed():
    steps = np.array([0, 10, 20, 30])
    # 20 samples; sample i settles at loss 0.05 * (i + 1) from checkpoint 1 on (t* = 10 once eps >= its loss),
    # except samples 15..19 which only drop at the last checkpoint (t* = T: never counted).
    settled = 0.05 * (np.arange(20) + 1)
    loss = np.stack([np.full(20, 5.0), settled, settled, settled])
    loss[:3, 15:] = 5.0
    calibration = grokking.calibrate_eps(loss, steps, delta=0.05, grid_step=0.1, unit="nats")
    # eps 0.1 -> samples 0, 1 (share 0.10); 0.2 -> 0..3 (0.20, in [0.20, 0.25]): the first grid point reaching 0.20
    assert calibration.eps == pytest.approx(0.2) and calibration.share == pytest.approx(0.2)
    assert calibration.in_target_range and calibration.unit == 1.0
    assert list(calibration.shares) == pytest.approx(_brute_force_shares(loss, steps, calibration.grid))
    # t* = T does not count: even eps above every loss leaves samples 15..19 out (share 15/20)
    assert grokking.share_memorized_before_end(loss, steps, 10.0) == pytest.approx(0.75)


def test_calibrate_eps_overshoot_picks_the_closer_neighbour_and_says_so():
    steps = np.array([0, 10, 20])
    settled = np.repeat([0.1, 0.3], [1, 9])  # 10 samples: eps 0.1 -> 10%, eps 0.3 -> 100%
    loss = np.stack([np.full(10, 4.0), settled, settled])
    calibration = grokking.calibrate_eps(loss, steps, grid_step=0.1, unit="nats")
    assert not calibration.in_target_range
    # share 0.1 is 0.125 off the target range, 1.0 is 0.775 off
    assert calibration.share == pytest.approx(0.1) and calibration.eps == pytest.approx(0.2)


def test_calibrate_eps_relative_unit_is_the_median_final_loss():
    rng = np.random.default_rng(1)
    steps = np.arange(8) * 100
    rate = rng.uniform(0.2, 2.0, 2000)
    loss = 3.0 * np.exp(-rate[None] * np.arange(8)[:, None]) + rng.uniform(0, 1e-4, (8, 2000))
    calibration = grokking.calibrate_eps(loss, steps, delta=0.05, unit="median_final_loss")
    assert calibration.unit == pytest.approx(np.median(loss[-1]))
    assert calibration.in_target_range and 0.20 <= calibration.share <= 0.25
    assert calibration.eps / calibration.unit == pytest.approx(round(calibration.eps / calibration.unit / 0.1) * 0.1)
    assert list(calibration.shares) == pytest.approx(_brute_force_shares(loss, steps, calibration.grid))


def test_calibrate_eps_unreachable_target_is_a_named_error():
    steps = np.array([0, 10, 20])
    loss = np.array([[3.0, 3.0], [1.0, 2.0], [0.1, 0.2]])  # both still falling by > delta at the last step
    with pytest.raises(grokking.EpsCalibrationError, match="no eps on the grid reaches 20%"):
        grokking.calibrate_eps(loss, steps, delta=0.05)
    with pytest.raises(ValueError, match="target_fraction"):
        grokking.calibrate_eps(loss, steps, target_fraction=(0.3, 0.2))
    with pytest.raises(ValueError, match="unit"):
        grokking.calibrate_eps(loss, steps, unit="bits")


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


def test_correlation_window_from_rise_to_saturation():
    acc = np.array([0.0, 0.01, 0.0, 0.3, 0.6, 0.9, 0.97, 1.0, 1.0, 1.0])
    # rise starts at index 2 (last point at or below 0.1); 0.95 of the range is first reached at index 6
    assert grokking.correlation_window(acc) == (2, 6)
    assert grokking.correlation_window(acc, saturation_fraction=1.0) == (2, 9)
    assert grokking.correlation_window(np.full(5, 0.3)) == (-1, -1)
    metric = np.array([5, 5, 5, 4, 3, 2, 1, 1, 9, 9], float)  # rises again after saturation
    inside = grokking.window_correlations(metric, acc, 2, 6)
    assert inside["n"] == 5 and inside["pearson_r"] < -0.9
    assert grokking.window_correlations(metric, acc, 2, 9)["pearson_r"] > inside["pearson_r"]
    assert grokking.window_correlations(metric, acc, -1, -1)["n"] == 0


def test_linear_and_quadratic_trends():
    steps = np.arange(6) * 100
    trend = grokking.linear_trend(steps, 2.0 - 0.003 * steps + np.array([0, 0.01, -0.01, 0, 0.01, -0.01]))
    assert trend["slope"] == pytest.approx(-3.0, abs=0.1) and trend["ci95"][0] < -3.0 < trend["ci95"][1] < 0
    fit = scipy.stats.linregress(steps, 2.0 - 0.003 * steps + np.array([0, 0.01, -0.01, 0, 0.01, -0.01]))
    assert trend["slope"] == pytest.approx(fit.slope * 1000) and trend["p"] == pytest.approx(fit.pvalue)
    assert math.isnan(grokking.linear_trend(steps[:2], [1.0, 2.0])["slope"])
    quadratic = grokking.quadratic_trend(steps, 1.0 + (steps / 1000.0 - 0.25) ** 2)
    assert quadratic["coefficients"] == pytest.approx([1.0, -0.5, 1.0625]) and quadratic["r2"] == pytest.approx(1.0)
    np.testing.assert_allclose(grokking.moving_average([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])


def test_eps_scales_with_the_average_loss_and_delta_may_scale_with_eps():
    """Issue 34, defect 6: the paper scales eps by the domain's average loss (default; the median is an
    option), and delta may be a multiple of eps instead of 0.05 nats."""
    from moe_grok.analysis.memorization import memorization
    from moe_grok.analysis.options import AnalysisOptions
    from moe_grok.analysis.run_warnings import RunWarnings

    assert AnalysisOptions().eps_unit == "mean_final_loss" and AnalysisOptions().delta_unit == "nats"
    rng = np.random.default_rng(2)
    steps = np.arange(8) * 100
    loss = 3.0 * np.exp(-rng.uniform(0.2, 2.0, 500)[None] * np.arange(8)[:, None])
    loss[:, :50] *= 20  # a skewed final loss: mean far from median
    calibration = grokking.calibrate_eps(loss, steps)
    assert calibration.unit == pytest.approx(np.mean(loss[-1])) and calibration.unit > 1.5 * np.median(loss[-1])
    scaled = grokking.calibrate_eps(loss, steps, delta=0.5, delta_unit="eps")
    assert list(scaled.shares) == pytest.approx(
        [grokking.share_memorized_before_end(loss, steps, eps, 0.5 * eps) for eps in scaled.grid])
    one = np.array([[3.0], [0.009], [0.0001], [0.0], [0.0]])  # settles below eps = 0.01 at checkpoint 1
    steps5 = steps[:5]
    for unit, delta, t_star in (("nats", 0.05, 100), ("eps", 0.5, 200)):  # delta 0.005 nats: not at 0.009
        options = AnalysisOptions(eps=0.01, delta=delta, delta_unit=unit)
        entry, found = memorization("d", one, steps5, options, RunWarnings(steps5))
        assert found.tolist() == [t_star] and entry["delta_nats"] == pytest.approx(0.05 if unit == "nats" else 0.005)
    with pytest.raises(ValueError, match="delta_unit"):
        AnalysisOptions(delta_unit="percent")
