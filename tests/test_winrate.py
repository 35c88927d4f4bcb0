"""Win-rate statistics on fixed inputs: outcomes from rankings, Wilson bounds, ties as half a
win, the verdict's thresholds and the reward model's predicted win rate (pure, no database)."""

from __future__ import annotations

import math

import pytest

from app.domain import winrate
from app.domain.winrate import Outcome, Verdict


def test_outcomes_from_pairwise_and_ranking_judgments() -> None:
    assert winrate.outcome([[1], [2]], 1, 2) is Outcome.win
    assert winrate.outcome([[1], [2]], 2, 1) is Outcome.loss
    assert winrate.outcome([[1, 2]], 1, 2) is Outcome.tie  # a tie, or "both bad"
    assert winrate.outcome([[1], [2]], 1, 3) is None
    # A ranking of 4: new 10 and 11 against baselines 20 and 21, 11 tied with 20.
    ranking = [[10], [11, 20], [30], [21]]
    assert winrate.outcomes_in(ranking, [10, 11], [20, 21]) == [
        (10, 20, Outcome.win),
        (10, 21, Outcome.win),
        (11, 20, Outcome.tie),
        (11, 21, Outcome.win),
    ]
    assert winrate.outcomes_in([[20], [10]], [10], [20]) == [(10, 20, Outcome.loss)]
    assert winrate.outcomes_in([[30], [10]], [10], [20]) == []  # no baseline in it


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (7, 10, 0.3968, 0.8922),  # the textbook example
        (5, 10, 0.2366, 0.7634),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (1, 9, 0.0199, 0.4350),
        (0.5, 12, 0.0044, 0.3013),  # one tie in 12: half a success
    ],
)
def test_wilson_bounds(successes: float, n: int, low: float, high: float) -> None:
    got = winrate.wilson(successes, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        winrate.wilson(0, 0)
    with pytest.raises(ValueError, match="between 0 and n=3"):
        winrate.wilson(4, 3)


def test_ties_count_half() -> None:
    result = winrate.win_rate([Outcome.win] * 5 + [Outcome.loss] * 3 + [Outcome.tie] * 2)
    assert (result.wins, result.losses, result.ties, result.n) == (5, 3, 2, 10)
    assert result.rate == pytest.approx(0.6)
    assert (result.low, result.high) == pytest.approx(winrate.wilson(6, 10))
    assert (result.low, result.high) == pytest.approx((0.3127, 0.8318), abs=1e-4)
    assert result.verdict is Verdict.undecided
    all_ties = winrate.win_rate([Outcome.tie] * 20)
    assert all_ties.rate == 0.5 and all_ties.verdict is Verdict.undecided


def test_verdict_thresholds_and_the_minimum_number_of_judgments() -> None:
    def rate(wins: int, losses: int, **kw: int) -> winrate.WinRate:
        return winrate.win_rate([Outcome.win] * wins + [Outcome.loss] * losses, **kw)

    # 1 of 10: the whole interval is below one half (0.018-0.404): worse.
    assert rate(1, 9).verdict is Verdict.worse
    # 2 of 10: the upper bound (0.5098) reaches past one half: not yet.
    assert rate(2, 8).high == pytest.approx(0.5098, abs=1e-4)
    assert rate(2, 8).verdict is Verdict.undecided
    # 1 of 9 is below one half too (upper 0.435), but 9 judgments are under the minimum.
    assert rate(1, 8).high < 0.5 and rate(1, 8).verdict is Verdict.undecided
    assert rate(1, 8, min_judgments=9).verdict is Verdict.worse
    assert rate(0, 4).verdict is Verdict.undecided
    # Better: the lower bound above one half.
    assert rate(9, 1).low == pytest.approx(0.5958, abs=1e-4)
    assert rate(9, 1).verdict is Verdict.better
    assert rate(6, 0).verdict is Verdict.better  # lower bound 0.61
    assert winrate.verdict(0.2, 0.5, 100) is Verdict.undecided  # "below": strictly
    assert winrate.verdict(0.5, 0.8, 100) is Verdict.undecided


def test_no_outcomes_is_undecided_with_no_numbers() -> None:
    empty = winrate.win_rate([])
    assert (empty.n, empty.rate, empty.low, empty.high) == (0, None, None, None)
    assert empty.verdict is Verdict.undecided
    assert empty.to_json() == {
        "wins": 0,
        "losses": 0,
        "ties": 0,
        "n": 0,
        "rate": None,
        "low": None,
        "high": None,
        "verdict": "undecided",
    }


def test_predicted_win_rate_is_the_mean_bradley_terry_probability() -> None:
    scores = {1: 2.0, 2: 0.0, 3: 0.0, 4: -1.0}
    pairs = [(1, 2), (3, 2), (4, 2), (1, 99)]  # 99 has no score: left out, counted
    got = winrate.predicted_win_rate(pairs, scores)
    expected = (1 / (1 + math.exp(-2)) + 0.5 + 1 / (1 + math.exp(1))) / 3
    assert got.rate == pytest.approx(expected)
    assert got.rate == pytest.approx(0.5499, abs=1e-4)  # (0.8808 + 0.5 + 0.2689) / 3
    assert (got.scored, got.pairs) == (3, 4)
    # A pair judged twice counts twice, like the human outcomes it stands next to.
    assert winrate.predicted_win_rate([(1, 2), (1, 2), (3, 2)], scores).rate == pytest.approx(
        (2 / (1 + math.exp(-2)) + 0.5) / 3
    )
    assert winrate.predicted_win_rate([(1, 2)], {}).to_json() == {
        "rate": None,
        "scored": 0,
        "pairs": 1,
    }


def test_sigmoid_is_stable_far_out() -> None:
    assert winrate.sigmoid(0) == 0.5
    assert winrate.sigmoid(1000) == 1.0 and winrate.sigmoid(-1000) == 0.0
    assert winrate.sigmoid(-2) == pytest.approx(1 - winrate.sigmoid(2))
