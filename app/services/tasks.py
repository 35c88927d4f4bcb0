"""Handing tasks to annotators: claim the next one, keep its lease alive, skip it.

A lease reserves one of a task's `required_judgments` slots for one annotator. The counter
`tasks.judgment_count` lives on the task row, and every change to a task's slots (a new lease,
a re-extended expired lease, a judgment) happens while that row is locked, so the row lock is
what serializes them. On Postgres the claim takes the row with ``FOR UPDATE SKIP LOCKED`` and
then re-checks eligibility in new statements: under READ COMMITTED a check folded into the
locking statement's subquery sees a stale snapshot and over-assigns (DESIGN.md, "Task
assignment: a known trap"). On SQLite every transaction begins IMMEDIATE, so writers are
already serialized and the same code is correct; ``FOR UPDATE`` renders as nothing there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.domain import assignment
from app.errors import LeaseExpired, NoTaskLeft, NotFound
from app.models import Completion, Judgment, Lease, Project, Prompt, Skip, Task, TaskState, User

CANDIDATE_BATCH = 50
"""Eligible tasks fetched per round; the strategy orders them, then they are locked in turn."""


@dataclass(frozen=True)
class Claim:
    """A task reserved for one annotator, with its candidates in the order they are shown."""

    project: Project
    task: Task
    prompt: Prompt
    candidates: list[tuple[int, str]]
    lease_expires_at: datetime


@dataclass(frozen=True)
class Progress:
    judged_by_user: int
    open_tasks: int


@dataclass(frozen=True)
class LabelPage:
    """Everything the labeling page shows: the claim (None when all is done) and progress."""

    project: Project
    claim: Claim | None
    progress: Progress


@dataclass(frozen=True)
class Queue:
    project: Project
    open_tasks: int


def _get_project(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id}")
    return project


def lock_task(session: Session, task_id: int, *, skip_locked: bool = False) -> Task | None:
    """Lock the task row and reload it, so its counter is the latest committed value."""
    stmt = (
        select(Task)
        .where(Task.id == task_id)
        .with_for_update(skip_locked=skip_locked)
        .execution_options(populate_existing=True)
    )
    return session.execute(stmt).scalar_one_or_none()


def live_leases_of_others(session: Session, task_id: int, user_id: int, now: datetime) -> int:
    """Counted in its own statement, after the task lock is held (see the module docstring)."""
    stmt = (
        select(func.count())
        .select_from(Lease)
        .where(Lease.task_id == task_id, Lease.user_id != user_id, Lease.expires_at > now)
    )
    return int(session.scalar(stmt) or 0)


def _has_judged(session: Session, task_id: int, user_id: int) -> bool:
    stmt = select(Judgment.id).where(Judgment.task_id == task_id, Judgment.user_id == user_id)
    return session.scalar(stmt) is not None


def _has_skipped(session: Session, prompt_id: int, user_id: int) -> bool:
    stmt = select(Skip.id).where(Skip.prompt_id == prompt_id, Skip.user_id == user_id)
    return session.scalar(stmt) is not None


def _slot_free_for(session: Session, task: Task, user: User, now: datetime) -> bool:
    """Whether `user` may take (or keep) a slot on the locked `task` right now."""
    if task.state is not TaskState.open:
        return False
    others = live_leases_of_others(session, task.id, user.id, now)
    return assignment.has_free_slot(task.required_judgments, task.judgment_count, others)


def _lease_seconds(session: Session, project_id: int, lease_seconds: int | None) -> int:
    if lease_seconds is not None:
        return lease_seconds
    return _get_project(session, project_id).lease_seconds


def _build_claim(session: Session, project: Project, task: Task, lease: Lease) -> Claim:
    rows = session.execute(
        select(Completion.id, Completion.text).where(Completion.id.in_(lease.display_order))
    )
    texts = {cid: text for cid, text in rows}
    prompt = session.get(Prompt, task.prompt_id)
    assert prompt is not None  # foreign key
    return Claim(
        project=project,
        task=task,
        prompt=prompt,
        candidates=[(cid, texts[cid]) for cid in lease.display_order],
        lease_expires_at=assignment.as_utc(lease.expires_at),
    )


def _held_lease(session: Session, project_id: int, user: User, now: datetime) -> Lease | None:
    """The user's live lease on an open task of this project, if any (oldest first)."""
    stmt = (
        select(Lease)
        .join(Task, Task.id == Lease.task_id)
        .where(
            Lease.user_id == user.id,
            Lease.expires_at > now,
            Task.project_id == project_id,
            Task.state == TaskState.open,
        )
        .order_by(Lease.created_at, Lease.id)
        .limit(1)
    )
    return session.scalar(stmt)


def _candidate_batch(
    session: Session, project_id: int, user: User, now: datetime, tried: set[int]
) -> list[assignment.Candidate]:
    """A pre-filter only: the counts here come from one snapshot and are re-checked under lock."""
    live_leases = (
        select(func.count())
        .select_from(Lease)
        .where(Lease.task_id == Task.id, Lease.user_id != user.id, Lease.expires_at > now)
        .scalar_subquery()
    )
    judged = select(Judgment.id).where(Judgment.task_id == Task.id, Judgment.user_id == user.id)
    skipped = select(Skip.id).where(Skip.prompt_id == Task.prompt_id, Skip.user_id == user.id)
    stmt = (
        select(Task.id, Task.judgment_count, Task.priority)
        .where(
            Task.project_id == project_id,
            Task.state == TaskState.open,
            Task.judgment_count + live_leases < Task.required_judgments,
            ~judged.exists(),
            ~skipped.exists(),
        )
        .order_by(Task.judgment_count.desc(), Task.priority.desc(), Task.id)
        .limit(CANDIDATE_BATCH)
    )
    if tried:
        stmt = stmt.where(Task.id.not_in(tried))
    return [assignment.Candidate(*row) for row in session.execute(stmt)]


def claim_next(
    session: Session,
    project_id: int,
    user: User,
    *,
    now: datetime,
    rng: random.Random,
    lease_seconds: int | None = None,
    strategy: assignment.Strategy = assignment.default_order,
) -> Claim:
    """Reserve the next task for `user`, or give back the one they already hold.

    Holding a live lease means a page reload shows the same task instead of consuming
    another. `lease_seconds=None` uses the project's setting. Raises NoTaskLeft when nothing
    is left for this user (all judged, skipped, or fully reserved by others).
    """
    now = assignment.as_utc(now)
    project = _get_project(session, project_id)
    seconds = lease_seconds if lease_seconds is not None else project.lease_seconds

    held = _held_lease(session, project_id, user, now)
    if held is not None:
        task = session.get(Task, held.task_id)
        assert task is not None
        return _build_claim(session, project, task, held)

    # The user's own expired reservations in this project are dead weight; drop them.
    expired_own = select(Task.id).where(Task.project_id == project_id).scalar_subquery()
    session.execute(
        delete(Lease)
        .where(Lease.user_id == user.id, Lease.expires_at <= now, Lease.task_id.in_(expired_own))
        .execution_options(synchronize_session=False)
    )

    tried: set[int] = set()
    while True:
        batch = _candidate_batch(session, project_id, user, now, tried)
        if not batch:
            raise NoTaskLeft("no task left for you in this project")
        for candidate in strategy(batch, rng):
            tried.add(candidate.task_id)
            task = lock_task(session, candidate.task_id, skip_locked=True)
            if task is None:  # another annotator holds the row right now
                continue
            # Re-check in new statements now that the lock is held.
            if (
                task.project_id != project_id
                or not _slot_free_for(session, task, user, now)
                or _has_judged(session, task.id, user.id)
                or _has_skipped(session, task.prompt_id, user.id)
            ):
                continue
            session.execute(
                delete(Lease)
                .where(Lease.task_id == task.id, Lease.expires_at <= now)
                .execution_options(synchronize_session=False)
            )
            lease = Lease(
                task_id=task.id,
                user_id=user.id,
                display_order=assignment.display_order(task.completion_ids, rng),
                created_at=now,
                expires_at=now + timedelta(seconds=seconds),
            )
            session.add(lease)
            session.flush()
            return _build_claim(session, project, task, lease)


def heartbeat(
    session: Session, task_id: int, user: User, *, now: datetime, lease_seconds: int | None = None
) -> datetime:
    """Extend the user's lease and return the new expiry.

    An expired lease is revived when the task still needs a judgment and nobody else took
    the slot (a laptop that slept for a while should not lose its work); otherwise it is
    dropped and LeaseExpired is raised.
    """
    now = assignment.as_utc(now)
    task = lock_task(session, task_id)
    if task is None:
        raise NotFound(f"no task {task_id}")
    lease = session.scalar(select(Lease).where(Lease.task_id == task_id, Lease.user_id == user.id))
    if lease is None:
        raise LeaseExpired(f"you hold no lease on task {task_id}; load the next task")
    if not _slot_free_for(session, task, user, now):
        session.delete(lease)
        session.flush()
        raise LeaseExpired(
            f"your lease on task {task_id} ran out and the task no longer needs you; "
            "load the next task"
        )
    seconds = _lease_seconds(session, task.project_id, lease_seconds)
    lease.expires_at = max(assignment.as_utc(lease.expires_at), now + timedelta(seconds=seconds))
    session.flush()
    return assignment.as_utc(lease.expires_at)


def skip(session: Session, task_id: int, user: User) -> None:
    """Pass on a task: the user is never offered tasks from its prompt again."""
    task = session.get(Task, task_id)
    if task is None:
        raise NotFound(f"no task {task_id}")
    if not _has_skipped(session, task.prompt_id, user.id):
        try:
            with session.begin_nested():
                session.add(Skip(user_id=user.id, prompt_id=task.prompt_id, task_id=task.id))
        except IntegrityError:
            pass  # a double click recorded the same skip a moment ago
    same_prompt = select(Task.id).where(Task.prompt_id == task.prompt_id).scalar_subquery()
    session.execute(
        delete(Lease)
        .where(Lease.user_id == user.id, Lease.task_id.in_(same_prompt))
        .execution_options(synchronize_session=False)
    )
    session.flush()


def progress(session: Session, project_id: int, user: User) -> Progress:
    judged = session.scalar(
        select(func.count())
        .select_from(Judgment)
        .where(Judgment.project_id == project_id, Judgment.user_id == user.id)
    )
    open_tasks = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(Task.project_id == project_id, Task.state == TaskState.open)
    )
    return Progress(judged_by_user=int(judged or 0), open_tasks=int(open_tasks or 0))


def label_page(
    session: Session,
    project_id: int,
    user: User,
    *,
    now: datetime,
    rng: random.Random,
    lease_seconds: int | None = None,
) -> LabelPage:
    """The labeling page's data: a claim, or None when the user is done, plus progress."""
    project = _get_project(session, project_id)
    try:
        claim: Claim | None = claim_next(
            session, project_id, user, now=now, rng=rng, lease_seconds=lease_seconds
        )
    except NoTaskLeft:
        claim = None
    return LabelPage(project=project, claim=claim, progress=progress(session, project_id, user))


def queues(session: Session) -> list[Queue]:
    """Every project with its count of open tasks, for the annotator's start page."""
    open_count = (
        select(Task.project_id, func.count().label("n"))
        .where(Task.state == TaskState.open)
        .group_by(Task.project_id)
        .subquery()
    )
    rows = session.execute(
        select(Project, func.coalesce(open_count.c.n, 0))
        .outerjoin(open_count, open_count.c.project_id == Project.id)
        .order_by(Project.name)
    )
    return [Queue(project=p, open_tasks=int(n)) for p, n in rows]
