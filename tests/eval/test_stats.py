"""Bootstrap CIs and paired tests (emma.eval.stats) checked against known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emma.eval.stats import (
    PairedComparison,
    bootstrap_ci,
    bootstrap_cis,
    bootstrap_distribution,
    paired_bootstrap,
    permutation_test,
)


def bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_bootstrap_ci_of_bernoulli_07() -> None:
    x = bernoulli(0.7, 1000, seed=123)
    lo, hi = bootstrap_ci(x)
    assert lo < 0.7 < hi
    assert lo < x.mean() < hi
    expected_half = 1.96 * math.sqrt(0.21 / 1000)
    half = (hi - lo) / 2
    assert abs(half - expected_half) / expected_half < 0.15


def test_bootstrap_ci_is_seeded_and_level_matters() -> None:
    x = bernoulli(0.3, 500, seed=5)
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1)
    assert bootstrap_ci(x, seed=1) != bootstrap_ci(x, seed=2)
    lo90, hi90 = bootstrap_ci(x, level=0.90)
    lo99, hi99 = bootstrap_ci(x, level=0.99)
    assert hi99 - lo99 > hi90 - lo90


def test_bootstrap_coverage_of_normal_mean() -> None:
    """Over 200 independent samples, the 95% CI of the mean covers the true mean about 95% of the time."""
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        x = rng.normal(2.0, 1.0, 200)
        lo, hi = bootstrap_ci(x, n_resamples=500, seed=i)
        covered += lo <= 2.0 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_other_statistics_and_edge_cases() -> None:
    x = np.arange(101, dtype=float)
    lo, hi = bootstrap_ci(x, stat=np.median)
    assert lo < 50 < hi
    # a callable without an axis argument still works (row by row)
    lo2, hi2 = bootstrap_ci(x, stat=lambda v: float(np.max(v) - np.min(v)), n_resamples=50)
    assert lo2 <= hi2 <= 100
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert bootstrap_ci([0.4]) == (0.4, 0.4)
    for bad in ([], [np.nan, 1.0], [[1.0, 2.0]]):
        with pytest.raises(ValueError):
            bootstrap_ci(bad)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], level=1.5)
    assert bootstrap_distribution([0.0, 1.0], n_resamples=7).shape == (7,)


def test_bootstrap_large_sample_is_chunked_and_fast() -> None:
    x = bernoulli(0.5, 100_000, seed=9)
    lo, hi = bootstrap_ci(x, n_resamples=300)
    assert lo < x.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * math.sqrt(0.25 / 100_000), rel=0.25)


def test_bootstrap_cis_per_metric() -> None:
    out = bootstrap_cis({"a": [1.0, 1.0], "b": bernoulli(0.5, 200, 1), "none": []}, n_resamples=100)
    assert set(out) == {"a", "b"}
    assert out["a"] == (1.0, 1.0)


def test_paired_bootstrap_detects_a_real_difference() -> None:
    rng = np.random.default_rng(3)
    a = (rng.random(800) < 0.60).astype(float)
    flip = rng.random(800) < 0.15  # b: a with 15% of wrong answers fixed -> +~6 points
    b = np.where(flip, 1.0, a)
    r = paired_bootstrap(a, b)
    assert isinstance(r, PairedComparison)
    assert r.delta == pytest.approx(b.mean() - a.mean())  # delta = b - a
    assert 0 < r.ci_low < r.delta < r.ci_high
    assert r.p_value < 0.01
    assert r.as_dict()["ci"] == [r.ci_low, r.ci_high]
    # the reversed comparison mirrors it
    rev = paired_bootstrap(b, a)
    assert rev.delta == pytest.approx(-r.delta)
    assert rev.ci_high < 0


def test_paired_bootstrap_is_paired() -> None:
    """Two highly correlated runs: the paired CI is much narrower than the unpaired difference's."""
    rng = np.random.default_rng(4)
    a = rng.normal(0.5, 0.2, 500)
    b = a + rng.normal(0.01, 0.01, 500)
    r = paired_bootstrap(a, b)
    unpaired_half = 1.96 * math.sqrt(a.var() / 500 + b.var() / 500)
    assert (r.ci_high - r.ci_low) / 2 < unpaired_half / 5
    assert r.ci_low > 0


def test_paired_tests_on_identical_runs() -> None:
    a = bernoulli(0.5, 300, 7)
    r = paired_bootstrap(a, a.copy())
    assert (r.delta, r.ci_low, r.ci_high, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert permutation_test(a, a.copy()) == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 0.0], [1.0])


def test_permutation_test_p_values() -> None:
    rng = np.random.default_rng(11)
    a = (rng.random(500) < 0.5).astype(float)
    b = np.where(rng.random(500) < 0.2, 1.0, a)
    assert permutation_test(a, b, n_resamples=2000) < 0.01
    # under the null (exchangeable pairs), p-values are roughly uniform: few below 0.05
    small = 0
    for i in range(40):
        x = (rng.random(200) < 0.5).astype(float)
        y = (rng.random(200) < 0.5).astype(float)
        small += permutation_test(x, y, n_resamples=500, seed=i) < 0.05
    assert small <= 7
    # a generic statistic goes through the swap path and agrees with the mean fast path
    p_mean = permutation_test(a, b, n_resamples=1000, seed=2)
    p_generic = permutation_test(
        a, b, stat=lambda v, axis=None: np.mean(v, axis=axis), n_resamples=1000, seed=2
    )
    assert p_generic < 0.01 and p_mean < 0.01
    # one pair differing by 1: every relabeling gives |T*| = |T|, so p = 1 exactly
    p = permutation_test([0.0], [1.0], n_resamples=4000, seed=0)
    assert p == pytest.approx(1.0, abs=1e-9)


def test_bootstrap_mean_ci_level_shortcut_matches_the_index_bootstrap() -> None:
    from emma.eval.stats import DIRECT_BOOTSTRAP_LIMIT, bootstrap_ci, bootstrap_mean_ci

    rng = np.random.default_rng(1)
    values = (rng.random(50_000) < 0.7).astype(float)
    assert values.size * 1000 > DIRECT_BOOTSTRAP_LIMIT  # the shortcut path is taken
    fast = bootstrap_mean_ci(values, n_resamples=1000, seed=0)
    direct = bootstrap_ci(values, n_resamples=1000, seed=0)
    half = 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / values.size)
    assert fast[0] < values.mean() < fast[1]
    assert abs((fast[1] - fast[0]) / 2 - half) < 0.15 * half
    assert np.allclose(fast, direct, atol=0.2 * half)
    small = values[:500]
    assert bootstrap_mean_ci(small, n_resamples=500, seed=3) == bootstrap_ci(small, n_resamples=500, seed=3)
