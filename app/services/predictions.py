"""The reward models' view of the labeling queue: completion scores and task predictions.

The active-learning strategies (app.domain.active) order tasks by what the current reward
models think of them. The worker scores completions (worker/predict.py: after a reward job
with the new models, after a generate job with the current ones) and hands the numbers here:

    completion_scores   one row per (reward model, completion): the model's scalar reward;
    task_predictions    one row per open task, derived from the scores of its candidates
                        under the project's main reward model and its held-out partner.

Scores are facts about a model and never go stale; predictions are replaced whenever the
main model changes (`refresh_task_predictions`), so a task's prediction is always the
current models' opinion, or absent. The claim code (app.services.tasks) reads only
`task_predictions`, in SQL, which keeps the model out of the labeling hot path.

Both writes are upserts (``INSERT … ON CONFLICT DO UPDATE`` on Postgres and SQLite alike), so a
retried job or two workers scoring the same completions never fail on a duplicate key.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.domain import active
from app.errors import InvalidInput, NotFound
from app.models import (
    Completion,
    CompletionScore,
    Job,
    Project,
    Prompt,
    Task,
    TaskPrediction,
    TaskState,
)
from app.services import training_data

_CHUNK = 500
"""Ids per IN list and rows per upsert (well under SQLite's bound-parameter limit)."""
METRICS_KEY = "predictions"
"""Where a job's metrics record its scoring (see `record_scoring`)."""


@dataclass(frozen=True)
class ScoringInput:
    """One prompt's completions to score, with the prompt rendered as the trainer sees it."""

    prompt_id: int
    prompt: str
    completions: list[tuple[int, str]]  # (completion id, text)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _upsert(session: Session, table: Any, rows: list[dict[str, Any]], keys: list[str]) -> None:
    """Insert `rows`, replacing the non-key columns of rows whose `keys` exist already."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for chunk in _chunks(rows):
        stmt = insert(table).values(list(chunk))
        updates = {c: stmt.excluded[c] for c in chunk[0] if c not in keys}
        session.execute(stmt.on_conflict_do_update(index_elements=keys, set_=updates))


# --- completion scores ------------------------------------------------------------------------


def store_scores(session: Session, model_version_id: int, scores: Mapping[int, float]) -> int:
    """Record `model_version_id`'s score of each completion (replacing an earlier one);
    returns how many were written. A non-finite score is refused: it would poison every
    prediction built on it."""
    bad = sorted(cid for cid, s in scores.items() if not math.isfinite(s))
    if bad:
        raise InvalidInput(f"non-finite scores for completion(s) {bad[:10]}")
    rows = [
        {"model_version_id": model_version_id, "completion_id": int(cid), "score": float(s)}
        for cid, s in sorted(scores.items())
    ]
    _upsert(session, CompletionScore.__table__, rows, ["model_version_id", "completion_id"])
    return len(rows)


def scores_of(
    session: Session, model_version_id: int, completion_ids: Iterable[int]
) -> dict[int, float]:
    """The stored scores of `model_version_id` for those of `completion_ids` it has scored."""
    found: dict[int, float] = {}
    for chunk in _chunks(sorted(set(completion_ids))):
        stmt = select(CompletionScore.completion_id, CompletionScore.score).where(
            CompletionScore.model_version_id == model_version_id,
            CompletionScore.completion_id.in_(chunk),
        )
        found.update((int(cid), float(s)) for cid, s in session.execute(stmt))
    return found


def _project_exists(session: Session, project_id: int) -> bool:
    return session.get(Project, project_id) is not None


def _open_tasks(
    session: Session, project_id: int, task_ids: Iterable[int] | None = None
) -> list[tuple[int, list[int]]]:
    """(id, completion ids) of the project's open non-gold tasks (of `task_ids`, if given).

    Gold tasks are left out: they are mixed in by the gold rate, never by a strategy.
    """
    stmt = (
        select(Task.id, Task.completion_ids)
        .where(
            Task.project_id == project_id,
            Task.state == TaskState.open,
            Task.is_gold.is_(False),
        )
        .order_by(Task.id)
    )
    if task_ids is None:
        return [(int(t), [int(c) for c in cids]) for t, cids in session.execute(stmt)]
    found: list[tuple[int, list[int]]] = []
    for chunk in _chunks(sorted(set(task_ids))):
        rows = session.execute(stmt.where(Task.id.in_(chunk)))
        found.extend((int(t), [int(c) for c in cids]) for t, cids in rows)
    return sorted(found)


def open_task_ids(session: Session, project_id: int, prompt_ids: Iterable[int]) -> list[int]:
    """The open non-gold tasks of the project over any of `prompt_ids`."""
    found: list[int] = []
    for chunk in _chunks(sorted(set(prompt_ids))):
        found.extend(
            session.scalars(
                select(Task.id).where(
                    Task.project_id == project_id,
                    Task.state == TaskState.open,
                    Task.is_gold.is_(False),
                    Task.prompt_id.in_(chunk),
                )
            )
        )
    return sorted(int(t) for t in found)


def open_task_completions(session: Session, project_id: int) -> list[int]:
    """The completions shown by the project's open non-gold tasks, by id (task completion
    ids live in a JSON list, so the set is built here rather than by a join)."""
    if not _project_exists(session, project_id):
        raise NotFound(f"no project {project_id}")
    return sorted({cid for _, cids in _open_tasks(session, project_id) for cid in cids})


def unscored_completions(session: Session, project_id: int, model_version_id: int) -> list[int]:
    """Completions shown by the project's open non-gold tasks that `model_version_id` has
    not scored yet, by id."""
    wanted = open_task_completions(session, project_id)
    scored = scores_of(session, model_version_id, wanted)
    return [cid for cid in wanted if cid not in scored]


def scoring_inputs(session: Session, completion_ids: Iterable[int]) -> list[ScoringInput]:
    """The completions' texts grouped by prompt (prompt id order), each prompt rendered as
    reward training renders it (`training_data.prompt_text`), so scores match training."""
    by_prompt: dict[int, list[tuple[int, str]]] = defaultdict(list)
    prompts: dict[int, Prompt] = {}
    for chunk in _chunks(sorted(set(completion_ids))):
        rows = session.execute(
            select(Completion.id, Completion.text, Prompt)
            .join(Prompt, Prompt.id == Completion.prompt_id)
            .where(Completion.id.in_(chunk))
        )
        for cid, text, prompt in rows:
            by_prompt[prompt.id].append((int(cid), text))
            prompts[prompt.id] = prompt
    return [
        ScoringInput(pid, training_data.prompt_text(prompts[pid]), sorted(by_prompt[pid]))
        for pid in sorted(by_prompt)
    ]


def completions_by_text(
    session: Session, prompt_ids: Iterable[int]
) -> dict[tuple[int, str], list[int]]:
    """Completion ids of the prompts keyed by (prompt id, text): how scores computed for
    sampled texts before they were stored find their rows afterwards."""
    found: dict[tuple[int, str], list[int]] = defaultdict(list)
    for chunk in _chunks(sorted(set(prompt_ids))):
        rows = session.execute(
            select(Completion.prompt_id, Completion.text, Completion.id).where(
                Completion.prompt_id.in_(chunk)
            )
        )
        for pid, text, cid in rows:
            found[(int(pid), text)].append(int(cid))
    return dict(found)


# --- task predictions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Refreshed:
    predicted: int  # tasks whose prediction was (re)written
    unscored: int  # open tasks left without one (a candidate lacks a main-model score)


def refresh_task_predictions(
    session: Session,
    project_id: int,
    main_model_id: int,
    heldout_model_id: int | None = None,
    task_ids: Iterable[int] | None = None,
    *,
    now: datetime | None = None,
) -> Refreshed:
    """Recompute the predictions of the project's open non-gold tasks (of `task_ids`, if
    given) from the stored scores of the main model and its held-out partner.

    A task whose candidates the main model has not all scored loses its prediction: a row
    from an older model would rank it by an opinion nobody holds any more. Disagreement is
    None unless the held-out model scored every candidate too.
    """
    if not _project_exists(session, project_id):
        raise NotFound(f"no project {project_id}")
    now = now or datetime.now(UTC)
    tasks = _open_tasks(session, project_id, task_ids)
    wanted = {cid for _, cids in tasks for cid in cids}
    main = scores_of(session, main_model_id, wanted)
    heldout = scores_of(session, heldout_model_id, wanted) if heldout_model_id is not None else {}
    rows: list[dict[str, Any]] = []
    stale: list[int] = []
    for task_id, cids in tasks:
        if len(cids) < 2 or any(c not in main for c in cids):
            stale.append(task_id)
            continue
        partner = [heldout[c] for c in cids] if all(c in heldout for c in cids) else None
        view = active.task_prediction([main[c] for c in cids], partner)
        rows.append(
            {
                "task_id": task_id,
                "reward_model_id": main_model_id,
                "heldout_model_id": heldout_model_id if partner is not None else None,
                "uncertainty": view.uncertainty,
                "disagreement": view.disagreement,
                "scored_at": now,
            }
        )
    _upsert(session, TaskPrediction.__table__, rows, ["task_id"])
    for chunk in _chunks(stale):
        session.execute(
            delete(TaskPrediction)
            .where(TaskPrediction.task_id.in_(chunk))
            .execution_options(synchronize_session=False)
        )
    session.flush()
    return Refreshed(predicted=len(rows), unscored=len(stale))


def record_scoring(session: Session, job_id: int, summary: Mapping[str, Any]) -> None:
    """Merge `summary` into the job's ``metrics["predictions"]``: how its scoring went, kept
    with the job even when the job itself had already succeeded."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    metrics = dict(job.metrics or {})
    metrics[METRICS_KEY] = {**(metrics.get(METRICS_KEY) or {}), **summary}
    job.metrics = metrics  # a new dict: JSON columns do not track in-place changes
    session.flush()
