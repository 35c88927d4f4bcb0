"""Win rates of a new policy against a baseline, from people's judgments and from a reward model.

An outcome is one comparison of a new policy's completion with a baseline's completion (the
parent policy's, or the first policy's) as one person judged it: a win, a loss or a tie. A
pairwise judgment gives one outcome; a ranking judgment gives one for every (new, baseline)
pair of completions it orders (app.domain.rankings: tie groups, best first). "Both bad" is a
tie: the person saw no difference worth stating.

The rate counts a tie as half a win, so 5 wins, 3 losses and 2 ties is (5 + 1) / 10 = 0.6.

The interval is Wilson's score interval at 95% on n = wins + losses + ties, with the
half-counted ties as the successes. Chosen over a bootstrap clustered by prompt because it is
closed-form (the page and the API give the same numbers on every call, with no seed to carry
around), it stays inside [0, 1] and keeps honest width at the small n of an early iteration
(10-50 judgments), where the normal approximation's interval collapses to a point at 0 or 1
judgments won. Its known blind spot: it treats the outcomes as independent, while several
judgments of one prompt are correlated; with a few judgments per prompt, as here, the
interval is somewhat too narrow rather than wrong in direction.

The verdict decides what the loop does with a policy. "worse" — the whole interval is below
one half, on at least `min_judgments` outcomes — takes the policy out of the chain (the next
PPO run starts from an earlier one); so a policy is never rejected on a handful of clicks.
"better" — the interval is above one half — and otherwise "undecided".

The reward model's predicted win rate is the mean of sigmoid(r_new − r_baseline) over the
same pairs (the Bradley–Terry probability the reward model gives the new completion): next to
the human rate it shows over-optimisation, the proxy rising while people's rate falls.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Z95 = 1.959963984540054
"""The standard normal quantile for a two-sided 95% interval."""
MIN_JUDGMENTS = 10
"""Outcomes needed before a policy can be judged worse than its baseline."""


class Outcome(str, enum.Enum):
    """How the new completion fared against the baseline one in one judgment."""

    win = "win"
    """People put the new completion above the baseline one."""
    loss = "loss"
    """People put the baseline completion above the new one."""
    tie = "tie"
    """Same tie group (a pairwise tie or "both bad"): half a win."""


class Verdict(str, enum.Enum):
    """What the interval says about the new policy against the baseline."""

    better = "better"
    """The interval lies above one half."""
    worse = "worse"
    """The interval lies below one half, on at least the minimum number of outcomes."""
    undecided = "undecided"
    """Too few outcomes, or an interval that contains one half."""


@dataclass(frozen=True)
class WinRate:
    """People's win rate of a new policy against a baseline, with its 95% interval."""

    wins: int
    losses: int
    ties: int
    n: int
    rate: float | None  # None when n == 0, as are low and high
    low: float | None
    high: float | None
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        return {
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "n": self.n,
            "rate": self.rate,
            "low": self.low,
            "high": self.high,
            "verdict": self.verdict.value,
        }


def outcome(ranking: Sequence[Sequence[int]], new_id: int, baseline_id: int) -> Outcome | None:
    """`new_id` against `baseline_id` in one ranking (tie groups, best first); None when the
    ranking does not contain both."""
    position: dict[int, int] = {cid: rank for rank, group in enumerate(ranking) for cid in group}
    new, old = position.get(new_id), position.get(baseline_id)
    if new is None or old is None:
        return None
    if new == old:
        return Outcome.tie
    return Outcome.win if new < old else Outcome.loss


def outcomes_in(
    ranking: Sequence[Sequence[int]], new_ids: Iterable[int], baseline_ids: Iterable[int]
) -> list[tuple[int, int, Outcome]]:
    """(new id, baseline id, outcome) for every new × baseline pair the ranking orders, in
    ranking order. A completion in both sets (cannot happen for two sources) is skipped."""
    new_set, old_set = set(new_ids), set(baseline_ids)
    ranked = [cid for group in ranking for cid in group]
    found = []
    for new in ranked:
        if new not in new_set or new in old_set:
            continue
        for old in ranked:
            if old in old_set and old not in new_set:
                result = outcome(ranking, new, old)
                if result is not None:
                    found.append((new, old, result))
    return found


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of `successes` (may be fractional) out of n."""
    if n <= 0:
        raise ValueError("a Wilson interval needs n >= 1")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, not {successes}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict(
    low: float | None, high: float | None, n: int, *, min_judgments: int = MIN_JUDGMENTS
) -> Verdict:
    if low is None or high is None:
        return Verdict.undecided
    if high < 0.5 and n >= min_judgments:
        return Verdict.worse
    if low > 0.5:
        return Verdict.better
    return Verdict.undecided


def win_rate(
    outcomes: Iterable[Outcome], *, min_judgments: int = MIN_JUDGMENTS, z: float = Z95
) -> WinRate:
    """Count the outcomes (ties half) into a rate, its Wilson interval and a verdict."""
    wins = losses = ties = 0
    for result in outcomes:
        if result is Outcome.win:
            wins += 1
        elif result is Outcome.loss:
            losses += 1
        else:
            ties += 1
    n = wins + losses + ties
    if n == 0:
        return WinRate(0, 0, 0, 0, None, None, None, Verdict.undecided)
    successes = wins + ties / 2
    low, high = wilson(successes, n, z)
    return WinRate(
        wins,
        losses,
        ties,
        n,
        successes / n,
        low,
        high,
        verdict(low, high, n, min_judgments=min_judgments),
    )


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


@dataclass(frozen=True)
class Predicted:
    """A reward model's predicted win rate over some pairs; `scored` of `pairs` had scores
    for both completions (the others are left out of the mean)."""

    rate: float | None
    scored: int
    pairs: int

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "scored": self.scored, "pairs": self.pairs}


def predicted_win_rate(pairs: Sequence[tuple[int, int]], scores: Mapping[int, float]) -> Predicted:
    """Mean of sigmoid(score[new] − score[baseline]) over the (new, baseline) `pairs` whose
    two completions both have a score. A pair listed twice counts twice (one per judgment)."""
    probabilities = [
        sigmoid(scores[new] - scores[old]) for new, old in pairs if new in scores and old in scores
    ]
    rate = sum(probabilities) / len(probabilities) if probabilities else None
    return Predicted(rate, len(probabilities), len(pairs))
