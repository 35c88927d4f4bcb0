"""Which completions of a prompt are shown together: pairs (pairwise) or one K-set (ranking).

Pure functions; the caller passes a seeded ``random.Random`` so imports are reproducible.
Pairs are returned as ``(a, b)`` with ``a`` before ``b`` in the caller's id order and the list
sorted the same way, so the output does not depend on the order the sampler picked them in.
Left/right display order is decided later, per lease, by the labeling service.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from itertools import combinations
from math import comb

# Enumerate every pair up to this many; past it, sample pairs by rejection instead, so a
# prompt with thousands of completions never materializes millions of pairs.
ENUMERATE_LIMIT = 20_000


def pairs_for(
    completion_ids: list[int], max_pairs: int, rng: random.Random
) -> list[tuple[int, int]]:
    """Every pair of `completion_ids`, or a seeded subset of at most `max_pairs` of them.

    When sampling, each completion appears in at least one pair whenever the cap allows it
    (``max_pairs >= ceil(n / 2)``): an unjudged completion is a completion wasted.
    """
    return extend_pairs(completion_ids, set(), max_pairs, rng, cover_new=False)


def extend_pairs(
    completion_ids: Sequence[int],
    existing: Collection[frozenset[int]],
    max_pairs: int,
    rng: random.Random,
    *,
    cover_new: bool = True,
) -> list[tuple[int, int]]:
    """The pairs to add for a prompt that already has the pairs in `existing`.

    Used when an upsert adds completions to a prompt: no pair that exists is made again, the
    prompt's total stays within `max_pairs` where it can, and, with `cover_new`, every
    completion that is in no pair yet gets one even if that goes past the cap (otherwise new
    completions on a prompt already at its cap would silently never be judged).
    """
    ids = list(dict.fromkeys(completion_ids))  # drop repeats, keep order
    if len(ids) < 2:
        return []
    position = {cid: i for i, cid in enumerate(ids)}
    taken = {pair for pair in existing if len(pair) == 2 and pair <= position.keys()}
    missing_count = comb(len(ids), 2) - len(taken)
    budget = max_pairs - len(taken)
    if missing_count <= max(budget, 0):
        # Everything fits under the cap: every missing pair.
        return [(a, b) for a, b in combinations(ids, 2) if frozenset((a, b)) not in taken]

    chosen: set[frozenset[int]] = set()
    covered = {cid for pair in taken for cid in pair}
    uncovered = [cid for cid in ids if cid not in covered]
    rng.shuffle(uncovered)
    # Cover first: pair the uncovered completions with each other, then a leftover with anyone.
    cover_budget = len(uncovered) if cover_new else max(budget, 0)
    for i in range(0, len(uncovered) - 1, 2):
        if len(chosen) >= cover_budget:
            break
        chosen.add(frozenset((uncovered[i], uncovered[i + 1])))
    if len(uncovered) % 2 == 1 and len(chosen) < cover_budget:
        last = uncovered[-1]
        partners = [cid for cid in ids if cid != last and frozenset((cid, last)) not in taken]
        if partners:
            chosen.add(frozenset((last, rng.choice(partners))))

    # Fill the rest of the budget with random pairs that exist nowhere yet.
    remaining = budget - len(chosen)
    if remaining > 0:
        if comb(len(ids), 2) <= ENUMERATE_LIMIT:
            pool = [
                frozenset(pair)
                for pair in combinations(ids, 2)
                if frozenset(pair) not in taken and frozenset(pair) not in chosen
            ]
            chosen.update(rng.sample(pool, min(remaining, len(pool))))
        else:
            # Far more pairs than the budget: random draws rarely collide.
            while remaining > 0:
                a, b = rng.sample(ids, 2)
                pair = frozenset((a, b))
                if pair not in taken and pair not in chosen:
                    chosen.add(pair)
                    remaining -= 1

    ordered = [tuple(sorted(pair, key=position.__getitem__)) for pair in chosen]
    ordered.sort(key=lambda pair: (position[pair[0]], position[pair[1]]))
    return [(a, b) for a, b in ordered]


def ranking_set(
    completion_ids: Sequence[int], k: int, rng: random.Random, prefer: Collection[int] = ()
) -> list[int]:
    """Up to `k` completions for one ranking task, in the caller's id order.

    Completions in `prefer` (new ones, on an upsert) are taken first so they get judged; the
    rest of the slots are sampled from the others. Fewer than 2 candidates means no task: [].
    """
    ids = list(dict.fromkeys(completion_ids))
    if len(ids) < 2:
        return []
    if len(ids) <= k:
        return ids
    preferred = [cid for cid in ids if cid in prefer]
    others = [cid for cid in ids if cid not in prefer]
    picked = rng.sample(preferred, min(k, len(preferred)))
    picked += rng.sample(others, min(k - len(picked), len(others)))
    if len(picked) < 2:
        return []
    chosen = set(picked)
    return [cid for cid in ids if cid in chosen]
