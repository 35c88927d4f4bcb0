"""Which task an annotator gets next, and how its candidates are shown: pure functions.

The services fetch a bounded batch of eligible tasks and lock them one by one; what lives here
is the part worth testing without a database: the order the batch is tried in, the slot
arithmetic that decides whether a task still needs someone, and the shuffled display order
(position bias is real, so left/right is randomized per lease and recorded with the verdict).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Candidate:
    """What the strategy may look at for one eligible task."""

    task_id: int
    judgment_count: int
    priority: int


Strategy = Callable[[Sequence[Candidate], random.Random], list[Candidate]]
"""Orders a batch of eligible tasks, most wanted first; randomness only from the given RNG."""


def default_order(candidates: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
    """Partly judged tasks first (finished items beat many half-finished ones), then higher
    priority, then random, so concurrent annotators spread over the batch instead of all
    queueing on the same row."""
    keyed = [(c.judgment_count > 0, c.priority, rng.random(), c) for c in candidates]
    keyed.sort(key=lambda k: (not k[0], -k[1], k[2]))
    return [k[3] for k in keyed]


def has_free_slot(required: int, judged: int, live_leases: int) -> bool:
    """A task needs someone while its judgments plus the live reservations fall short."""
    return judged + live_leases < required


def display_order(completion_ids: Sequence[int], rng: random.Random) -> list[int]:
    """A fresh left-to-right order for one lease."""
    order = list(completion_ids)
    rng.shuffle(order)
    return order


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes for what we stored as UTC; make every moment aware."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def is_live(expires_at: datetime, now: datetime) -> bool:
    return as_utc(expires_at) > as_utc(now)
