"""app.domain.pairing: which completions are judged together."""

from __future__ import annotations

import random
from itertools import combinations

import pytest

from app.domain.pairing import extend_pairs, pairs_for, ranking_set


def as_sets(pairs: list[tuple[int, int]]) -> set[frozenset[int]]:
    return {frozenset(p) for p in pairs}


def test_every_pair_when_under_the_cap() -> None:
    assert pairs_for([10, 20, 30, 40], 16, random.Random(0)) == [
        (10, 20),
        (10, 30),
        (10, 40),
        (20, 30),
        (20, 40),
        (30, 40),
    ]


def test_exactly_at_the_cap_is_every_pair() -> None:
    ids = list(range(1, 7))  # C(6, 2) = 15
    assert len(pairs_for(ids, 15, random.Random(0))) == 15


@pytest.mark.parametrize("ids", [[], [7]])
def test_fewer_than_two_completions_make_no_pair(ids: list[int]) -> None:
    assert pairs_for(ids, 16, random.Random(0)) == []


def test_two_completions_make_one_pair() -> None:
    assert pairs_for([5, 3], 16, random.Random(0)) == [(5, 3)]


@pytest.mark.parametrize(("n", "cap"), [(7, 5), (10, 6), (12, 16), (40, 20), (300, 16)])
def test_sampled_pairs_respect_the_cap_and_cover_every_completion(n: int, cap: int) -> None:
    ids = [100 + i for i in range(n)]
    pairs = pairs_for(ids, cap, random.Random(3))
    assert len(pairs) == min(cap, n * (n - 1) // 2)
    assert len(as_sets(pairs)) == len(pairs), "no pair twice"
    assert all(a != b and a in ids and b in ids for a, b in pairs)
    if cap >= (n + 1) // 2:
        assert {c for pair in pairs for c in pair} == set(ids)


def test_cover_as_many_as_possible_when_the_cap_is_too_small() -> None:
    ids = list(range(20))
    pairs = pairs_for(ids, 3, random.Random(1))
    assert len(pairs) == 3
    assert len({c for pair in pairs for c in pair}) == 6  # three disjoint pairs


def test_pairs_keep_the_callers_order() -> None:
    ids = [9, 4, 7, 1, 8, 2]
    position = {c: i for i, c in enumerate(ids)}
    pairs = pairs_for(ids, 5, random.Random(2))
    assert all(position[a] < position[b] for a, b in pairs)
    assert pairs == sorted(pairs, key=lambda p: (position[p[0]], position[p[1]]))


def test_same_seed_same_pairs_other_seed_other_pairs() -> None:
    ids = list(range(30))
    first = pairs_for(ids, 16, random.Random(42))
    assert first == pairs_for(ids, 16, random.Random(42))
    assert any(pairs_for(ids, 16, random.Random(seed)) != first for seed in range(1, 5))


def test_many_completions_are_sampled_without_enumerating_every_pair() -> None:
    ids = list(range(5000))  # 12.5 million pairs
    pairs = pairs_for(ids, 16, random.Random(0))
    assert len(as_sets(pairs)) == 16


def test_extend_adds_only_the_missing_pairs_when_they_fit() -> None:
    existing = as_sets([(1, 2)])
    assert extend_pairs([1, 2, 3], existing, 16, random.Random(0)) == [(1, 3), (2, 3)]


def test_extend_never_repeats_an_existing_pair() -> None:
    ids = list(range(1, 11))
    existing = as_sets(pairs_for(ids[:8], 16, random.Random(0)))
    added = extend_pairs(ids, existing, 16, random.Random(1))
    assert not as_sets(added) & existing
    assert len(as_sets(added)) == len(added)


def test_extend_stays_within_the_cap_in_total() -> None:
    ids = list(range(1, 8))
    existing = as_sets(list(combinations(ids[:6], 2)))  # 15 pairs
    added = extend_pairs(ids, existing, 16, random.Random(0))
    assert len(added) == 1 and 7 in added[0]


def test_extend_covers_new_completions_even_past_the_cap() -> None:
    ids = list(range(1, 11))
    existing = as_sets(list(combinations(ids[:7], 2)))  # 21 pairs, already over a cap of 16
    added = extend_pairs(ids, existing, 16, random.Random(0))
    assert {8, 9, 10} <= {c for pair in added for c in pair}
    assert len(added) == 2  # (two new ones together) + (the third with anyone)


def test_extend_ignores_existing_pairs_of_unknown_completions() -> None:
    existing = {frozenset((1, 99))}
    assert extend_pairs([1, 2], existing, 16, random.Random(0)) == [(1, 2)]


def test_ranking_set_takes_all_when_k_or_fewer() -> None:
    assert ranking_set([3, 1, 2], 4, random.Random(0)) == [3, 1, 2]
    assert ranking_set([3], 4, random.Random(0)) == []


def test_ranking_set_samples_k_in_order_and_prefers_new() -> None:
    ids = list(range(10))
    picked = ranking_set(ids, 4, random.Random(0), prefer={8, 9})
    assert len(picked) == 4 and {8, 9} <= set(picked)
    assert picked == sorted(picked)
    assert picked == ranking_set(ids, 4, random.Random(0), prefer={8, 9})
