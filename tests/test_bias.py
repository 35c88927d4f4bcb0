"""Bias statistics: exact binomial tests by hand, and planted biases found (p < 0.01) while
unbiased synthetic data is not flagged."""

from __future__ import annotations

import math
import random

import pytest

from app.domain import bias

# --- the binomial test -------------------------------------------------------------------


def test_binomial_test_by_hand() -> None:
    # 0 of 5: P(X = 0) = 1/32, two-sided = 2/32.
    assert bias.binomial_test(0, 5) == pytest.approx(2 / 32)
    # 9 of 10: P(X >= 9) = (10 + 1)/1024, two-sided = 22/1024.
    assert bias.binomial_test(9, 10) == pytest.approx(22 / 1024)
    assert bias.binomial_test(1, 10) == pytest.approx(22 / 1024)  # symmetric
    assert bias.binomial_test(5, 10) == 1.0
    assert bias.binomial_test(0, 0) == 1.0
    # One-sided: P(X >= 3) for Binomial(4, 0.5) = (4 + 1)/16.
    assert bias.binomial_test(3, 4, 0.5, "greater") == pytest.approx(5 / 16)
    # P(X >= 2) for Binomial(3, 0.1) = 3 * 0.01 * 0.9 + 0.001 = 0.028.
    assert bias.binomial_test(2, 3, 0.1, "greater") == pytest.approx(0.028)
    with pytest.raises(ValueError):
        bias.binomial_test(2, 3, 0.3)


def test_binomial_test_large_n_agrees_with_the_normal_tail() -> None:
    # 5200 of 10,000 is 4 standard deviations out; the exact two-sided p is close to the
    # normal's 2 * (1 - Phi(4 - continuity)) ~ 6.7e-5.
    p = bias.binomial_test(5200, 10_000)
    z = (5200 - 0.5 - 5000) / 50
    normal = math.erfc(z / math.sqrt(2))
    assert p == pytest.approx(normal, rel=0.05)
    assert bias.binomial_cdf(4999, 10_000, 0.5) + bias.binomial_sf(5000, 10_000, 0.5) == (
        pytest.approx(1.0)
    )


def test_wilson_interval() -> None:
    low, high = bias.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert bias.wilson_interval(0, 10)[0] == 0.0
    assert bias.wilson_interval(0, 0) == (0.0, 1.0)


# --- planted biases ---------------------------------------------------------------------


def _flips(n: int, p: float, seed: int) -> list[bool]:
    rng = random.Random(seed)
    return [rng.random() < p for _ in range(n)]


def test_planted_position_bias_is_detected() -> None:
    result = bias.position_bias(_flips(400, 0.65, seed=11))
    assert result.p_value < 0.01 and result.significant
    assert result.rate is not None and 0.58 < result.rate < 0.72
    assert result.low < result.rate < result.high


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_unbiased_position_is_not_flagged(seed: int) -> None:
    result = bias.position_bias(_flips(400, 0.5, seed=seed))
    assert result.p_value > 0.01 and not result.significant


def _length_data(n: int, longer_wins: float, seed: int) -> list[tuple[int, int, bool]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(20, 400), rng.randint(20, 400)
        longer_is_first = a > b
        longer_won = rng.random() < longer_wins
        rows.append((a, b, longer_won == longer_is_first))
    return rows


def test_planted_length_bias_is_detected() -> None:
    result = bias.length_bias(_length_data(300, 0.7, seed=4))
    assert result.longer_wins.p_value < 0.01 and result.longer_wins.significant
    assert [label for label, _ in result.buckets] == ["0%–10%", "10%–25%", "25%–50%", "≥50%"]
    assert sum(p.n for _, p in result.buckets) == result.longer_wins.n


def test_unbiased_length_is_not_flagged() -> None:
    result = bias.length_bias(_length_data(300, 0.5, seed=5))
    assert not result.longer_wins.significant


def test_length_bias_counts_by_hand() -> None:
    counts = bias.LengthCounts()
    counts.add(100, 100, True)  # equal: no information, left out
    counts.add(200, 100, True)  # longer first and won: relative 0.5 -> "≥50%"
    counts.add(100, 105, True)  # shorter first won: relative ~0.048 -> "0%–10%", longer lost
    counts.add(80, 100, False)  # longer second won: relative 0.2 -> "10%–25%"
    result = counts.result()
    assert (result.longer_wins.k, result.longer_wins.n) == (2, 3)
    assert [(p.k, p.n) for _, p in result.buckets] == [(0, 1), (1, 1), (0, 0), (1, 1)]


def test_planted_fast_annotator_is_flagged_and_others_are_not() -> None:
    rng = random.Random(9)

    def times(n: int, fast_share: float) -> list[int]:
        return [
            rng.randint(600, 2500) if rng.random() < fast_share else rng.randint(6000, 40000)
            for _ in range(n)
        ]

    result = bias.speed(
        {"rusher": times(80, 0.4), "careful": times(200, 0.02), "steady": times(200, 0.02)}
    )
    assert result["rusher"].fast.p_value < 0.01 and result["rusher"].fast.significant
    assert not result["careful"].fast.significant
    assert not result["steady"].fast.significant
    assert result["rusher"].median_ms is not None
    assert result["careful"].median_ms is not None and result["careful"].median_ms > 6000


def test_speed_counts_and_robust_outliers_by_hand() -> None:
    result = bias.speed({"a": [1000, 5000, 5000, 5000], "b": [5000, 5000, 5000, 4000, 6000]})
    assert (result["a"].fast.k, result["a"].fast.n) == (1, 4)
    assert result["a"].median_ms == 5000
    assert result["b"].fast.k == 0
    # log times: median log(5000); MAD of |log t - log 5000| over the nine is 0 -> no scale.
    assert result["a"].robust_outliers == 0
    spread = bias.speed({"x": [4000, 5000, 6000, 5500, 4500, 50]})
    assert spread["x"].robust_outliers == 1  # 50 ms is far below the rest


def test_median() -> None:
    assert bias.median([3, 1, 2]) == 2
    assert bias.median([4, 1, 2, 3]) == 2.5
    assert bias.median([]) is None
