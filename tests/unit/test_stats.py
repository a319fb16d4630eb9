"""Means with 95% Student-t intervals over seeds (align.stats), against hand-computed and published values."""

from __future__ import annotations

import math

import pytest

from align.stats import mean_interval, t_cdf, t_quantile

# t(0.975, df), two-sided 95%: published values (e.g. NIST/SEMATECH e-Handbook table 1.3.6.7.2; scipy.stats.t.ppf)
T975 = {1: 12.706204736174698, 2: 4.302652729749464, 3: 3.182446305284263, 4: 2.7764451051977987,
        9: 2.2621571627409915, 29: 2.045229642132703, 100: 1.9839715184496334}


@pytest.mark.parametrize(("df", "expected"), T975.items())
def test_t_quantile_matches_published_values(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9, abs=0)


def test_t_quantile_inverts_the_cdf_and_is_symmetric() -> None:
    for df in (1, 3, 7):
        for p in (0.6, 0.9, 0.995):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
            assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df), rel=1e-12)
    assert t_cdf(0.0, 5) == 0.5
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi
    assert t_cdf(2.5, 1) == pytest.approx(0.5 + math.atan(2.5) / math.pi, abs=1e-13)


def test_interval_of_one_to_five_by_hand() -> None:
    interval = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3; sample variance (4 + 1 + 0 + 1 + 4) / 4 = 2.5; half-width t(0.975, 4) * sqrt(2.5) / sqrt(5)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.n == 5 and interval.mean == 3.0
    assert interval.std == pytest.approx(math.sqrt(2.5), rel=1e-15)
    assert interval.half_width == pytest.approx(half, rel=1e-9)
    assert interval.half_width == pytest.approx(1.9632, abs=1e-4)  # 2.776 * 0.7071
    assert (interval.low, interval.high) == pytest.approx((3 - half, 3 + half), rel=1e-9)


def test_interval_of_two_and_of_identical_values() -> None:
    two = mean_interval([0.5, 0.7])  # s = 0.1 * sqrt(2); half = 12.706 * s / sqrt(2) = 1.2706
    assert two.mean == pytest.approx(0.6, abs=1e-15)
    assert two.half_width == pytest.approx(12.706204736174698 * 0.1, rel=1e-9)
    same = mean_interval([0.25, 0.25, 0.25])
    assert same.mean == 0.25 and same.half_width == 0.0


def test_one_value_has_no_interval_and_bad_input_is_refused() -> None:
    one = mean_interval([0.4])
    assert (one.n, one.mean, one.std, one.half_width, one.low, one.high) == (1, 0.4, None, None, None, None)
    assert one.as_dict() == {"n": 1, "mean": 0.4, "std": None, "half_width": None, "low": None, "high": None}
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)
