"""analysis.statistics against scipy and closed forms."""
import math

import numpy as np
import pytest
import scipy.stats

from moe_grok.analysis import statistics


def test_pearson_spearman_matches_scipy_and_is_nan_when_undefined():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=12), rng.normal(size=12)
    result = statistics.pearson_spearman(x, y)
    pearson, spearman = scipy.stats.pearsonr(x, y), scipy.stats.spearmanr(x, y)
    assert result == {"pearson_r": pytest.approx(pearson.statistic), "pearson_p": pytest.approx(pearson.pvalue),
                      "spearman_r": pytest.approx(spearman.statistic), "spearman_p": pytest.approx(spearman.pvalue),
                      "n": 12}
    assert math.isnan(statistics.pearson_spearman(x[:2], y[:2])["pearson_r"])
    assert math.isnan(statistics.pearson_spearman(np.ones(5), y[:5])["spearman_r"])


def test_pearson_r_skips_non_finite_pairs():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 7.0])
    y = np.array([2.0, 1.0, 3.0, np.inf, 6.0, 5.0])
    keep = np.isfinite(x) & np.isfinite(y)
    assert statistics.pearson_r(x, y) == pytest.approx(scipy.stats.pearsonr(x[keep], y[keep]).statistic)
    assert math.isnan(statistics.pearson_r([1.0, 2.0, np.nan], [1.0, 2.0, 3.0]))


def test_partial_correlation_equals_direct_least_squares():
    rng = np.random.default_rng(3)
    controls = rng.normal(size=(30, 2))
    x = controls @ [1.0, -2.0] + rng.normal(size=30)
    y = controls @ [0.5, 1.0] + 0.7 * x + rng.normal(size=30)
    design = np.column_stack([np.ones(30), controls])
    residual = lambda v: v - design @ np.linalg.solve(design.T @ design, design.T @ v)  # noqa: E731
    expected = np.corrcoef(residual(x), residual(y))[0, 1]
    result = statistics.partial_correlation(x, y, controls)
    assert result["r"] == pytest.approx(expected) and result["n"] == 30
    t = expected * np.sqrt(26 / (1 - expected**2))
    assert result["p"] == pytest.approx(2 * scipy.stats.t.sf(abs(t), 26))
    # a metric that is a function of the controls alone has no partial correlation left
    assert math.isnan(statistics.partial_correlation(controls @ [1.0, 1.0], y, controls)["r"])
    assert math.isnan(statistics.partial_correlation(x[:4], y[:4], controls[:4])["r"])


def test_fisher_interval_is_the_z_transform_interval():
    low, high = statistics.fisher_interval(0.6, 28)
    half = scipy.stats.norm.ppf(0.975) / 5.0
    assert (low, high) == pytest.approx((np.tanh(np.arctanh(0.6) - half), np.tanh(np.arctanh(0.6) + half)))
    assert all(np.isnan(statistics.fisher_interval(0.5, 3))) and all(np.isnan(statistics.fisher_interval(np.nan, 9)))


def test_mean_ci_is_scipy_t_interval():
    values = [1.0, 2.5, 3.0, 4.5, np.nan, None]
    result = statistics.mean_ci(values)
    finite = np.array([1.0, 2.5, 3.0, 4.5])
    low, high = scipy.stats.t.interval(0.95, 3, loc=finite.mean(), scale=scipy.stats.sem(finite))
    assert result["n"] == 4 and result["mean"] == pytest.approx(finite.mean())
    assert result["ci95"] == pytest.approx([low, high])
    assert statistics.mean_ci([2.0])["n"] == 1 and all(np.isnan(statistics.mean_ci([2.0])["ci95"]))
    assert statistics.t_half_width(2.0, 10, 0.9) == pytest.approx(2.0 * scipy.stats.t.ppf(0.95, 10))


def test_wilson_interval_matches_the_score_interval():
    # Reference values: Wilson (1927) score interval, z = 1.959964.
    assert statistics.wilson_interval(5, 10) == pytest.approx([0.236593, 0.763407], abs=1e-6)
    low, high = statistics.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.277533, abs=1e-6)
    assert statistics.wilson_interval(10, 10) == pytest.approx([0.722467, 1.0], abs=1e-6)
    # a share of 0 or 1 still has a proper interval inside [0, 1]; it narrows with n
    assert statistics.wilson_interval(3, 100)[1] - statistics.wilson_interval(3, 100)[0] < 0.1
    assert all(np.isnan(statistics.wilson_interval(0, 0)))
    with pytest.raises(ValueError):
        statistics.wilson_interval(11, 10)


def test_intervals_across_seeds_stay_in_their_range():
    """Issue 34, defect 4: a t interval over correlations leaves [-1, 1] (the old summary gave +1.25
    here); Fisher's z, Wilson and the clipped t interval do not."""
    from moe_grok.studies import protocol_stats

    r = [0.99, 0.5, 0.95, 0.2]
    assert statistics.mean_ci(r)["ci95"][1] > 1  # the defect: the plain t interval
    fisher = protocol_stats.summarize("r_distance", r)
    z = np.arctanh(r)
    half = scipy.stats.t.ppf(0.975, 3) * z.std(ddof=1) / 2
    assert fisher["mean"] == pytest.approx(np.tanh(z.mean()))
    assert fisher["ci95"] == pytest.approx([np.tanh(z.mean() - half), np.tanh(z.mean() + half)])
    assert -1 < fisher["ci95"][0] < fisher["ci95"][1] < 1
    groks = protocol_stats.summarize("groks", [1, 1, 1, 1, 1, 1, 1, 0])
    assert groks["mean"] == 0.875 and groks["ci95"] == pytest.approx(statistics.wilson_interval(7, 8))
    assert groks["ci95"][1] <= 1 and statistics.mean_ci([1, 1, 1, 1, 1, 1, 1, 0])["ci95"][1] > 1
    margin = protocol_stats.summarize("h2_distance_margin_over_loss", [0.9, 0.95, 0.1])
    assert margin["ci95"][1] == 1.0 and margin["clipped"] and margin["interval"] == "t_clipped"
    signed = protocol_stats.summarize("h2_distance_signed_margin_over_loss", [-1.9, -1.95, -0.1])
    assert signed["ci95"][0] == -2.0
    assert protocol_stats.summarize("h1_distance_slope", [1.0, 2.0])["interval"] == "t"


def test_fisher_z_difference_is_welchs_interval_on_the_z_values():
    a, b = [0.9, 0.8, 0.95, np.nan, 0.7], [0.2, -0.1, 0.4, 0.3, None, 0.5, 0.1]
    za, zb = np.arctanh([0.9, 0.8, 0.95, 0.7]), np.arctanh([0.2, -0.1, 0.4, 0.3, 0.5, 0.1])
    welch = scipy.stats.ttest_ind(za, zb, equal_var=False)
    result = statistics.fisher_z_difference(a, b)
    assert result["n"] == [4, 6] and result["mean"] == pytest.approx(za.mean() - zb.mean())
    assert result["ci95"] == pytest.approx(list(welch.confidence_interval(0.95)))
    assert statistics.fisher_z_difference(a, b, 0.9)["ci95"][1] < result["ci95"][1]
    one = statistics.fisher_z_difference([0.5], b)
    assert one["n"] == [1, 6] and np.isnan(one["mean"]) and all(np.isnan(one["ci95"]))
    # r = +-1 stays finite (clipped), as in fisher_mean_ci
    assert np.isfinite(statistics.fisher_z_difference([1.0, 0.9], [-1.0, 0.0])["mean"])
