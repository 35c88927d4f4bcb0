"""Recording an annotator's verdict: exactly once, and never beyond what the task needs.

Browsers resend forms and networks retry, so a judgment carries a client key: the same key
from the same user returns the stored row instead of a second one. The task row is locked
while its counter is read and bumped (see app.services.tasks), and the unique constraints on
(task_id, user_id) and client_key back this up if anything slips through.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.domain import assignment, rankings
from app.errors import AlreadyJudged, Conflict, InvalidInput, LeaseExpired, NotFound
from app.models import Judgment, Lease, Task, TaskState, User
from app.services.tasks import live_leases_of_others, lock_task

MAX_RATIONALE_CHARS = 10_000
MAX_CLIENT_KEY_CHARS = 128


def _check_input(
    ranking: Sequence[Any] | None,
    choice: int | str | None,
    strength: int | None,
    rationale: str | None,
    client_key: str | None,
    time_spent_ms: int | None,
) -> None:
    if (ranking is None) == (choice is None):
        raise InvalidInput("send exactly one of 'ranking' or 'choice'")
    if strength is not None and strength not in (1, 2, 3):
        raise InvalidInput("strength must be 1, 2 or 3")
    if rationale is not None and len(rationale) > MAX_RATIONALE_CHARS:
        raise InvalidInput(f"rationale is limited to {MAX_RATIONALE_CHARS} characters")
    if client_key is not None and not 0 < len(client_key) <= MAX_CLIENT_KEY_CHARS:
        raise InvalidInput(f"client_key must be 1-{MAX_CLIENT_KEY_CHARS} characters")
    if time_spent_ms is not None and time_spent_ms < 0:
        raise InvalidInput("time_spent_ms cannot be negative")


def _verdict(
    task: Task, ranking: Sequence[Any] | None, choice: int | str | None
) -> rankings.Verdict:
    try:
        if choice is not None:
            return rankings.from_choice(choice, task.completion_ids)
        assert ranking is not None
        return rankings.Verdict(rankings.normalize(ranking, task.completion_ids))
    except rankings.RankingError as exc:
        raise InvalidInput(str(exc)) from None


def _replay(session: Session, task_id: int, user: User, client_key: str) -> Judgment | None:
    """The judgment this key already stored for this user and task; Conflict on misuse."""
    stored = session.scalar(select(Judgment).where(Judgment.client_key == client_key))
    if stored is None:
        return None
    if stored.user_id != user.id:
        raise Conflict("this client_key was already used by another user; generate a new one")
    if stored.task_id != task_id:
        raise Conflict(f"this client_key was already used for task {stored.task_id}")
    return stored


def record(
    session: Session,
    task_id: int,
    user: User,
    *,
    ranking: Sequence[Any] | None = None,
    choice: int | str | None = None,
    strength: int | None = None,
    rationale: str | None = None,
    client_key: str | None = None,
    time_spent_ms: int | None = None,
    now: datetime,
) -> tuple[Judgment, bool]:
    """Store `user`'s verdict on a task; returns (judgment, created).

    A pairwise verdict is a `choice` (a completion id, "tie" or "both_bad"); any task takes a
    `ranking` of tie groups, best first. A judgment whose lease expired (or was never taken)
    is still accepted while the task needs it, since the work was done in good faith; it is
    refused with LeaseExpired only when others filled the slots meanwhile.
    """
    now = assignment.as_utc(now)
    if rationale is not None:
        rationale = rationale.strip() or None
    _check_input(ranking, choice, strength, rationale, client_key, time_spent_ms)

    task = lock_task(session, task_id)
    if task is None:
        raise NotFound(f"no task {task_id}")
    if client_key is not None and (stored := _replay(session, task_id, user, client_key)):
        return stored, False
    verdict = _verdict(task, ranking, choice)
    if session.scalar(
        select(Judgment.id).where(Judgment.task_id == task_id, Judgment.user_id == user.id)
    ):
        raise AlreadyJudged(f"you have already judged task {task_id}")

    lease = session.scalar(select(Lease).where(Lease.task_id == task_id, Lease.user_id == user.id))
    live = lease is not None and assignment.is_live(lease.expires_at, now)
    others = 0 if live else live_leases_of_others(session, task_id, user.id, now)
    if task.state is not TaskState.open or not assignment.has_free_slot(
        task.required_judgments, task.judgment_count, others
    ):
        if lease is not None:
            session.delete(lease)
            session.flush()
        raise LeaseExpired(
            f"task {task_id} no longer needs a judgment (your lease ran out and others "
            "completed it); your answer was not stored, please continue with the next task"
        )

    judgment = Judgment(
        project_id=task.project_id,
        task_id=task.id,
        user_id=user.id,
        ranking=verdict.ranking,
        none_acceptable=verdict.none_acceptable,
        strength=strength,
        rationale=rationale,
        display_order=list(lease.display_order if lease is not None else task.completion_ids),
        time_spent_ms=time_spent_ms,
        client_key=client_key,
        is_gold=task.is_gold,
        created_at=now,
    )
    try:
        with session.begin_nested():
            session.add(judgment)
    except IntegrityError:
        # A concurrent request with the same client key won; hand back its row.
        if client_key is not None and (stored := _replay(session, task_id, user, client_key)):
            return stored, False
        raise AlreadyJudged(f"you have already judged task {task_id}") from None

    task.judgment_count += 1
    if task.judgment_count >= task.required_judgments:
        task.state = TaskState.done
    if lease is not None:
        session.delete(lease)
    session.flush()
    return judgment, True
