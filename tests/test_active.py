"""Active learning orderings on fixed inputs (pure; no database)."""

from __future__ import annotations

import math
import random

import pytest

from app.domain.active import (
    DEFAULT_RANDOM_SHARE,
    AssignmentStrategy,
    TaskView,
    closest_pair_uncertainty,
    disagreement_order,
    is_random_slot,
    largest_disagreement,
    mix_random,
    preference_probability,
    strategy_settings,
    task_prediction,
    uncertainty_order,
)
from app.domain.assignment import Candidate


def cands(*ids: int) -> list[Candidate]:
    return [Candidate(task_id=i, judgment_count=0, priority=0) for i in ids]


def ids(order: list[Candidate]) -> list[int]:
    return [c.task_id for c in order]


def test_preference_probability_is_the_sigmoid_of_the_margin():
    assert preference_probability(1.0, 1.0) == 0.5
    assert preference_probability(2.0, 0.0) == pytest.approx(1 / (1 + math.exp(-2)))
    assert preference_probability(0.0, 2.0) == pytest.approx(1 - 1 / (1 + math.exp(-2)))
    assert preference_probability(-1000.0, 1000.0) == 0.0  # no overflow
    assert preference_probability(1000.0, -1000.0) == 1.0


def test_uncertainty_without_random_share_is_closest_to_half_first():
    predicted = {1: 0.95, 2: 0.52, 3: 0.30, 4: 0.5, 5: 0.05}
    order = uncertainty_order(cands(1, 2, 3, 4, 5), predicted, random.Random(0), 0.0)
    assert ids(order) == [4, 2, 3, 1, 5]


def test_uncertainty_is_symmetric_around_half():
    """p = 0.4 and p = 0.6 are equally uncertain; 0.45 beats both from either side."""
    order = uncertainty_order(cands(1, 2, 3), {1: 0.6, 2: 0.45, 3: 0.4}, random.Random(1), 0.0)
    assert ids(order)[0] == 2
    assert set(ids(order)[1:]) == {1, 3}


def test_unscored_tasks_come_after_scored_ones_but_stay_in_the_order():
    predicted = {2: 0.9, 4: 0.6}
    order = uncertainty_order(cands(1, 2, 3, 4, 5), predicted, random.Random(3), 0.0)
    assert ids(order)[:2] == [4, 2]
    assert sorted(ids(order)[2:]) == [1, 3, 5]


def test_same_seed_same_order_and_ties_are_not_by_id():
    predicted = dict.fromkeys(range(20), 0.5)
    first = ids(uncertainty_order(cands(*range(20)), predicted, random.Random(7), 0.0))
    again = ids(uncertainty_order(cands(*range(20)), predicted, random.Random(7), 0.0))
    assert first == again
    assert first != list(range(20))  # equal scores are shuffled, not handed out by id
    assert sorted(first) == list(range(20))


@pytest.mark.parametrize(
    ("share", "n", "random_slots"),
    [(0.0, 10, []), (0.2, 10, [4, 9]), (0.25, 8, [3, 7]), (0.5, 4, [1, 3]), (1.0, 3, [0, 1, 2])],
)
def test_random_slots_are_an_exact_even_share(share, n, random_slots):
    assert [i for i in range(n) if is_random_slot(i, share)] == random_slots


def test_mix_random_keeps_everything_once_and_the_ranked_order_elsewhere():
    ranked = cands(*range(10))
    out = ids(mix_random(ranked, random.Random(5), 0.2))
    assert sorted(out) == list(range(10))
    ranked_slots = [out[i] for i in range(10) if not is_random_slot(i, 0.2)]
    assert ranked_slots == sorted(ranked_slots)  # the non-random picks keep the ranking order


def test_random_picks_reach_the_unscored_tail():
    """With a random share, tasks no model scored still get picked early sometimes."""
    predicted = {i: 0.5 + i / 100 for i in range(10)}
    early = set()
    for seed in range(50):
        order = uncertainty_order(cands(*range(20)), predicted, random.Random(seed), 0.2)
        early |= {c.task_id for c in order[:5] if c.task_id >= 10}
    assert early  # some unscored task (10..19) made it into the first five


def test_random_share_picks_are_uniform():
    """Over many seeds, the random slot (position 4 at share 0.2) hits each remaining task
    about equally often."""
    predicted = {i: 0.5 + i / 100 for i in range(10)}
    counts = dict.fromkeys(range(10), 0)
    for seed in range(2000):
        order = uncertainty_order(cands(*range(10)), predicted, random.Random(seed), 0.2)
        counts[order[4].task_id] += 1
    # positions 0-3 took the 4 most certain-wanted tasks, slot 4 draws from the 6 left
    assert all(counts[i] == 0 for i in range(4))
    for i in range(4, 10):
        assert 2000 / 6 * 0.8 < counts[i] < 2000 / 6 * 1.2


def test_disagreement_largest_gap_first_then_uncertainty_breaks_ties():
    main = {1: 0.875, 2: 0.5, 3: 0.75, 4: 0.625, 5: 0.25}
    heldout = {1: 0.25, 2: 0.5, 3: 0.5, 4: 0.375, 5: 0.25}
    # exact binary fractions: gaps 1 → 0.625, 3 → 0.25, 4 → 0.25, 2 → 0, 5 → 0;
    # ties by the main model's uncertainty: 4 (0.125 from 0.5) before 3 (0.25); 2 before 5
    order = disagreement_order(cands(1, 2, 3, 4, 5), main, heldout, random.Random(0), 0.0)
    assert ids(order) == [1, 4, 3, 2, 5]


def test_disagreement_puts_main_only_then_unscored_last():
    main = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.52}
    heldout = {2: 0.1, 3: 0.6, 5: 0.1}
    order = disagreement_order(cands(1, 2, 3, 4, 5, 6), main, heldout, random.Random(2), 0.0)
    assert ids(order)[:2] == [2, 3]  # both models scored them: gap 0.8, then 0
    assert ids(order)[2:4] == [1, 4]  # main only, by uncertainty
    assert sorted(ids(order)[4:]) == [5, 6]  # no main prediction


def test_share_out_of_range_is_refused():
    with pytest.raises(ValueError):
        uncertainty_order(cands(1), {1: 0.5}, random.Random(0), 1.5)


def test_empty_batch_gives_empty_order():
    assert uncertainty_order([], {}, random.Random(0), 0.2) == []
    assert disagreement_order([], {}, {}, random.Random(0), 0.2) == []


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (None, (AssignmentStrategy.default, DEFAULT_RANDOM_SHARE)),
        ({"assignment_strategy": "uncertainty"}, (AssignmentStrategy.uncertainty, 0.2)),
        (
            {"assignment_strategy": "disagreement", "random_share": 0.1},
            (AssignmentStrategy.disagreement, 0.1),
        ),
        ({"assignment_strategy": "bogus", "random_share": 3}, (AssignmentStrategy.default, 0.2)),
        ({"random_share": True}, (AssignmentStrategy.default, 0.2)),
        ({"random_share": 0}, (AssignmentStrategy.default, 0.0)),
    ],
)
def test_strategy_settings(settings, expected):
    assert strategy_settings(settings) == expected


# --- a task's prediction from its candidates' scores ------------------------------------------


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_pair_uncertainty_is_the_distance_of_p_from_a_coin_flip():
    assert closest_pair_uncertainty([1.0, 0.0]) == pytest.approx(sig(1.0) - 0.5)
    assert closest_pair_uncertainty([0.0, 1.0]) == pytest.approx(sig(1.0) - 0.5)  # symmetric
    assert closest_pair_uncertainty([3.0, 3.0]) == 0.0


def test_ranking_uncertainty_is_that_of_the_closest_pair():
    # pairs: (0,1) gap 2.0, (0,2) gap 0.25, (1,2) gap 2.25 -> the closest pair decides
    assert closest_pair_uncertainty([0.0, 2.0, -0.25]) == pytest.approx(sig(0.25) - 0.5)


def test_disagreement_is_the_largest_gap_between_the_models_over_pairs():
    main, heldout = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    # pair (0,1): main sig(1), held-out sig(-1) -> gap sig(1) - sig(-1), the largest;
    # pair (0,2): sig(1) vs sig(0); pair (1,2): sig(0) vs sig(1)
    assert largest_disagreement(main, heldout) == pytest.approx(sig(1) - sig(-1))
    assert largest_disagreement([2.0, 1.0], [5.0, 4.0]) == pytest.approx(0.0)  # same margin


def test_task_prediction_with_and_without_a_heldout_model():
    assert task_prediction([0.5, 0.0]) == TaskView(pytest.approx(sig(0.5) - 0.5), None)
    view = task_prediction([0.5, 0.0], [0.0, 0.5])
    assert view.disagreement == pytest.approx(sig(0.5) - sig(-0.5))


def test_task_prediction_refuses_malformed_inputs():
    with pytest.raises(ValueError, match="at least two"):
        task_prediction([1.0])
    with pytest.raises(ValueError, match="2 main scores but 3 held-out"):
        task_prediction([1.0, 0.0], [1.0, 0.0, 2.0])
