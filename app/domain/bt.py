"""Bradley–Terry strengths of completion sources, with bootstrap intervals (pure Python).

Which model or policy wins? Each source ``i`` gets a strength ``theta_i`` with
``P(i beats j) = 1 / (1 + exp(theta_j - theta_i))``. The fit is Hunter's (2004) MM algorithm
on the win counts, with a weak prior of ``PRIOR_WINS`` wins each way between every two
sources: it keeps strengths finite when a source never loses (or never wins) and shrinks
poorly measured ones towards the rest. A tie counts half a win each way. Strengths are
centred to mean 0.

Intervals come from a percentile bootstrap over *judgments* (not pairs: a ranking's pairs
share one annotator's verdict and are not independent). Judgments are aggregated into
distinct "signatures" (the source comparisons one judgment makes), so a replicate draws a
multinomial over the signatures instead of touching every judgment: fast for millions.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PRIOR_WINS = 0.5
REPLICATES = 200
LEVEL = 0.95

Comparison = tuple[str, str, float]
"""(winner source, loser source, weight): weight 1 for a win, 0.5 for each side of a tie."""
Signature = tuple[Comparison, ...]
"""The comparisons one judgment makes, in a canonical order."""


@dataclass(frozen=True)
class Strength:
    source: str
    theta: float
    low: float
    high: float
    wins: float
    comparisons: float


def fit(
    wins: Mapping[tuple[str, str], float],
    sources: Sequence[str] | None = None,
    *,
    prior: float = PRIOR_WINS,
    max_iter: int = 10_000,
    tol: float = 1e-10,
) -> dict[str, float]:
    """Centred log-strengths from ``wins[(winner, loser)]`` (weights may be fractional)."""
    names = sorted(set(sources or ()) | {s for pair in wins for s in pair})
    if not names:
        return {}
    if len(names) == 1:
        return {names[0]: 0.0}
    w: dict[str, float] = defaultdict(float)
    n: dict[tuple[str, str], float] = defaultdict(float)
    for (winner, loser), count in wins.items():
        if winner == loser or count <= 0:
            continue
        w[winner] += count
        n[(winner, loser)] += count
        n[(loser, winner)] += count
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            w[a] += prior
            w[b] += prior
            n[(a, b)] += 2 * prior
            n[(b, a)] += 2 * prior
    gamma = {s: 1.0 for s in names}
    for _ in range(max_iter):
        new = {}
        for a in names:
            denom = sum(n[(a, b)] / (gamma[a] + gamma[b]) for b in names if b != a)
            new[a] = w[a] / denom
        log_mean = sum(math.log(g) for g in new.values()) / len(names)
        new = {s: g / math.exp(log_mean) for s, g in new.items()}
        change = max(abs(math.log(new[s] / gamma[s])) for s in names)
        gamma = new
        if change < tol:
            break
    return {s: math.log(g) for s, g in gamma.items()}


def win_probability(theta_a: float, theta_b: float) -> float:
    return 1.0 / (1.0 + math.exp(theta_b - theta_a))


def _wins(signatures: Mapping[Signature, int]) -> dict[tuple[str, str], float]:
    wins: dict[tuple[str, str], float] = defaultdict(float)
    for signature, count in signatures.items():
        for winner, loser, weight in signature:
            wins[(winner, loser)] += weight * count
    return wins


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A Binomial(n, p) draw from `rng` (Python 3.11's random has none).

    Exact (Devroye's waiting-time method) while n·p is small; a rounded normal above that,
    where its error is far below a bootstrap's own noise.
    """
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1.0 - p)
    if n * p < 30:
        q = -math.log1p(-p)
        x, total = 0, 0.0
        while True:
            total += -math.log(1.0 - rng.random()) / (n - x)
            if total > q:
                return x
            x += 1
            if x == n:
                return n
    draw = round(rng.gauss(n * p, math.sqrt(n * p * (1 - p))))
    return min(n, max(0, draw))


def multinomial(rng: random.Random, n: int, weights: Sequence[int]) -> list[int]:
    """Counts of n draws over categories with the given (integer) weights."""
    left, mass = n, float(sum(weights))
    out = []
    for weight in weights:
        if left == 0 or mass <= 0:
            out.append(0)
            continue
        drawn = binomial(rng, left, min(1.0, weight / mass))
        out.append(drawn)
        left -= drawn
        mass -= weight
    return out


def strengths(
    signatures: Mapping[Signature, int],
    *,
    rng: random.Random,
    replicates: int = REPLICATES,
    level: float = LEVEL,
) -> list[Strength]:
    """Fit on all judgments, bootstrap the interval; strongest first."""
    wins = _wins(signatures)
    names = sorted({s for pair in wins for s in pair})
    if not names:
        return []
    theta = fit(wins, names)
    keys = sorted(signatures)
    counts = [signatures[k] for k in keys]
    total = sum(counts)
    draws: dict[str, list[float]] = {s: [] for s in names}
    for _ in range(replicates if len(names) > 1 else 0):
        resampled = multinomial(rng, total, counts)
        replicate = fit(_wins({k: c for k, c in zip(keys, resampled, strict=True) if c}), names)
        for s in names:
            draws[s].append(replicate[s])
    won: dict[str, float] = defaultdict(float)
    played: dict[str, float] = defaultdict(float)
    for (winner, loser), count in wins.items():
        won[winner] += count
        played[winner] += count
        played[loser] += count
    out = []
    for s in names:
        low, high = _percentiles(draws[s], level) if draws[s] else (theta[s], theta[s])
        out.append(Strength(s, theta[s], low, high, won[s], played[s]))
    return sorted(out, key=lambda x: (-x.theta, x.source))


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    ordered = sorted(values)
    tail = (1.0 - level) / 2.0

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return at(tail), at(1.0 - tail)


def signature(comparisons: Sequence[Comparison]) -> Signature:
    """The canonical (sorted) form of one judgment's comparisons."""
    return tuple(sorted(comparisons))
