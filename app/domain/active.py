"""Active learning: which tasks are worth a person's time, as pure ordering functions.

These have the shape of `app.domain.assignment.Strategy` once their model predictions are bound
(``lambda batch, rng: uncertainty_order(batch, predicted, rng, share)``; a ``functools.partial``
with keywords would not do, since strategies are called positionally); the simulation in
bench/active_learning.py runs them. The claim code (app.services.tasks) applies the same
orders in SQL, to the `task_predictions` rows, so a claim never loads predictions into
Python; there the random share is drawn per claim (a claim reads the default window with
probability `random_share`), which gives the same share of model-independent picks in
expectation. Those picks follow the default order (partly judged first, then priority, then
newest, shuffled within a batch of 50), not a uniform draw over every open task as in the
simulation: independent of the model, so not biased toward its blind spots, but weighted
toward recent tasks.

A prediction is the current reward model's probability that the task's first candidate is
preferred: ``sigmoid(score_a - score_b)`` (see `preference_probability`). A task of K > 2
candidates is as uncertain as its closest pair (`closest_pair_uncertainty`) and as disputed as
the pair the two models disagree on most (`largest_disagreement`); `task_prediction` turns a
task's stored completion scores into both (app.services.predictions stores them).

- uncertainty: tasks the model is least sure about (p closest to 0.5) first;
- disagreement: tasks where the main and the held-out reward model disagree most first;
- both mix in a share of uniformly random picks, so the labels are not only the hard cases
  (a dataset made only of the model's blind spots would bias its own accuracy estimates);
- tasks without a prediction (new candidates not yet scored) go after the scored ones, but the
  random picks can still reach them, so nothing starves.

Per-project settings (read by the claim code, documented here):
``project.settings["assignment_strategy"]`` in ``{"default", "uncertainty", "disagreement"}``
and ``project.settings["random_share"]`` in ``[0, 1]`` (default `DEFAULT_RANDOM_SHARE`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.domain.assignment import Candidate

STRATEGY_SETTING = "assignment_strategy"
RANDOM_SHARE_SETTING = "random_share"
DEFAULT_RANDOM_SHARE = 0.2


class AssignmentStrategy(StrEnum):
    """The per-project choice of how eligible tasks are ordered."""

    default = "default"
    """Partly judged first, then priority, then random (`assignment.default_order`)."""
    uncertainty = "uncertainty"
    """Closest to p = 0.5 under the current reward model first (`uncertainty_order`)."""
    disagreement = "disagreement"
    """Largest |p_main - p_heldout| first (`disagreement_order`)."""


def preference_probability(score_a: float, score_b: float) -> float:
    """Bradley–Terry: P(a preferred over b) = sigmoid(score_a - score_b), overflow-safe."""
    margin = score_a - score_b
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    e = math.exp(margin)
    return e / (1.0 + e)


def _pairs(n: int) -> list[tuple[int, int]]:
    if n < 2:
        raise ValueError(f"a task needs at least two scored candidates, got {n}")
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def closest_pair_uncertainty(scores: Sequence[float]) -> float:
    """|p - 0.5| of the pair of candidates the model is least sure about (0: a coin flip).

    p is monotone in the score margin, so this is the pair with the smallest |score gap|; a
    ranking task is worth asking about when any two of its candidates are hard to tell apart.
    """
    return min(
        abs(preference_probability(scores[i], scores[j]) - 0.5) for i, j in _pairs(len(scores))
    )


def largest_disagreement(main: Sequence[float], heldout: Sequence[float]) -> float:
    """The largest |p_main - p_heldout| over the task's pairs: where the two models, trained
    on separate prompts, disagree most about which candidate is better."""
    if len(main) != len(heldout):
        raise ValueError(f"{len(main)} main scores but {len(heldout)} held-out scores")
    return max(
        abs(
            preference_probability(main[i], main[j])
            - preference_probability(heldout[i], heldout[j])
        )
        for i, j in _pairs(len(main))
    )


@dataclass(frozen=True)
class TaskView:
    """What the strategies need of one task (a `task_predictions` row without its ids)."""

    uncertainty: float
    disagreement: float | None  # None: no held-out model scored every candidate


def task_prediction(main: Sequence[float], heldout: Sequence[float] | None = None) -> TaskView:
    """A task's uncertainty and disagreement from its candidates' scores (in the same order)."""
    return TaskView(
        uncertainty=closest_pair_uncertainty(main),
        disagreement=largest_disagreement(main, heldout) if heldout is not None else None,
    )


def strategy_settings(settings: Mapping[str, Any] | None) -> tuple[AssignmentStrategy, float]:
    """The strategy and random share a project asks for; unknown or bad values fall back to the
    defaults, since a typo in a settings blob must not stop labeling."""
    settings = settings or {}
    try:
        strategy = AssignmentStrategy(settings.get(STRATEGY_SETTING, "default"))
    except ValueError:
        strategy = AssignmentStrategy.default
    share = settings.get(RANDOM_SHARE_SETTING, DEFAULT_RANDOM_SHARE)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        share = DEFAULT_RANDOM_SHARE
    return strategy, float(share)


def _check_share(random_share: float) -> None:
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share}")


def is_random_slot(position: int, random_share: float) -> bool:
    """Whether output position `position` (0-based) is a uniformly random pick.

    Deterministic and evenly spread: exactly floor(n * share) of the first n positions are
    random, so a batch of 10 with share 0.2 has two random picks, wherever it is cut.
    """
    return math.floor((position + 1) * random_share + 1e-9) > math.floor(
        position * random_share + 1e-9
    )


def mix_random(
    ranked: Sequence[Candidate], rng: random.Random, random_share: float
) -> list[Candidate]:
    """Interleave `ranked` (most wanted first) with uniformly random picks from what is left."""
    _check_share(random_share)
    left = list(ranked)  # not yet placed, still most wanted first
    out: list[Candidate] = []
    for position in range(len(left)):
        index = rng.randrange(len(left)) if is_random_slot(position, random_share) else 0
        out.append(left.pop(index))
    return out


def _tiebreak(candidates: Sequence[Candidate], rng: random.Random) -> dict[int, float]:
    """One random key per task, drawn in input order, so equal scores do not favour low ids."""
    return {id(c): rng.random() for c in candidates}


def uncertainty_order(
    candidates: Sequence[Candidate],
    predicted: Mapping[int, float],
    rng: random.Random,
    random_share: float = DEFAULT_RANDOM_SHARE,
) -> list[Candidate]:
    """Most uncertain first (|p - 0.5| smallest), unscored tasks last in random order, with a
    `random_share` of uniformly random picks interleaved."""
    _check_share(random_share)
    ties = _tiebreak(candidates, rng)
    scored = [c for c in candidates if c.task_id in predicted]
    unscored = [c for c in candidates if c.task_id not in predicted]
    scored.sort(key=lambda c: (abs(predicted[c.task_id] - 0.5), ties[id(c)]))
    unscored.sort(key=lambda c: ties[id(c)])
    return mix_random([*scored, *unscored], rng, random_share)


def disagreement_order(
    candidates: Sequence[Candidate],
    main: Mapping[int, float],
    heldout: Mapping[int, float],
    rng: random.Random,
    random_share: float = DEFAULT_RANDOM_SHARE,
) -> list[Candidate]:
    """Largest |p_main - p_heldout| first, ties by the main model's uncertainty; tasks only the
    main model scored come next (by uncertainty), unscored last; plus the random share."""
    _check_share(random_share)
    ties = _tiebreak(candidates, rng)
    both = [c for c in candidates if c.task_id in main and c.task_id in heldout]
    main_only = [c for c in candidates if c.task_id in main and c.task_id not in heldout]
    neither = [c for c in candidates if c.task_id not in main]
    both.sort(
        key=lambda c: (
            -abs(main[c.task_id] - heldout[c.task_id]),
            abs(main[c.task_id] - 0.5),
            ties[id(c)],
        )
    )
    main_only.sort(key=lambda c: (abs(main[c.task_id] - 0.5), ties[id(c)]))
    neither.sort(key=lambda c: ties[id(c)])
    return mix_random([*both, *main_only, *neither], rng, random_share)
