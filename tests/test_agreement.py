"""Consensus, agreement, Krippendorff's alpha and Bradley–Terry, against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest

from app.domain import agreement, bt
from app.domain.agreement import Coincidences, consensus, krippendorff_alpha_ordinal

# --- relations and agreement --------------------------------------------------------------


def test_relations_of_a_ranking_with_a_tie() -> None:
    # 3 best, then 1 and 4 tied, then 2.
    assert agreement.relations([[3], [1, 4], [2]]) == {
        (1, 2): -1,
        (1, 3): 1,
        (1, 4): 0,
        (2, 3): 1,
        (2, 4): 1,
        (3, 4): -1,
    }


def test_pairwise_agreement_by_hand() -> None:
    a = [[1], [2], [3]]
    b = [[1], [3], [2]]  # agrees on (1,2) and (1,3), not on (2,3)
    assert agreement.pair_agreement(a, b) == (2, 3)
    c = [[1, 2], [3]]  # vs a: tie on (1,2) differs; (1,3), (2,3) agree
    # Three annotators: a-b 2/3, a-c 2/3, b-c: (1,2) no, (1,3) yes, (2,3) no -> 1/3.
    assert agreement.agreement_counts([a, b, c]) == (5, 9)
    assert agreement.task_agreement([a, b, c]) == pytest.approx(5 / 9)
    assert agreement.task_agreement([a]) is None


# --- consensus ------------------------------------------------------------------------------


def test_weak_orders_are_counted_by_the_fubini_numbers() -> None:
    assert [len(agreement.weak_orders(k)) for k in range(1, 7)] == [1, 3, 13, 75, 541, 4683]
    assert set(agreement.weak_orders(2)) == {(0, 0), (0, 1), (1, 0)}


def test_single_and_unanimous() -> None:
    assert consensus([[[2], [1]]]) == agreement.Consensus([[2], [1]], "single", 0)
    same = consensus([[[2], [1]], [[2], [1]]])
    assert (same.ranking, same.method, same.distance) == ([[2], [1]], "unanimous", 0)


def test_majority_wins_and_distance_counts_the_dissent() -> None:
    result = consensus([[[1], [2], [3]], [[1], [2], [3]], [[3], [2], [1]]])
    assert result.ranking == [[1], [2], [3]]
    assert result.method == "kemeny"
    # The dissenter reverses all three pairs: distance 2 per pair.
    assert result.distance == 6


def test_an_even_split_gives_a_tie() -> None:
    # a>b costs 0 + 2, a=b costs 1 + 1: equal, and the order with fewer strict
    # preferences wins, so two annotators who disagree give a tie rather than a coin flip.
    assert consensus([[[10], [20]], [[20], [10]]]).ranking == [[10, 20]]
    # One strict and one tie: equally close again; the tie wins.
    assert consensus([[[10], [20]], [[10, 20]]]).ranking == [[10, 20]]
    # Two to one: the majority's strict order (0+0+2 = 2 beats 1+1+1 = 3).
    assert consensus([[[10], [20]], [[10], [20]], [[20], [10]]]).ranking == [[10], [20]]


def test_condorcet_cycle_is_broken_deterministically() -> None:
    # Each pair is won 2:1 in a cycle 1>2, 2>3, 3>1. Every linear order agreeing with two of
    # the majorities costs 2 + 2 + 4 = 8; any order with a tie costs at least 9. The three
    # orders at 8 (1>2>3, 2>3>1, 3>1>2) tie; levels over items (1, 2, 3) are (0,1,2),
    # (2,0,1), (1,2,0), and the smallest, 1>2>3, is chosen.
    rankings = [[[1], [2], [3]], [[2], [3], [1]], [[3], [1], [2]]]
    result = consensus(rankings)
    assert result.ranking == [[1], [2], [3]]
    assert result.distance == 8
    assert consensus(list(reversed(rankings))).ranking == [[1], [2], [3]]  # order-free


def test_consensus_of_six_is_exact() -> None:
    rng = random.Random(7)
    items = list(range(6))
    rankings = []
    for _ in range(5):
        order = items[:]
        rng.shuffle(order)
        rankings.append([[x] for x in order])
    result = consensus(rankings)
    assert result.method == "kemeny"
    # Exhaustive check of optimality over all weak orders.
    counts = agreement._relation_counts(rankings, items)
    best = min(
        agreement._distance(agreement._groups(items, order), counts)
        for order in agreement.weak_orders(6)
    )
    assert result.distance == best


def test_ranked_pairs_beyond_six() -> None:
    items = list(range(1, 8))
    rest = [[x] for x in items[3:]]
    # Cycle among 1, 2, 3 with margin 1 each; everything else unanimous (margin 3).
    a = [[1], [2], [3], *rest]
    b = [[2], [3], [1], *rest]
    c = [[3], [1], [2], *rest]
    result = consensus([a, b, c])
    assert result.method == "ranked_pairs"
    # Unanimous pairs lock first; then 1>2 and 2>3 (margin 1, by winner id); 3>1 would
    # close a cycle and is skipped.
    assert result.ranking == [[x] for x in items]


def test_ranked_pairs_leaves_unordered_items_in_one_group() -> None:
    a = [[1, 2], [3], [4], [5], [6], [7]]
    b = [[1, 2], [3], [4], [5], [7], [6]]
    # (1,2) tied by both: margin 0; (6,7) split 1:1: margin 0. Neither is locked.
    assert consensus([a, b]).ranking == [[1, 2], [3], [4], [5], [6, 7]]


def test_leave_one_out_agreement() -> None:
    up, down = [[10], [20]], [[20], [10]]
    summary = agreement.summarize([("a", up), ("b", up), ("c", up), ("d", down)])
    assert summary.consensus.ranking == [[10], [20]]
    # a's others (b, c, d) say 10 > 20 two to one: a agrees. d's others all disagree with d.
    assert summary.with_others == {"a": (1, 1), "b": (1, 1), "c": (1, 1), "d": (0, 1)}
    # Annotator pairs: a-b, a-c, b-c agree; the three pairs with d do not.
    assert (summary.agree, summary.compared) == (3, 6)
    assert agreement.summarize([("a", up)]).with_others == {}


def test_leave_one_out_finds_the_outlier_when_the_others_are_split() -> None:
    """QA's case at overlap 3: alice and bob choose A, carol B, on every task. alice's others
    are bob (A) and carol (B): split, no consensus, so the task does not count for her (it
    used to count as a disagreement, 0 of 1, and all three scored 0.0); likewise bob. carol's
    others agree on A: she disagrees, 0 of 1. Over ten such tasks: alice and bob have no
    pairs (None), carol 0 of 10 (0.0)."""
    a, b = [[10], [20]], [[20], [10]]
    summary = agreement.summarize([("alice", a), ("bob", a), ("carol", b)])
    assert summary.with_others == {"alice": (0, 0), "bob": (0, 0), "carol": (0, 1)}
    # Add two tasks on which all three agree: there each one's others agree with them, so
    # alice and bob are 2 of 2 (1.0) and carol 2 of 2 + 0 of 10 = 2 of 12 (1/6).
    totals = {"alice": [0, 0], "bob": [0, 0], "carol": [0, 0]}
    tasks = [[("alice", a), ("bob", a), ("carol", b)]] * 10 + [
        [("alice", a), ("bob", a), ("carol", a)]
    ] * 2
    for task in tasks:
        for who, (agree, compared) in agreement.summarize(task).with_others.items():
            totals[str(who)][0] += agree
            totals[str(who)][1] += compared
    assert totals == {"alice": [2, 2], "bob": [2, 2], "carol": [2, 12]}


def test_leave_one_out_majority_per_candidate_pair() -> None:
    """Four rankings of three candidates; on each pair the others' consensus is the relation
    more than half of them stated, and a pair they split on is not counted.

        a: 1 > 2 > 3    b: 1 = 2 > 3    c: 1 = 2 > 3    d: 2 > 1 > 3

    Pairs (1,3) and (2,3): everybody says the first is above 3, so all agree there.
    Pair (1,2): a's others b, c, d say tie, tie, 2 above: tie by 2 of 3, a (1 above)
    disagrees. b's others say 1 above, tie, 2 above: no majority, not counted; same for c.
    d's others say 1 above, tie, tie: tie by 2 of 3, d disagrees.
    """
    summary = agreement.summarize(
        [
            ("a", [[1], [2], [3]]),
            ("b", [[1, 2], [3]]),
            ("c", [[1, 2], [3]]),
            ("d", [[2], [1], [3]]),
        ]
    )
    assert summary.with_others == {"a": (2, 3), "b": (2, 2), "c": (2, 2), "d": (2, 3)}
    # A tie against a strict preference splits two others as much as opposite preferences.
    assert agreement.agreement_with_majority([[1], [2]], [[[1], [2]], [[1, 2]]]) == (0, 0)
    # Others who do not rank both candidates of a pair have no vote on it.
    assert agreement.agreement_with_majority([[1], [2], [3]], [[[1], [2]], [[3], [1]]]) == (
        1,
        2,
    )


# --- Krippendorff's alpha ------------------------------------------------------------------


def test_alpha_ordinal_by_hand() -> None:
    """Four units of two coders over values -1 < 0 < 1:

        u1 (-1, -1)  u2 (-1, 1)  u3 (1, 1)  u4 (0, -1)

    Coincidences (weight 1/(m-1) = 1): o[-1,-1] = 2, o[-1,1] = o[1,-1] = 1, o[1,1] = 2,
    o[0,-1] = o[-1,0] = 1. Marginals n_-1 = 4, n_0 = 1, n_1 = 3, n = 8.
    Ordinal distances d_ck = sum_{g=c..k} n_g - (n_c + n_k)/2:
        d(-1,0) = 5 - 2.5 = 2.5 -> 6.25;  d(0,1) = 4 - 2 = 2 -> 4;  d(-1,1) = 8 - 3.5 = 4.5 -> 20.25.
    Observed  sum o*d2 = 2*20.25 + 2*6.25 = 53.
    Expected  sum n_c n_k d2 = 2*(4*1*6.25 + 1*3*4 + 4*3*20.25) = 2*280 = 560.
    alpha = 1 - (n - 1) * 53 / 560 = 1 - 371/560 = 0.3375.
    """
    units = [[-1, -1], [-1, 1], [1, 1], [0, -1]]
    assert krippendorff_alpha_ordinal(units) == pytest.approx(0.3375)


def test_alpha_ordinal_matches_krippendorffs_published_example() -> None:
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", four observers and
    twelve units with missing values; the paper gives alpha_ordinal = 0.815."""
    table = {
        "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    }
    units = [[row[u] for row in table.values() if row[u] is not None] for u in range(12)]
    assert round(krippendorff_alpha_ordinal(units) or 0, 3) == 0.815


def test_alpha_edge_cases() -> None:
    assert krippendorff_alpha_ordinal([[1, 1], [1, 1]]) is None  # no variation at all
    assert krippendorff_alpha_ordinal([[1], [2]]) is None  # nothing pairable
    assert krippendorff_alpha_ordinal([[1, 1], [2, 2], [3, 3]]) == pytest.approx(1.0)
    # Two tasks, each split: units (-1, 1) twice; n_-1 = n_1 = 2, n = 4, o[-1,1] = o[1,-1] = 2,
    # alpha = 1 - 3 * (4 d2) / (2 * 2 * 2 d2) = -0.5: worse than chance.
    assert _relation_alpha([[[[1], [2]], [[2], [1]]], [[[3], [4]], [[4], [3]]]]) == pytest.approx(
        -0.5
    )
    # Every annotator ties every pair: no variation, even in both orientations.
    assert _relation_alpha([[[[1, 2]], [[1, 2]]]]) is None


def _relation_alpha(tasks: list[list[agreement.Ranking]]) -> float | None:
    """The project's alpha as the quality report computes it: a unit per (task, pair)."""
    matrix = Coincidences()
    for rankings in tasks:
        for unit in agreement.relation_units(rankings):
            matrix.add_relations(unit)
    return matrix.alpha_ordinal()


def _short_long_tasks(alternate: bool, bob_long: int) -> list[list[agreement.Ranking]]:
    """QA's two uploads of the same 10 prompts: completions (short, long) get ids in file
    order, always short first, or alternating. alice always prefers the long one; bob
    the long one on the first `bob_long` tasks and the short one after."""
    tasks: list[list[agreement.Ranking]] = []
    for i in range(10):
        first, second = 2 * i, 2 * i + 1
        short, long_ = (second, first) if alternate and i % 2 else (first, second)
        alice = [[long_], [short]]
        bob = [[long_], [short]] if i < bob_long else [[short], [long_]]
        tasks.append([alice, bob])
    return tasks


def test_alpha_does_not_depend_on_the_order_of_completions() -> None:
    """The same judgments coded against the lower completion id in two orientations.

    Perfect agreement: coded as is, the first upload has only +1s (no variation: alpha was
    None) and the alternating one five (+1, +1) and five (-1, -1) (alpha was 1.0). Counted in
    both orientations, both have n_-1 = n_1 = 10 and no disagreement: alpha = 1.

    bob disagrees on 3 of 10 (pairwise agreement 0.7; alpha was -0.1176 and 0.4242). In both
    orientations, half weight each: o[-1,1] = o[1,-1] = 3 (a split unit gives one of each
    per orientation), n_-1 = n_1 = 10, n = 20. Ordinal d(-1,1) = 20 - 10 = 10, d2 = 100:
    observed 6 * 100 = 600, expected 2 * 10 * 10 * 100 = 20000,
    alpha = 1 - 19 * 600 / 20000 = 0.43, in both uploads.
    """
    for alternate in (False, True):
        assert _relation_alpha(_short_long_tasks(alternate, bob_long=10)) == 1.0
        assert _relation_alpha(_short_long_tasks(alternate, bob_long=7)) == pytest.approx(0.43)


def test_alpha_of_relations_by_hand_with_ties() -> None:
    """Three units over one candidate pair each: (-1, -1, 0) from three annotators, (1, 0)
    and (-1, -1). Each counts half as coded and half mirrored (-1 <-> 1):

        (-1, -1, 0), weight 1/(m-1) = 1/2 per ordered pair, so o[-1,-1] = o[-1,0] = o[0,-1] = 1;
        mirrored o[1,1] = o[1,0] = o[0,1] = 1; half each.
        (1, 0): o[1,0] = o[0,1] = 1; mirrored o[-1,0] = o[0,-1] = 1; half each.
        (-1, -1): o[-1,-1] = 2; mirrored o[1,1] = 2; half each.

    Symmetrised o[-1,-1] = o[1,1] = 0.5 + 1 = 1.5, o[-1,0] = o[0,-1] = o[1,0] = o[0,1] = 1,
    o[-1,1] = 0. Marginals n_-1 = n_1 = 2.5, n_0 = 2, n = 7 (the 7 values coded).
    Ordinal: d(-1,0) = d(0,1) = 4.5 - 2.25 = 2.25 -> 5.0625; d(-1,1) = 7 - 2.5 = 4.5 -> 20.25
    (four times as far, exactly as the interval metric on -1/0/1).
    Observed 4 * 5.0625 = 20.25.
    Expected 2 * (2.5*2*5.0625 + 2*2.5*5.0625 + 2.5*2.5*20.25) = 2 * 177.1875 = 354.375.
    alpha = 1 - 6 * 20.25 / 354.375 = 1 - 12/35 = 23/35.
    """
    for second in ([1, 0], [-1, 0]):  # the middle unit in either orientation
        matrix = Coincidences()
        for unit in ([-1, -1, 0], second, [-1, -1]):
            matrix.add_relations(unit)
        assert matrix.o[(-1, -1)] == matrix.o[(1, 1)] == pytest.approx(1.5)
        assert matrix.o[(0, 1)] == matrix.o[(0, -1)] == pytest.approx(1.0)
        assert matrix.alpha_ordinal() == pytest.approx(23 / 35)


def test_relation_units_of_one_task() -> None:
    units = agreement.relation_units([[[1], [2], [3]], [[1, 2], [3]]])
    assert units == [[-1, 0], [-1, -1], [-1, -1]]  # pairs (1,2), (1,3), (2,3)


# --- Bradley–Terry --------------------------------------------------------------------------


def test_bt_two_sources_by_hand() -> None:
    """a beats b 3 times, b beats a once; with the prior of half a win each way, a has 3.5
    wins and b 1.5 in 5 games, and the two-source MLE is P(a beats b) = 3.5/5 = 0.7, so
    theta_a - theta_b = ln(7/3), centred: theta_a = ln(7/3)/2 = 0.42365."""
    theta = bt.fit({("a", "b"): 3, ("b", "a"): 1})
    assert theta["a"] == pytest.approx(math.log(7 / 3) / 2, abs=1e-8)
    assert theta["b"] == pytest.approx(-math.log(7 / 3) / 2, abs=1e-8)
    assert bt.win_probability(theta["a"], theta["b"]) == pytest.approx(0.7)


def test_bt_never_losing_source_stays_finite() -> None:
    theta = bt.fit({("champ", "x"): 50, ("champ", "y"): 50, ("x", "y"): 5, ("y", "x"): 5})
    assert all(math.isfinite(v) for v in theta.values())
    assert theta["champ"] > 2 and theta["x"] == pytest.approx(theta["y"], abs=1e-6)


def _simulated(truth: dict[str, float], n: int, seed: int) -> dict[bt.Signature, int]:
    rng = random.Random(seed)
    names = sorted(truth)
    signatures: dict[bt.Signature, int] = {}
    for _ in range(n):
        a, b = rng.sample(names, 2)
        winner, loser = (a, b) if rng.random() < bt.win_probability(truth[a], truth[b]) else (b, a)
        key = bt.signature([(winner, loser, 1.0)])
        signatures[key] = signatures.get(key, 0) + 1
    return signatures


def test_bt_recovers_planted_strengths_with_intervals() -> None:
    truth = {"policy-2": 1.0, "policy-1": 0.0, "upload": -1.0}
    result = bt.strengths(_simulated(truth, 3000, seed=1), rng=random.Random(0), replicates=100)
    assert [s.source for s in result] == ["policy-2", "policy-1", "upload"]
    for s in result:
        assert s.low < s.theta < s.high
        assert s.low - 0.05 < truth[s.source] < s.high + 0.05
        assert abs(s.theta - truth[s.source]) < 0.15
    assert sum(s.comparisons for s in result) == 2 * 3000


def test_bt_bootstrap_is_reproducible_with_a_seed() -> None:
    data = _simulated({"a": 0.3, "b": 0.0}, 200, seed=2)
    first = bt.strengths(data, rng=random.Random(5), replicates=50)
    again = bt.strengths(data, rng=random.Random(5), replicates=50)
    other = bt.strengths(data, rng=random.Random(6), replicates=50)
    assert first == again
    assert first != other


def test_binomial_sampler_mean_and_variance() -> None:
    rng = random.Random(3)
    for n, p in ((20, 0.1), (1000, 0.3), (50, 0.9)):
        draws = [bt.binomial(rng, n, p) for _ in range(4000)]
        mean = sum(draws) / len(draws)
        var = sum((d - mean) ** 2 for d in draws) / len(draws)
        assert mean == pytest.approx(n * p, rel=0.03)
        assert var == pytest.approx(n * p * (1 - p), rel=0.1)
        assert all(0 <= d <= n for d in draws)
    assert sum(bt.multinomial(rng, 100, [1, 2, 7])) == 100
