"""Bias statistics for annotation audits (pure functions, no I/O).

Each audit turns judgments into independent yes/no observations and tests them against what
an unbiased annotator would produce, with an exact binomial test:

Position bias
    One observation per judgment: of the first two candidates *as displayed* (left and right
    in a pairwise task), did the first win? Ties and "both bad" say nothing and are left out.
    Display order is random per lease, so an unbiased annotator picks the first half of the
    time. Using only the first two shown keeps one observation per judgment, so the binomial
    test's independence holds for rankings too.
Length bias
    Same pair, when the two texts differ in length: did the longer one win? Against 0.5 —
    a significant result says length predicts the verdict, which is a bias *or* a real
    quality difference; the page shows it next to the rate by length-difference bucket.
Speed outliers
    Judgments faster than a threshold (3 s by default) per annotator, tested one-sided
    against the rate of fast judgments among everybody else. The robust z-score of the log
    time (median / MAD over the whole project) is reported alongside, for projects where a
    fixed threshold is the wrong scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ALPHA = 0.01
"""Significance level at which the page flags a result."""
FAST_MS = 3000
ROBUST_Z_FAST = -3.5
MAD_SCALE = 1.4826  # makes the MAD a consistent estimator of a normal's sigma
LENGTH_BUCKETS = (0.1, 0.25, 0.5)
"""Upper bounds of the relative length-difference buckets; the last bucket is open."""


# --- the binomial test -------------------------------------------------------------------


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )


def _tail(k: int, n: int, p: float, step: int) -> float:
    """Sum of pmf(i) for i = k, k + step, ... within [0, n], stopping once terms vanish.

    Called only in the direction where terms shrink (away from the mode), so stopping when a
    term is below 1e-17 of the running sum loses nothing measurable.
    """
    total = 0.0
    i = k
    while 0 <= i <= n:
        term = math.exp(_log_pmf(i, n, p))
        total += term
        if term < 1e-17 * total:
            break
        i += step
    return min(total, 1.0)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if k <= n * p:
        return _tail(k, n, p, -1)
    return max(0.0, 1.0 - _tail(k + 1, n, p, +1))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if k >= n * p:
        return _tail(k, n, p, +1)
    return max(0.0, 1.0 - _tail(k - 1, n, p, -1))


def binomial_test(k: int, n: int, p: float = 0.5, alternative: str = "two-sided") -> float:
    """Exact binomial test p-value for k successes in n trials.

    "two-sided" is for p = 0.5 only (the distribution is symmetric, so it is twice the
    smaller tail, as scipy.stats.binomtest computes it); "greater" is P(X >= k).
    """
    if n == 0:
        return 1.0
    if alternative == "greater":
        return binomial_sf(k, n, p)
    if alternative == "less":
        return binomial_cdf(k, n, p)
    if alternative != "two-sided" or p != 0.5:
        raise ValueError("two-sided test is implemented for p = 0.5 only")
    if 2 * k == n:
        return 1.0
    return min(1.0, 2.0 * min(binomial_cdf(k, n, p), binomial_sf(k, n, p)))


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well behaved near 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    phat = k / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# --- audits -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proportion:
    """k of n observations were "yes", tested against `null`."""

    k: int
    n: int
    null: float
    p_value: float
    low: float
    high: float

    @property
    def rate(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def significant(self) -> bool:
        return self.n > 0 and self.p_value < ALPHA


def proportion(k: int, n: int, null: float = 0.5, alternative: str = "two-sided") -> Proportion:
    low, high = wilson_interval(k, n)
    return Proportion(k, n, null, binomial_test(k, n, null, alternative), low, high)


def position_bias(first_won: Iterable[bool]) -> Proportion:
    """How often the first-displayed candidate won, tested two-sided against one half."""
    k = n = 0
    for won in first_won:
        n += 1
        k += bool(won)
    return proportion(k, n)


@dataclass(frozen=True)
class LengthBias:
    longer_wins: Proportion
    buckets: list[tuple[str, Proportion]]
    """Longer-wins rate by relative length difference |a - b| / max(a, b)."""


class LengthCounts:
    """Longer-wins counts, overall and by relative length-difference bucket, filled one
    observation at a time (a report over millions of judgments keeps only these counters)."""

    def __init__(self) -> None:
        self.k = 0
        self.n = 0
        self.buckets = [[0, 0] for _ in range(len(LENGTH_BUCKETS) + 1)]

    def add(self, first: int, second: int, first_won: bool) -> None:
        """Lengths of the first and second candidate and whether the first won; equal
        lengths carry no information about length and are left out."""
        if first == second:
            return
        longer_won = first_won == (first > second)
        relative = abs(first - second) / max(first, second)
        bucket = next(
            (i for i, bound in enumerate(LENGTH_BUCKETS) if relative < bound), len(LENGTH_BUCKETS)
        )
        self.buckets[bucket][0] += longer_won
        self.buckets[bucket][1] += 1
        self.k += longer_won
        self.n += 1

    def result(self) -> LengthBias:
        labels = []
        low = 0.0
        for bound in LENGTH_BUCKETS:
            labels.append(f"{low:.0%}–{bound:.0%}")
            low = bound
        labels.append(f"≥{low:.0%}")
        return LengthBias(
            longer_wins=proportion(self.k, self.n),
            buckets=[
                (label, proportion(k, n))
                for label, (k, n) in zip(labels, self.buckets, strict=True)
            ],
        )


def length_bias(observations: Iterable[tuple[int, int, bool]]) -> LengthBias:
    """Length audit of (length of the first, length of the second, first won) observations."""
    counts = LengthCounts()
    for first, second, first_won in observations:
        counts.add(first, second, first_won)
    return counts.result()


def median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass(frozen=True)
class Speed:
    """One annotator's judgment times against everybody else's."""

    n: int
    median_ms: float | None
    fast: Proportion
    """Judgments under the threshold, tested one-sided against the others' rate."""
    robust_outliers: int
    """Judgments whose robust z-score of log time is below ROBUST_Z_FAST."""


def robust_scale(times_ms: Iterable[int]) -> tuple[float, float] | None:
    """(median, MAD * 1.4826) of log(time); None when there are too few or no spread."""
    logs = [math.log(max(t, 1)) for t in times_ms]
    if len(logs) < 3:
        return None
    centre = median(logs)
    assert centre is not None
    spread = median([abs(x - centre) for x in logs])
    if not spread:
        return None
    return centre, spread * MAD_SCALE


def speed(per_annotator: dict[str, list[int]], *, fast_ms: int = FAST_MS) -> dict[str, Speed]:
    """Speed audit per annotator from their judgment times in milliseconds."""
    fast_counts = {
        who: sum(1 for t in times if t < fast_ms) for who, times in per_annotator.items()
    }
    total_fast = sum(fast_counts.values())
    total = sum(len(t) for t in per_annotator.values())
    scale = robust_scale(t for times in per_annotator.values() for t in times)
    out = {}
    for who, times in per_annotator.items():
        others_n = total - len(times)
        others_fast = total_fast - fast_counts[who]
        # The others' rate, kept off 0 and 1 so one fast judgment is not infinitely surprising.
        base = (others_fast + 0.5) / (others_n + 1) if others_n else 0.5
        robust = 0
        if scale is not None:
            centre, sigma = scale
            robust = sum(1 for t in times if (math.log(max(t, 1)) - centre) / sigma < ROBUST_Z_FAST)
        out[who] = Speed(
            n=len(times),
            median_ms=median(times),
            fast=proportion(fast_counts[who], len(times), base, "greater"),
            robust_outliers=robust,
        )
    return out
