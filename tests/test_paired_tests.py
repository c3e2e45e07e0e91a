"""The paired tests behind every "better/worse than the baseline" call, checked against scipy."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.quality import (
    MCNEMAR_EXACT_MAX,
    SIGN_FLIP_EXACT_MAX_N,
    SIGNIFICANCE,
    mcnemar_test,
    sign_flip_test,
)

stats = pytest.importorskip("scipy.stats")


def scipy_sign_flip(diffs, resamples):
    return stats.permutation_test((np.asarray(diffs),), np.mean, permutation_type="samples",
                                  n_resamples=resamples, alternative="two-sided", random_state=0).pvalue


def test_three_pairs_can_never_go_below_a_quarter():
    result = sign_flip_test([0.3, 0.1, 0.2])
    # 2^3 sign patterns; only all-plus and all-minus are as extreme: 2/8 (the bootstrap said 0.0005)
    assert result.test == "sign-flip-exact"
    assert result.p_value == pytest.approx(0.25) == pytest.approx(scipy_sign_flip([0.3, 0.1, 0.2], 10**6))
    assert result.resolution == pytest.approx(0.25)
    assert result.ci95_low is None and result.ci95_high is None  # no shift is ever rejected


@pytest.mark.parametrize("n", [5, 10])
def test_exact_sign_flip_equals_scipy(n):
    rng = np.random.default_rng(n)
    for shift in (0.0, 0.5, 1.5):
        diffs = list(rng.normal(shift, 1.0, n))
        result = sign_flip_test(diffs)
        assert result.test == "sign-flip-exact" and n <= SIGN_FLIP_EXACT_MAX_N
        assert result.p_value == pytest.approx(scipy_sign_flip(diffs, 10**6), rel=1e-12)
        assert result.p_value >= result.resolution == pytest.approx(2 / 2**n)


def test_the_issue_example_agrees_with_a_t_test_in_size():
    diffs = [1, -0.2, 0.9, 0.5, 0.7]
    result = sign_flip_test(diffs)
    assert result.p_value == pytest.approx(0.125)  # exact: 4 of 32 patterns at least as extreme
    assert stats.ttest_1samp(diffs, 0).pvalue == pytest.approx(0.0529, abs=1e-3)  # same order, not 0.003


def test_monte_carlo_sign_flip_at_200_pairs():
    rng = np.random.default_rng(200)
    for shift in (0.0, 0.2):
        diffs = list(rng.normal(shift, 1.0, 200))
        result = sign_flip_test(diffs)
        assert result.test == "sign-flip-monte-carlo"
        assert result.resolution == pytest.approx(1 / 10_001) and result.p_value >= result.resolution
        reference = scipy_sign_flip(diffs, 100_000)
        # Monte-Carlo error of p at B = 10,000: sqrt(p (1 - p) / B) <= 0.005
        assert abs(result.p_value - reference) < 4 * max(0.005 * np.sqrt(reference), 2e-4)
        t_test = stats.ttest_1samp(diffs, 0)
        assert abs(result.p_value - t_test.pvalue) < 0.02  # at n = 200 the t-test is a fair guide
        low, high = result.ci95_low, result.ci95_high
        t_low, t_high = t_test.confidence_interval()
        assert low == pytest.approx(t_low, abs=0.02) and high == pytest.approx(t_high, abs=0.02)


@pytest.mark.parametrize("n", [10, 40, 200])
def test_the_interval_agrees_with_the_test(n):
    rng = np.random.default_rng(7 + n)
    for shift in np.linspace(0, 1.2, 7):
        diffs = list(rng.normal(shift, 1.0, n))
        result = sign_flip_test(diffs)
        inside = result.ci95_low <= 0.0 <= result.ci95_high
        assert inside == (result.p_value >= SIGNIFICANCE), (shift, result)
        # the interval's ends are where the test on the shifted differences starts rejecting
        # (just inside: not rejected; just outside: rejected)
        for end, outward in ((result.ci95_low, -1e-6), (result.ci95_high, 1e-6)):
            assert sign_flip_test([d - end + outward for d in diffs]).p_value >= SIGNIFICANCE
            assert sign_flip_test([d - end - outward for d in diffs]).p_value < SIGNIFICANCE


def test_mcnemar_exact_below_the_threshold_and_chi_square_above():
    for better, worse in ((0, 1), (3, 10), (12, 30), (400, 460)):
        result = mcnemar_test(better, worse)
        assert result.test == "mcnemar-exact"
        assert result.p_value == pytest.approx(stats.binomtest(better, better + worse).pvalue, rel=1e-9)
        assert result.resolution == pytest.approx(min(1.0, 2 * 0.5 ** (better + worse)))
    better, worse = 480, 560
    assert better + worse > MCNEMAR_EXACT_MAX
    result = mcnemar_test(better, worse)
    chi2 = (abs(better - worse) - 1) ** 2 / (better + worse)
    assert result.test == "mcnemar-chi2-cc"
    assert result.p_value == pytest.approx(stats.chi2.sf(chi2, 1), rel=1e-9)
    assert result.p_value == pytest.approx(stats.binomtest(better, better + worse).pvalue, rel=0.01)
