"""Consensus rankings and agreement between annotators (pure functions, no I/O).

Every judgment is a ranking of one task's candidates as tie groups, best first
(``[[3], [1, 4], [2]]``; see app.domain.rankings). Pairwise is the K = 2 case, where a tie
and "both bad" are both one group of two. Everything here compares judgments through the
*relation* they state about each pair of candidates ``a < b`` (by id): ``-1`` when a is
ranked above b, ``0`` when they are tied, ``+1`` when b is above a.

Consensus (:func:`consensus`)
    Kemeny–Snell aggregation: the consensus is the weak order (ties allowed) with the
    smallest total distance to the annotators' rankings, where two rankings' distance sums,
    over candidate pairs, 0 for the same relation, 1 for a tie against a strict preference
    and 2 for opposite preferences. Up to ``KEMENY_MAX_K`` = 6 candidates every weak order
    is tried (4,683 of them for K = 6), so the answer is exact. Among equally close orders
    the one stating the fewest strict preferences wins (two annotators who disagree about a
    pair give a tie, not a coin flip), then the lexicographically smallest, so the result is
    deterministic. Beyond K = 6 exhaustive search is too slow and Tideman's ranked pairs is
    used: pairs are locked in order of decreasing majority margin unless they would close a
    cycle, and the locked graph is layered into tie groups (items that no locked pair orders
    share a group).

Agreement
    Two judgments agree on a pair when they state the same relation. :func:`task_agreement`
    pools over every two annotators of a task and every candidate pair; the project's
    pairwise agreement rate pools the same counts over tasks. An annotator's agreement with
    the others' consensus (:func:`agreement_with_majority`) leaves them out and counts only
    the pairs on which more than half of the others state one relation. Krippendorff's
    alpha (:class:`Coincidences`, :meth:`Coincidences.add_relations`) uses the relations as
    ordinal values with one unit per (task, candidate pair), so for pairwise projects one
    unit is one task, and chance agreement is accounted for. Which candidate of a pair is
    "a" only depends on the ids, i.e. on upload order, so alpha counts every unit in both
    orientations and does not depend on it.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Ranking = Sequence[Sequence[int]]

KEMENY_MAX_K = 6

SINGLE = "single"
"""Only one judgment: it is the consensus."""
UNANIMOUS = "unanimous"
"""Several judgments, all the same ranking."""
KEMENY = "kemeny"
"""Exact Kemeny–Snell over all weak orders (K ≤ 6)."""
RANKED_PAIRS = "ranked_pairs"
"""Tideman's ranked pairs (K > 6)."""


# --- relations --------------------------------------------------------------------------


def levels(ranking: Ranking) -> dict[int, int]:
    """Each item's tie-group index (0 = best)."""
    return {int(item): level for level, group in enumerate(ranking) for item in group}


def relations(ranking: Ranking) -> dict[tuple[int, int], int]:
    """The relation of every pair ``(a, b)`` with ``a < b``: -1 a above, 0 tied, +1 b above."""
    level = levels(ranking)
    items = sorted(level)
    return {(a, b): _sign(level[a] - level[b]) for i, a in enumerate(items) for b in items[i + 1 :]}


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def pair_agreement(first: Ranking, second: Ranking) -> tuple[int, int]:
    """(pairs on which the two rankings state the same relation, pairs both rank)."""
    a, b = relations(first), relations(second)
    shared = a.keys() & b.keys()
    return sum(1 for pair in shared if a[pair] == b[pair]), len(shared)


def task_agreement(rankings: Sequence[Ranking]) -> float | None:
    """Share of (annotator pair, candidate pair) comparisons that agree; None below 2 rankings."""
    agree, total = agreement_counts(rankings)
    return agree / total if total else None


def agreement_counts(rankings: Sequence[Ranking]) -> tuple[int, int]:
    """The counts behind :func:`task_agreement`, for pooling over tasks."""
    agree = total = 0
    for first, second in itertools.combinations(rankings, 2):
        a, t = pair_agreement(first, second)
        agree += a
        total += t
    return agree, total


# --- consensus --------------------------------------------------------------------------


@dataclass(frozen=True)
class Consensus:
    """The aggregated ranking of one task and how it was found."""

    ranking: list[list[int]]
    method: str
    distance: int
    """Total Kemeny–Snell distance from the consensus to the judgments (0 = unanimous)."""


def consensus(rankings: Sequence[Ranking]) -> Consensus:
    """The consensus ranking of one task's judgments (see the module docstring)."""
    if not rankings:
        raise ValueError("consensus of no rankings")
    canonical = [_canonical(r) for r in rankings]
    if len(canonical) == 1:
        return Consensus(canonical[0], SINGLE, 0)
    if all(r == canonical[0] for r in canonical):
        return Consensus(canonical[0], UNANIMOUS, 0)
    items = sorted({item for r in canonical for group in r for item in group})
    counts = _relation_counts(canonical, items)
    if len(items) <= KEMENY_MAX_K:
        ranking = _kemeny(items, counts)
        method = KEMENY
    else:
        ranking = _ranked_pairs(items, counts)
        method = RANKED_PAIRS
    return Consensus(ranking, method, _distance(ranking, counts))


def _canonical(ranking: Ranking) -> list[list[int]]:
    return [sorted(int(x) for x in group) for group in ranking if group]


def _relation_counts(
    rankings: Sequence[Ranking], items: Sequence[int]
) -> dict[tuple[int, int], list[int]]:
    """Per pair (a < b): how many judgments said a above, tied, b above (index rel + 1)."""
    counts: dict[tuple[int, int], list[int]] = {
        (a, b): [0, 0, 0] for i, a in enumerate(items) for b in items[i + 1 :]
    }
    for ranking in rankings:
        for pair, rel in relations(ranking).items():
            counts[pair][rel + 1] += 1
    return counts


def _distance(ranking: Ranking, counts: Mapping[tuple[int, int], list[int]]) -> int:
    rel = relations(ranking)
    return sum(n * abs(rel[pair] - (r - 1)) for pair, c in counts.items() for r, n in enumerate(c))


@functools.cache
def weak_orders(k: int) -> tuple[tuple[int, ...], ...]:
    """Every weak order of k items as a tuple of levels (0 = best, levels contiguous).

    There are Fubini-number many: 1, 3, 13, 75, 541, 4683 for k = 1..6.
    """
    if k == 0:
        return ((),)
    found = []
    for order in weak_orders(k - 1):
        top = max(order, default=-1)
        for level in range(top + 1):  # join an existing group
            found.append((*order, level))
        for level in range(top + 2):  # open a new group at `level`, shifting the ones below
            found.append((*(x + 1 if x >= level else x for x in order), level))
    return tuple(sorted(set(found)))


def _kemeny(items: Sequence[int], counts: Mapping[tuple[int, int], list[int]]) -> list[list[int]]:
    """Exact Kemeny–Snell: try every weak order of the items."""
    index = {item: i for i, item in enumerate(items)}
    pairs = [(index[a], index[b], c) for (a, b), c in counts.items()]
    # cost[p][rel + 1]: distance of relation `rel` on pair p to all judgments.
    costs = [
        [sum(n * abs(rel - (r - 1)) for r, n in enumerate(c)) for rel in (-1, 0, 1)]
        for _, _, c in pairs
    ]
    best: tuple[int, int, tuple[int, ...]] | None = None
    for order in weak_orders(len(items)):
        cost = strict = 0
        for (i, j, _), pair_cost in zip(pairs, costs, strict=True):
            rel = _sign(order[i] - order[j])
            cost += pair_cost[rel + 1]
            strict += rel != 0
        key = (cost, strict, order)
        if best is None or key < best:
            best = key
    assert best is not None
    return _groups(items, best[2])


def _groups(items: Sequence[int], order: Sequence[int]) -> list[list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for item, level in zip(items, order, strict=True):
        groups[level].append(item)
    return [sorted(groups[level]) for level in sorted(groups)]


def _ranked_pairs(
    items: Sequence[int], counts: Mapping[tuple[int, int], list[int]]
) -> list[list[int]]:
    """Tideman: lock majorities strongest first, skip those closing a cycle, then layer."""
    majorities = []
    for (a, b), (above, _tied, below) in counts.items():
        if above != below:
            winner, loser = (a, b) if above > below else (b, a)
            majorities.append((-abs(above - below), -max(above, below), winner, loser))
    beats: dict[int, set[int]] = {item: set() for item in items}
    for _, _, winner, loser in sorted(majorities):
        if not _reaches(beats, loser, winner):
            beats[winner].add(loser)
    remaining = set(items)
    layers = []
    while remaining:
        beaten = {x for w in remaining for x in beats[w] if x in remaining}
        layer = sorted(remaining - beaten)
        layers.append(layer)
        remaining -= set(layer)
    return layers


def _reaches(beats: Mapping[int, set[int]], start: int, goal: int) -> bool:
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        for nxt in beats[node] - seen:
            seen.add(nxt)
            stack.append(nxt)
    return False


# --- one task, several annotators --------------------------------------------------------


@dataclass(frozen=True)
class TaskSummary:
    """What the quality report and the rankings export need to know about one task."""

    consensus: Consensus
    agreement: float | None
    agree: int
    compared: int
    with_others: dict[Hashable, tuple[int, int]] = field(default_factory=dict)
    """Per annotator: (agreeing, compared) pairs against the consensus of the *other*
    annotators (:func:`agreement_with_majority`; leave one out, so an annotator never agrees
    with themselves); empty when the task has a single judgment."""


def summarize(judgments: Sequence[tuple[Hashable, Ranking]]) -> TaskSummary:
    """Consensus, agreement and leave-one-out agreement for one task's (annotator, ranking)s."""
    rankings = [r for _, r in judgments]
    agree, compared = agreement_counts(rankings)
    with_others: dict[Hashable, tuple[int, int]] = {}
    if len(judgments) >= 2:
        for i, (who, ranking) in enumerate(judgments):
            with_others[who] = agreement_with_majority(ranking, rankings[:i] + rankings[i + 1 :])
    return TaskSummary(
        consensus=consensus(rankings),
        agreement=agree / compared if compared else None,
        agree=agree,
        compared=compared,
        with_others=with_others,
    )


def agreement_with_majority(ranking: Ranking, others: Sequence[Ranking]) -> tuple[int, int]:
    """(pairs on which `ranking` states the others' consensus relation, pairs with one).

    On each candidate pair the others' consensus is the relation more than half of them
    stated (among those who rank both candidates). Where they are split, with no relation
    above half, the pair is not counted: there is no consensus to agree with, and counting
    the split as a tie would mark everybody wrong. At overlap 3, when alice and bob say A
    and carol B, alice's and bob's others are split and the task does not count for them,
    while carol's others agree and she disagrees: the outlier is the only one marked down.
    With one other annotator this is plain pairwise agreement with them.

    This is majority vote per pair, leaving the annotator out. For two candidates it gives
    the same relation as the Kemeny–Snell consensus of the others wherever it counts a pair
    (a relation stated by more than half is the median, which Kemeny–Snell picks); for more
    it may differ where the others' majorities form a cycle, and each pair is scored against
    what the others said about that pair. It is deliberately not Label Studio's per-member "average pairwise agreement" (alice 1/2,
    carol 0 above): that number is the project's pairwise rate restricted to one person.
    """
    mine = relations(ranking)
    stated = [relations(other) for other in others]
    agree = compared = 0
    for pair, rel in mine.items():
        votes = Counter(theirs[pair] for theirs in stated if pair in theirs)
        if not votes:
            continue
        top, count = votes.most_common(1)[0]
        if 2 * count <= votes.total():
            continue  # split: no consensus on this pair
        compared += 1
        agree += rel == top
    return agree, compared


# --- Krippendorff's alpha ------------------------------------------------------------------


class Coincidences:
    """Krippendorff's coincidence matrix, filled one unit at a time (constant memory).

    A unit is the set of values the coders gave one thing (here: the relations the
    annotators of one task stated about one candidate pair; add those with
    :meth:`add_relations`). Units with fewer than two values are not pairable and are
    ignored, as the definition says.
    """

    def __init__(self) -> None:
        self.o: dict[tuple[Hashable, Hashable], float] = defaultdict(float)

    def add(self, values: Sequence[Hashable], weight: float = 1.0) -> None:
        """One unit; `weight` scales its m values (1: the unit counts once, as defined)."""
        m = len(values)
        if m < 2:
            return
        each = weight / (m - 1)
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    self.o[(c, k)] += each

    def add_relations(self, relations: Sequence[int]) -> None:
        """One unit of relations (-1/0/+1) about a candidate pair, in both orientations.

        A candidate pair has no natural orientation: relations are coded against the lower
        completion id, which follows the order of the uploaded file. Coded as is, the value
        distribution that expected disagreement is computed from depends on that order (10
        tasks, two annotators always preferring the long answer: alpha None when the long one
        always has the higher id, 1.0 when ids alternate). So the unit counts half as coded
        and half mirrored (a above <-> b above, ties stay). Flipping a unit then swaps its
        halves and changes nothing, so alpha is the same for every orientation; the
        marginals become symmetric (n_-1 = n_+1); the observed pairs of values are only
        mirrored (agreeing pairs still agree, split ones still split); and n stays the
        number of values coded, so data whose marginals are already symmetric keep their
        alpha (counting each unit twice at full weight would double n and shift the
        (n - 1) small-sample correction). Perfect agreement on strict preferences is 1.0.

        With symmetric marginals the ordinal metric on -1 < 0 < +1 gives d(-1,0) = d(0,1)
        and d(-1,+1) twice that, i.e. the interval metric: opposite preferences count four
        times a tie against a preference (squared, where Kemeny–Snell's distance counts
        them twice). Nominal would count both the same, and a tie is closer to either
        preference than they are to each other. Without ties all of these are the same.
        """
        self.add(relations, 0.5)
        self.add([-r for r in relations], 0.5)

    def alpha_ordinal(self) -> float | None:
        """alpha = 1 - (n - 1) * sum o_ck d2_ck / sum n_c n_k d2_ck with the ordinal metric
        d_ck = sum_{g=c..k} n_g - (n_c + n_k) / 2. None when it is undefined (no pairable
        unit, or every value the same, so there is no variation to agree about)."""
        values = sorted({c for c, _ in self.o})  # type: ignore[type-var]
        n_c = {c: sum(self.o.get((c, k), 0.0) for k in values) for c in values}
        n = sum(n_c.values())
        if n <= 1:
            return None
        position = {c: i for i, c in enumerate(values)}
        cumulative = list(itertools.accumulate(n_c[c] for c in values))

        def d2(c: Hashable, k: Hashable) -> float:
            lo, hi = sorted((position[c], position[k]))
            between = cumulative[hi] - (cumulative[lo - 1] if lo else 0.0)
            return (between - (n_c[c] + n_c[k]) / 2) ** 2

        observed = sum(o * d2(c, k) for (c, k), o in self.o.items())
        expected = sum(n_c[c] * n_c[k] * d2(c, k) for c in values for k in values)
        if expected == 0:
            return None
        return 1.0 - (n - 1) * observed / expected


def krippendorff_alpha_ordinal(units: Iterable[Sequence[Hashable]]) -> float | None:
    """Krippendorff's alpha with the ordinal metric over `units` (lists of coders' values)."""
    matrix = Coincidences()
    for values in units:
        matrix.add(values)
    return matrix.alpha_ordinal()


def relation_units(rankings: Sequence[Ranking]) -> list[list[int]]:
    """One task's alpha units: per candidate pair, the relations its annotators stated."""
    per_pair: dict[tuple[int, int], list[int]] = defaultdict(list)
    for ranking in rankings:
        for pair, rel in relations(ranking).items():
            per_pair[pair].append(rel)
    return [per_pair[pair] for pair in sorted(per_pair)]
