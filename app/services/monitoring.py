"""What an admin watches while a project is being labeled: task states, daily throughput per
annotator, annotators' gold accuracy and speed, and the leases that are open right now.

Read-only. Every query is bounded by the project (and by days or a row limit), so the page
stays fast while hundreds of annotators write.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Date, Integer, case, cast, func, select
from sqlalchemy.orm import Session

from app.domain import assignment
from app.models import Judgment, Lease, Project, Prompt, Task, TaskState, User
from app.services import gold, projects

LEASE_ROWS = 500
"""Open leases listed at most (the count is always exact)."""
MAX_DAYS = 366


@dataclass(frozen=True)
class TaskStates:
    """Normal tasks by state (`in_progress`: open with some judgments; `leased`: open tasks
    someone holds right now), and gold tasks apart, since they never finish."""

    open: int
    in_progress: int
    done: int
    retired: int
    leased: int
    gold: int

    @property
    def total(self) -> int:
        return self.open + self.done + self.retired


@dataclass(frozen=True)
class AnnotatorStats:
    user_id: int
    username: str
    active: bool
    judgments: int
    gold_judged: int
    gold_correct: int
    median_seconds: float | None
    last_judgment_at: datetime | None

    @property
    def gold_accuracy(self) -> float | None:
        return self.gold_correct / self.gold_judged if self.gold_judged else None


@dataclass(frozen=True)
class Activity:
    """Judgments per annotator per UTC day over `days` (oldest first), zeros included."""

    days: list[date]
    users: list[tuple[int, str]]
    counts: dict[int, list[int]]

    @property
    def totals(self) -> list[int]:
        return [sum(col) for col in zip(*self.counts.values(), strict=True)] or [0] * len(self.days)


@dataclass(frozen=True)
class OpenLease:
    task_id: int
    prompt_external_id: str
    user_id: int
    username: str
    created_at: datetime
    expires_at: datetime
    expires_in_s: float
    is_gold: bool


@dataclass(frozen=True)
class LeaseTable:
    count: int
    rows: list[OpenLease]


@dataclass(frozen=True)
class Overview:
    project: Project
    tasks: TaskStates
    annotators: list[AnnotatorStats]
    activity: Activity
    leases: LeaseTable
    gold_tasks: list[gold.GoldTaskStats]


def task_states(session: Session, project_id: int, *, now: datetime) -> TaskStates:
    now = assignment.as_utc(now)
    normal = Task.is_gold.is_(False)
    counts = {state: 0 for state in TaskState}
    for state, n in session.execute(
        select(Task.state, func.count())
        .where(Task.project_id == project_id, normal)
        .group_by(Task.state)
    ):
        counts[TaskState(state)] = int(n)
    in_progress = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(
            Task.project_id == project_id,
            normal,
            Task.state == TaskState.open,
            Task.judgment_count > 0,
        )
    )
    leased = session.scalar(
        select(func.count(func.distinct(Lease.task_id)))
        .join(Task, Task.id == Lease.task_id)
        .where(
            Task.project_id == project_id,
            normal,
            Task.state == TaskState.open,
            Lease.expires_at > now,
        )
    )
    gold_count = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(Task.project_id == project_id, Task.is_gold.is_(True))
    )
    return TaskStates(
        open=counts[TaskState.open],
        in_progress=int(in_progress or 0),
        done=counts[TaskState.done],
        retired=counts[TaskState.retired],
        leased=int(leased or 0),
        gold=int(gold_count or 0),
    )


def _median_seconds(session: Session, project_id: int) -> dict[int, float]:
    """Median time per judgment, per annotator, from the browser-measured `time_spent_ms`.

    Postgres computes it (percentile_cont); SQLite has no median, so the values come back and
    Python takes it; both are tested to agree.
    """
    where = (Judgment.project_id == project_id, Judgment.time_spent_ms.is_not(None))
    if session.get_bind().dialect.name == "postgresql":
        median = func.percentile_cont(0.5).within_group(Judgment.time_spent_ms)
        rows = session.execute(
            select(Judgment.user_id, median).where(*where).group_by(Judgment.user_id)
        )
        return {int(u): float(m) / 1000.0 for u, m in rows if m is not None}
    spent: dict[int, list[int]] = defaultdict(list)
    for user_id, ms in session.execute(
        select(Judgment.user_id, Judgment.time_spent_ms).where(*where)
    ):
        if ms is not None:
            spent[int(user_id)].append(int(ms))
    return {u: statistics.median(v) / 1000.0 for u, v in spent.items()}


def annotators(session: Session, project_id: int) -> list[AnnotatorStats]:
    """Everyone who judged in the project: counts (gold apart), gold accuracy, median speed."""
    projects.get(session, project_id)
    is_gold = Judgment.is_gold.is_(True)
    rows = session.execute(
        select(
            User.id,
            User.username,
            User.active,
            func.count(Judgment.id),
            func.sum(cast(is_gold, Integer)),
            func.sum(case((Judgment.gold_correct.is_(True), 1), else_=0)),
            func.max(Judgment.created_at),
        )
        .join(Judgment, Judgment.user_id == User.id)
        .where(Judgment.project_id == project_id)
        .group_by(User.id, User.username, User.active)
        .order_by(func.count(Judgment.id).desc(), User.username)
    )
    medians = _median_seconds(session, project_id)
    out = []
    for uid, name, active, n, n_gold, n_correct, last in rows:
        out.append(
            AnnotatorStats(
                user_id=int(uid),
                username=name,
                active=bool(active),
                judgments=int(n) - int(n_gold or 0),
                gold_judged=int(n_gold or 0),
                gold_correct=int(n_correct or 0),
                median_seconds=medians.get(int(uid)),
                last_judgment_at=assignment.as_utc(last) if last is not None else None,
            )
        )
    return out


def activity(session: Session, project_id: int, *, now: datetime, days: int = 14) -> Activity:
    """Judgments (gold included: it is work done) per annotator per UTC day, last `days`."""
    projects.get(session, project_id)
    days = max(1, min(days, MAX_DAYS))
    today = assignment.as_utc(now).date()
    first = today - timedelta(days=days - 1)
    since = datetime(first.year, first.month, first.day, tzinfo=UTC)
    day: ColumnElement[Any] = (
        cast(func.timezone("UTC", Judgment.created_at), Date)
        if session.get_bind().dialect.name == "postgresql"
        else func.date(Judgment.created_at)
    )
    rows = session.execute(
        select(Judgment.user_id, User.username, day.label("day"), func.count())
        .join(User, User.id == Judgment.user_id)
        .where(Judgment.project_id == project_id, Judgment.created_at >= since)
        .group_by(Judgment.user_id, User.username, day)
    )
    span = [first + timedelta(days=i) for i in range(days)]
    index = {d: i for i, d in enumerate(span)}
    counts: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for user_id, username, raw_day, n in rows:
        d = raw_day if isinstance(raw_day, date) else date.fromisoformat(str(raw_day))
        if d not in index:
            continue
        names[int(user_id)] = username
        counts.setdefault(int(user_id), [0] * days)[index[d]] += int(n)
    users = sorted(names.items(), key=lambda item: item[1])
    return Activity(days=span, users=users, counts={u: counts[u] for u, _ in users})


def open_leases(
    session: Session, project_id: int, *, now: datetime, limit: int = LEASE_ROWS
) -> LeaseTable:
    """Leases alive right now, soonest to expire first."""
    projects.get(session, project_id)
    now = assignment.as_utc(now)
    where = (Task.project_id == project_id, Lease.expires_at > now)
    count = session.scalar(
        select(func.count()).select_from(Lease).join(Task, Task.id == Lease.task_id).where(*where)
    )
    rows = session.execute(
        select(
            Lease.task_id,
            Prompt.external_id,
            Lease.user_id,
            User.username,
            Lease.created_at,
            Lease.expires_at,
            Task.is_gold,
        )
        .join(Task, Task.id == Lease.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(User, User.id == Lease.user_id)
        .where(*where)
        .order_by(Lease.expires_at, Lease.id)
        .limit(limit)
    )
    leases = []
    for task_id, external_id, user_id, username, created, expires, is_gold in rows:
        expires = assignment.as_utc(expires)
        leases.append(
            OpenLease(
                task_id=int(task_id),
                prompt_external_id=external_id,
                user_id=int(user_id),
                username=username,
                created_at=assignment.as_utc(created),
                expires_at=expires,
                expires_in_s=round((expires - now).total_seconds(), 1),
                is_gold=bool(is_gold),
            )
        )
    return LeaseTable(count=int(count or 0), rows=leases)


def gold_tasks(session: Session, project_id: int) -> list[gold.GoldTaskStats]:
    projects.get(session, project_id)
    return gold.task_stats(session, project_id)


def overview(session: Session, project_id: int, *, now: datetime, days: int = 14) -> Overview:
    """Everything on the admin page, in one read."""
    project = projects.get(session, project_id)
    return Overview(
        project=project,
        tasks=task_states(session, project_id, now=now),
        annotators=annotators(session, project_id),
        activity=activity(session, project_id, now=now, days=days),
        leases=open_leases(session, project_id, now=now),
        gold_tasks=gold.task_stats(session, project_id),
    )
