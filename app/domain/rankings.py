"""Rankings with tie groups: validation, pairwise choices, and expansion into pairs.

A ranking is a list of tie groups, best first: ``[[3], [1, 4], [2]]`` means 3 beat everything,
1 and 4 tied, and both beat 2. Pairwise is the K = 2 case; a tie is one group of two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TIE = "tie"
BOTH_BAD = "both_bad"


class RankingError(ValueError):
    """The submitted ranking does not order exactly the task's candidates."""


@dataclass(frozen=True)
class Verdict:
    """A normalized judgment: tie groups best first, plus the 'none is acceptable' flag."""

    ranking: list[list[int]]
    none_acceptable: bool = False


def normalize(raw: Sequence[Any], candidates: Sequence[int]) -> list[list[int]]:
    """Turn ``[id, [id, id], id]`` into tie groups, checking each candidate appears once."""
    groups: list[list[int]] = []
    for item in raw:
        group = list(item) if isinstance(item, list | tuple) else [item]
        if not group:
            raise RankingError("a tie group is empty")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in group):
            raise RankingError("ranking items must be completion ids (integers)")
        groups.append(sorted(group))
    seen = [x for g in groups for x in g]
    if len(seen) != len(set(seen)):
        raise RankingError("a completion appears more than once in the ranking")
    if set(seen) != set(candidates):
        missing = sorted(set(candidates) - set(seen))
        extra = sorted(set(seen) - set(candidates))
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"not in this task {extra}")
        raise RankingError(
            "the ranking must order exactly this task's candidates: " + ", ".join(parts)
        )
    return groups


def from_choice(choice: int | str, candidates: Sequence[int]) -> Verdict:
    """A pairwise choice (a completion id, ``"tie"`` or ``"both_bad"``) as a verdict."""
    if len(candidates) != 2:
        raise RankingError("'choice' is only for pairwise tasks; send 'ranking' instead")
    a, b = candidates
    if choice == TIE:
        return Verdict([sorted([a, b])])
    if choice == BOTH_BAD:
        return Verdict([sorted([a, b])], none_acceptable=True)
    if isinstance(choice, int) and not isinstance(choice, bool) and choice in (a, b):
        return Verdict([[choice], [b if choice == a else a]])
    raise RankingError(f"choice must be one of {a}, {b}, 'tie' or 'both_bad'")


def to_pairs(ranking: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """Every strict (better, worse, rank distance) pair; ties produce no pair."""
    pairs = []
    for i, upper in enumerate(ranking):
        for j in range(i + 1, len(ranking)):
            for better in upper:
                for worse in ranking[j]:
                    pairs.append((better, worse, j - i))
    return pairs


def tied_pairs(ranking: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Pairs of completions inside the same tie group."""
    return [
        (group[i], group[j])
        for group in ranking
        for i in range(len(group))
        for j in range(i + 1, len(group))
    ]
