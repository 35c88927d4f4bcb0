"""Gold items: tasks with a known answer, mixed into annotators' streams. Pure functions.

A gold answer is stored like a ranking, as tie groups of completion ids best first. It may be
partial: only its top group is ever compared, because that is what a known answer can state
with confidence ("B is better", "these two are equally good"), while the order of the rest of
a ranking is rarely beyond dispute.

Correctness (`is_correct`): the judgment's top tie group equals the answer's top group as a
set. For pairwise this means: a winner answer matches only that choice; a "tie" answer
matches a tie and also "both bad" (both say neither is better). For rankings: the annotator
put exactly the known best completions (and only them) first.

Two spellings come in. The API names completions by id (the admin sees ids in the task), an
upload names them by index into the row's `completions` (ids do not exist yet).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

TIE = "tie"


class GoldError(ValueError):
    """The known answer does not fit the task's candidates."""


def wants_gold(rate: float, rng: random.Random) -> bool:
    """Whether the next claim should be a gold task.

    One independent draw per claim: the share of gold in a stream converges to `rate`, and
    where the gold items fall is unpredictable, so annotators cannot learn to spot them by
    position (a fixed "every 10th item" would be).
    """
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    return rng.random() < rate


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _groups(raw: Any, what: str) -> list[list[Any]]:
    if not isinstance(raw, list) or not raw:
        raise GoldError(f"the gold answer must be {what}")
    groups = []
    for item in raw:
        group = list(item) if isinstance(item, list | tuple) else [item]
        if not group or not all(_is_int(x) for x in group):
            raise GoldError(f"the gold answer must be {what}")
        groups.append(group)
    return groups


def _checked(groups: list[list[int]], candidates: Sequence[int]) -> list[list[int]]:
    seen = [x for g in groups for x in g]
    if len(seen) != len(set(seen)):
        raise GoldError("a completion appears more than once in the gold answer")
    if not set(seen) <= set(candidates):
        raise GoldError(
            f"the gold answer names completions not in this task: {sorted(set(seen) - set(candidates))}"
        )
    if len(groups[0]) == len(candidates) and len(candidates) > 2:
        raise GoldError("the gold answer's top group holds every candidate; it tells nothing")
    return [sorted(g) for g in groups]


def answer_from_ids(raw: Any, candidates: Sequence[int]) -> list[list[int]]:
    """The API spelling: a completion id (the winner), ``"tie"`` (pairwise only), or a
    ranking of ids ``[id, [id, id], ...]``, best first, possibly only its first groups."""
    if raw == TIE:
        if len(candidates) != 2:
            raise GoldError("'tie' is a pairwise answer; give a ranking for ranking tasks")
        return [sorted(candidates)]
    if _is_int(raw):
        if raw not in candidates:
            raise GoldError(f"completion {raw} is not in this task (it has {list(candidates)})")
        rest = [c for c in candidates if c != raw]
        return [[raw], rest] if len(candidates) == 2 else [[raw]]
    groups = _groups(raw, "a completion id, 'tie', or a ranking of completion ids")
    return _checked(groups, candidates)


def answer_from_indices(raw: Any, candidates: Sequence[int]) -> list[list[int]]:
    """The upload spelling: ``0``/``1``/``"tie"`` for a pair, or index groups
    ``[2, [0, 1], 3]`` (best first, possibly only the first groups) into the row's
    completions; returned with the indices replaced by `candidates` (the completion ids)."""
    n = len(candidates)
    if raw == TIE:
        return answer_from_ids(TIE, candidates)
    if _is_int(raw):
        if not 0 <= raw < n:
            raise GoldError(f"gold index {raw} is out of range (0 to {n - 1})")
        return answer_from_ids(candidates[raw], candidates)
    groups = _groups(raw, "0, 1 or 'tie' (pairs) or a list of index groups (rankings)")
    bad = sorted({i for g in groups for i in g if not 0 <= i < n})
    if bad:
        raise GoldError(f"gold index(es) {bad} out of range (0 to {n - 1})")
    return _checked([[candidates[i] for i in g] for g in groups], candidates)


def is_correct(answer: Sequence[Sequence[int]], ranking: Sequence[Sequence[int]]) -> bool:
    """Whether a judgment's ranking agrees with the known answer: same top group (as a set)."""
    if not answer or not ranking:
        return False
    return set(answer[0]) == set(ranking[0])
