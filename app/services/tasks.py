"""Handing tasks to annotators: claim the next one, keep its lease alive, skip it.

A lease reserves one of a task's `required_judgments` slots for one annotator. The counter
`tasks.judgment_count` lives on the task row, and every change to a task's slots (a new lease,
a re-extended expired lease, a judgment) happens while that row is locked, so the row lock is
what serializes them. On Postgres the claim takes the row with ``FOR UPDATE SKIP LOCKED`` and
then re-checks eligibility in new statements: under READ COMMITTED a check folded into the
locking statement's subquery sees a stale snapshot and over-assigns (DESIGN.md, "Task
assignment: a known trap"). On SQLite every transaction begins IMMEDIATE, so writers are
already serialized and the same code is correct; ``FOR UPDATE`` renders as nothing there.

Which open tasks are tried first is the project's assignment strategy: by default partly
judged tasks, then priority; with active learning (app.domain.active), the tasks the reward
models are least sure about, read from `task_predictions` in the same windowed statement
(app.services.predictions keeps that table current).

Gold tasks (app.services.gold) stand outside the slot arithmetic: each annotator may take
each once, and they are mixed into the stream at the project's gold rate (app.domain.gold).

`claim_next` runs on every "next task", so it is kept to seven statements in the common case
(the project; the user's leases; the eligible candidates of a window; lock; re-check; insert
the lease; the prompt and texts), built once at import, with plain INSERTs for the writes,
and reads rows of the tables rather than ORM entities (see Claim).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, TypeAlias, cast

from sqlalchemy import (
    BindParameter,
    Integer,
    Row,
    Select,
    Subquery,
    Table,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.domain import active, assignment, gold
from app.domain.active import AssignmentStrategy
from app.errors import Forbidden, LeaseExpired, NoTaskLeft, NotFound
from app.models import (
    Completion,
    Judgment,
    Lease,
    Project,
    Prompt,
    Skip,
    Task,
    TaskPrediction,
    TaskState,
    User,
)

TableRow: TypeAlias = Row[*tuple[Any, ...]]
"""A row of a table's columns, read by name (``row.id``), as a claim returns them."""

CANDIDATE_BATCH = 50
"""Eligible tasks per round; the strategy orders them, then they are locked in turn."""
CANDIDATE_WINDOW = 200
"""Open tasks per round, taken in strategy-key order, that this user has not judged (see
`_window`), whose other eligibility (live leases of others, skipped prompts) is checked
on this window only. The window itself is read from the claim-order index (migration 0002, tasks
(project_id, state, judgment_count, priority, id)) as a backward scan that stops after the
window's rows, without sorting the project's open tasks. EXPLAIN ANALYZE on Postgres at
29,500 open tasks: 0.3 ms for the whole candidate statement (0.7 ms with 400 ids already
tried); measured earlier at 33,000 open tasks, ~230 ms without the window and ~23 ms with
the window but no index."""
GOLD_BATCH = 200
"""Unseen gold tasks fetched per gold claim; one is picked at random from them."""


@dataclass(frozen=True)
class Claim:
    """A task reserved for one annotator, with its candidates in the order they are shown.

    `project`, `task` and `prompt` are plain rows of their tables (read by column name, as
    the mapped classes are: ``claim.task.id``, ``claim.prompt.messages``), not ORM entities:
    the claim runs on every "next task", and loading entities cost more CPU than its SQL.
    """

    project: TableRow
    task: TableRow
    prompt: TableRow
    candidates: list[tuple[int, str]]
    lease_expires_at: datetime


@dataclass(frozen=True)
class Progress:
    """What the progress bars show. Gold tasks are left out of the task counts (annotators
    must not be able to tell them apart); the user's own count includes gold judgments for
    the same reason."""

    judged_by_user: int
    open_tasks: int
    done_tasks: int = 0
    total_tasks: int = 0

    @property
    def done_percent(self) -> float:
        return 100.0 * self.done_tasks / self.total_tasks if self.total_tasks else 0.0


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


# --- the claim's statements, built once (constants with bind parameters) ---------------------
# A claim runs on every `tasks/next`, so its SQL is built at import instead of per call:
# constructing these expressions cost about as much CPU as executing them.


def _order_keys(strategy: AssignmentStrategy, c: Any) -> list[Any]:
    """The ORDER BY of a window for `strategy`, over columns `c` (by name).

    default: partly judged first, then priority, then newest (the claim-order index).
    uncertainty: partly judged first (finish overlap), then closest to p = 0.5, then id.
    disagreement: partly judged first, then the models' largest disagreement, then the main
    model's uncertainty, then id. Tasks without a prediction (NULL keys) follow the scored
    ones in id order, so they are still reached.
    """
    if strategy is AssignmentStrategy.default:
        return [c.judgment_count.desc(), c.priority.desc(), c.id.desc()]
    keys = [c.judgment_count.desc()]
    if strategy is AssignmentStrategy.disagreement:
        keys.append(c.disagreement.desc().nulls_last())
    return [*keys, c.uncertainty.asc().nulls_last(), c.id.asc()]


def _window(strategy: AssignmentStrategy) -> Subquery:
    """The first CANDIDATE_WINDOW open, non-gold, not-yet-full tasks in strategy-key order
    that this user has not judged.

    The user's own judgments are filtered inside the window, while the index is scanned:
    an annotator far ahead of the others has thousands of their own judged tasks among the
    partly judged ones that lead the order, and filtering them after the window read window
    after window of them, each claim slower than the last (one annotator alone: 34 ms of web
    CPU per judgment after 1,100 judgments). Only partly judged tasks are probed (nobody has
    judged a task whose count is 0), each with a scalar count on the unique (task_id,
    user_id) index: Postgres plans a NOT EXISTS as an anti-join from the statistics, and
    right after an import it read all the user's judgments once per task (190 ms). At 30,000
    open tasks with 5,000 judged by the user, EXPLAIN ANALYZE: 9-10 ms (default window,
    stale or fresh statistics).
    """
    judged_by_user = (
        select(func.count())
        .select_from(Judgment)
        .where(Judgment.task_id == Task.id, Judgment.user_id == bindparam("user_id"))
        .scalar_subquery()
    )
    columns = [Task.id, Task.judgment_count, Task.priority, Task.required_judgments, Task.prompt_id]
    stmt = select(*columns)
    if strategy is not AssignmentStrategy.default:  # the model's view, where there is one
        stmt = select(*columns, TaskPrediction.uncertainty, TaskPrediction.disagreement)
        stmt = stmt.outerjoin(TaskPrediction, TaskPrediction.task_id == Task.id)
    keys = {
        "id": Task.id,
        "judgment_count": Task.judgment_count,
        "priority": Task.priority,
        "uncertainty": TaskPrediction.uncertainty,
        "disagreement": TaskPrediction.disagreement,
    }
    return (
        stmt.where(
            Task.project_id == bindparam("project_id"),
            Task.state == TaskState.open,
            Task.is_gold.is_(False),
            Task.judgment_count < Task.required_judgments,
            Task.id.not_in(bindparam("tried", expanding=True)),
            or_(Task.judgment_count == 0, judged_by_user == 0),
        )
        .order_by(*_order_keys(strategy, SimpleNamespace(**keys)))
        .limit(bindparam("window", type_=Integer))
        .subquery()
    )


def _candidates_statement(strategy: AssignmentStrategy) -> tuple[Select[Any], Select[Any]]:
    """(the eligible tasks of the window, best first; the ids of the whole window)."""
    window = _window(strategy)
    user_id: BindParameter[int] = bindparam("user_id")
    now: BindParameter[datetime] = bindparam("now")
    live_leases = (
        select(func.count())
        .select_from(Lease)
        .where(Lease.task_id == window.c.id, Lease.user_id != user_id, Lease.expires_at > now)
        .scalar_subquery()
    )
    skipped = exists().where(Skip.prompt_id == window.c.prompt_id, Skip.user_id == user_id)
    eligible = (
        select(window.c.id, window.c.judgment_count, window.c.priority)
        .where(window.c.judgment_count + live_leases < window.c.required_judgments, ~skipped)
        .order_by(*_order_keys(strategy, window.c))
        .limit(bindparam("batch", type_=Integer))
    )
    return eligible, select(window.c.id)


_STATEMENTS = {strategy: _candidates_statement(strategy) for strategy in AssignmentStrategy}
"""Per strategy: (eligible candidates of a window, the window's ids)."""

_RECHECK = select(
    select(func.count())
    .select_from(Lease)
    .where(
        Lease.task_id == bindparam("task_id"),
        Lease.user_id != bindparam("user_id"),
        Lease.expires_at > bindparam("now"),
    )
    .scalar_subquery(),
    exists().where(
        Judgment.task_id == bindparam("task_id"), Judgment.user_id == bindparam("user_id")
    ),
    exists().where(Skip.prompt_id == bindparam("prompt_id"), Skip.user_id == bindparam("user_id")),
    exists().where(Lease.task_id == bindparam("task_id"), Lease.expires_at <= bindparam("now")),
)
"""What a claim re-checks once the task row is locked."""

_projects = cast(Table, Project.__table__)
_tasks = cast(Table, Task.__table__)
_leases = cast(Table, Lease.__table__)
_prompts = cast(Table, Prompt.__table__)
_completions = cast(Table, Completion.__table__)

_PROJECT = select(_projects).where(_projects.c.id == bindparam("project_id"))
_TASK = select(_tasks).where(_tasks.c.id == bindparam("task_id"))
_TASK_SKIP_LOCKED = _TASK.with_for_update(skip_locked=True)
"""A task row, plain (a claim reads rows of the tables, see Claim)."""

_OWN_LEASES = (
    select(
        _leases.c.id,
        _leases.c.task_id,
        _leases.c.display_order,
        _leases.c.expires_at,
        _tasks.c.state,
    )
    .join(_tasks, _tasks.c.id == _leases.c.task_id)
    .where(
        _leases.c.user_id == bindparam("user_id"), _tasks.c.project_id == bindparam("project_id")
    )
    .order_by(_leases.c.created_at, _leases.c.id)
)
"""The user's leases in a project, live or not, with their task's state."""

_CLAIM_TEXTS = (
    select(
        _prompts,
        _completions.c.id.label("completion_id"),
        _completions.c.text.label("completion_text"),
    )
    .join(_completions, _completions.c.prompt_id == _prompts.c.id)
    .where(
        _prompts.c.id == bindparam("prompt_id"),
        _completions.c.id.in_(bindparam("completion_ids", expanding=True)),
    )
)
"""A claim's prompt (the row's prompt columns) and the texts of its candidates."""


def _get_project(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id}")
    return project


_LOCK = (
    select(Task)
    .where(Task.id == bindparam("task_id"))
    .with_for_update()
    .execution_options(populate_existing=True)
)


def lock_task(session: Session, task_id: int) -> Task | None:
    """Lock the task row and reload it, so its counter is the latest committed value (the
    claim itself locks with ``SKIP LOCKED`` and reads a plain row, `_TASK_SKIP_LOCKED`)."""
    return session.execute(_LOCK, {"task_id": task_id}).scalar_one_or_none()


def live_leases_of_others(session: Session, task_id: int, user_id: int, now: datetime) -> int:
    """Counted in its own statement, after the task lock is held (see the module docstring)."""
    stmt = (
        select(func.count())
        .select_from(Lease)
        .where(Lease.task_id == task_id, Lease.user_id != user_id, Lease.expires_at > now)
    )
    return int(session.scalar(stmt) or 0)


def _has_skipped(session: Session, prompt_id: int, user_id: int) -> bool:
    stmt = select(Skip.id).where(Skip.prompt_id == prompt_id, Skip.user_id == user_id)
    return session.scalar(stmt) is not None


@dataclass(frozen=True)
class _Recheck:
    live_leases_of_others: int
    judged: bool
    skipped: bool
    expired_leases: bool


def _recheck(session: Session, task: TableRow, user_id: int, now: datetime) -> _Recheck:
    """Everything a claim re-checks once the task row is locked, in one new statement (so
    with a fresh READ COMMITTED snapshot, taken after the lock; see the module docstring)."""
    params = {"task_id": task.id, "user_id": user_id, "prompt_id": task.prompt_id, "now": now}
    others, judged, skipped, expired = session.execute(_RECHECK, params).one()
    return _Recheck(int(others or 0), bool(judged), bool(skipped), bool(expired))


def _slot_free_for(session: Session, task: Task, user: User, now: datetime) -> bool:
    """Whether `user` may take (or keep) a slot on the locked `task` right now."""
    if task.state is not TaskState.open:
        return False
    if task.is_gold:
        return True  # every annotator may take a gold task once; it is never full
    others = live_leases_of_others(session, task.id, user.id, now)
    return assignment.has_free_slot(task.required_judgments, task.judgment_count, others)


def _lease_seconds(session: Session, project_id: int, lease_seconds: int | None) -> int:
    if lease_seconds is not None:
        return lease_seconds
    return _get_project(session, project_id).lease_seconds


@dataclass(frozen=True)
class _Lease:
    display_order: list[int]
    expires_at: datetime


def _build_claim(session: Session, project: TableRow, task: TableRow, lease: _Lease) -> Claim:
    """The claim as shown: the prompt and the candidates' texts, read in one statement."""
    params = {"prompt_id": task.prompt_id, "completion_ids": list(lease.display_order)}
    rows = session.execute(_CLAIM_TEXTS, params).all()
    assert rows, "a task's completions belong to its prompt"  # foreign keys
    texts = {row.completion_id: row.completion_text for row in rows}
    return Claim(
        project=project,
        task=task,
        prompt=rows[0],
        candidates=[(cid, texts[cid]) for cid in lease.display_order],
        lease_expires_at=assignment.as_utc(lease.expires_at),
    )


def _own_leases(
    session: Session, project_id: int, user: User, now: datetime
) -> tuple[TableRow | None, list[int]]:
    """The user's live lease on an open task of this project (oldest first), if any, and the
    ids of their expired leases in the project, from one statement."""
    params = {"user_id": user.id, "project_id": project_id}
    rows = session.execute(_OWN_LEASES, params).all()
    live = [row for row in rows if assignment.is_live(row.expires_at, now)]
    held = next((row for row in live if row.state is TaskState.open), None)
    expired = [row.id for row in rows if not assignment.is_live(row.expires_at, now)]
    return held, expired


def _candidate_batch(
    session: Session,
    project_id: int,
    user: User,
    now: datetime,
    tried: set[int],
    strategy: AssignmentStrategy = AssignmentStrategy.default,
) -> list[assignment.Candidate]:
    """Up to CANDIDATE_BATCH tasks this user may take, best first by the strategy's keys.

    A pre-filter only: the counts come from one snapshot and are re-checked under lock. Gold
    tasks are never in it (they are mixed in by `_claim_gold`, not by overlap). When a whole
    window is ineligible for this user (all reserved by others, or judged or skipped by
    them), its ids join `tried` and the next window is read.
    """
    eligible, window_ids = _STATEMENTS[strategy]
    params = {
        "project_id": project_id,
        "user_id": user.id,
        "now": now,
        "window": CANDIDATE_WINDOW,
        "batch": CANDIDATE_BATCH,
    }
    while True:
        rows = session.execute(eligible, {**params, "tried": sorted(tried)}).all()
        if rows:
            return [assignment.Candidate(*row) for row in rows]
        window = session.scalars(window_ids, {**params, "tried": sorted(tried)}).all()
        if len(window) < CANDIDATE_WINDOW:
            return []
        tried.update(window)


def _window_strategy(project: TableRow, rng: random.Random) -> AssignmentStrategy:
    """The window this claim reads: the project's active-learning strategy, except for a
    `random_share` of claims (drawn from `rng`) that read the default, model-independent
    window, so the labels are not only the model's hard cases and estimates stay unbiased.
    Projects on the default strategy draw nothing from `rng`."""
    strategy, share = active.strategy_settings(project.settings)
    if strategy is AssignmentStrategy.default or rng.random() < share:
        return AssignmentStrategy.default
    return strategy


_INSERT_LEASE = insert(_leases)
"""A Core INSERT built once: the ORM's bulk-insert path cost ~15% of a claim's CPU."""


def _new_lease(
    session: Session, task: TableRow, user: User, now: datetime, seconds: int, rng: random.Random
) -> _Lease:
    """Insert a lease with a fresh display order. A plain INSERT, not the ORM's unit of work
    (a claim is the hottest write there is)."""
    lease = _Lease(
        display_order=assignment.display_order(task.completion_ids, rng),
        expires_at=now + timedelta(seconds=seconds),
    )
    values = {"task_id": task.id, "user_id": user.id, "created_at": now}
    session.execute(_INSERT_LEASE, {**values, **vars(lease)})
    return lease


def _claim_gold(
    session: Session,
    project: TableRow,
    user: User,
    now: datetime,
    seconds: int,
    rng: random.Random,
) -> Claim | None:
    """Lease a gold task this user has not seen (nor skipped), chosen at random; None if none.

    No slot arithmetic and no row lock: a gold task is open to every annotator once, and the
    unique (task, user) constraints on leases and judgments are the only limits.
    """
    seen = select(Judgment.id).where(Judgment.task_id == Task.id, Judgment.user_id == user.id)
    leased = select(Lease.id).where(Lease.task_id == Task.id, Lease.user_id == user.id)
    skipped = select(Skip.id).where(Skip.prompt_id == Task.prompt_id, Skip.user_id == user.id)
    ids = list(
        session.scalars(
            select(Task.id)
            .where(
                Task.project_id == project.id,
                Task.is_gold.is_(True),
                Task.state == TaskState.open,
                ~seen.exists(),
                ~leased.exists(),
                ~skipped.exists(),
            )
            .order_by(Task.id)
            .limit(GOLD_BATCH)
        )
    )
    if not ids:
        return None
    task = session.execute(_TASK, {"task_id": rng.choice(ids)}).one()
    try:
        with session.begin_nested():
            lease = _new_lease(session, task, user, now, seconds, rng)
    except IntegrityError:
        return None  # the same user's concurrent request leased it a moment ago
    return _build_claim(session, project, task, lease)


def check_active(user: User) -> None:
    """Paused annotators are refused at login and for tokens; services check again, so a
    request already past authentication when the pause happened cannot take more work."""
    if not user.active:
        raise Forbidden("your account is paused; ask an admin to resume it")


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
    is left for this user (all judged, skipped, or fully reserved by others). While normal
    work is left, a gold task comes instead with probability `project.gold_rate` (drawn from
    `rng`); gold alone never keeps an annotator busy once the real work is done.

    A project whose settings ask for an active-learning strategy (app.domain.active) has its
    tasks tried in the order of the reward models' predictions (`_window_strategy`), except
    for a random share of claims, which use the default window and `strategy`.
    """
    check_active(user)
    now = assignment.as_utc(now)
    project = session.execute(_PROJECT, {"project_id": project_id}).first()
    if project is None:
        raise NotFound(f"no project {project_id}")
    seconds = lease_seconds if lease_seconds is not None else project.lease_seconds

    held, expired_own = _own_leases(session, project_id, user, now)
    if held is not None:
        held_task = session.execute(_TASK, {"task_id": held.task_id}).one()
        lease = _Lease(held.display_order, held.expires_at)
        return _build_claim(session, project, held_task, lease)
    if expired_own:  # the user's own dead reservations in this project are dead weight
        session.execute(
            delete(Lease)
            .where(Lease.id.in_(expired_own))
            .execution_options(synchronize_session=False)
        )

    tried: set[int] = set()
    window = _window_strategy(project, rng)
    batch = _candidate_batch(session, project_id, user, now, tried, window)
    if batch and gold.wants_gold(project.gold_rate, rng):
        gold_claim = _claim_gold(session, project, user, now, seconds, rng)
        if gold_claim is not None:
            return gold_claim
    while batch:
        # An active window is already in the model's order; the default one is ordered here.
        ordered = batch if window is not AssignmentStrategy.default else strategy(batch, rng)
        for candidate in ordered:
            tried.add(candidate.task_id)
            task = session.execute(_TASK_SKIP_LOCKED, {"task_id": candidate.task_id}).first()
            if task is None:  # another annotator holds the row right now
                continue
            if task.project_id != project_id or task.is_gold or task.state is not TaskState.open:
                continue
            check = _recheck(session, task, user.id, now)  # a new statement, after the lock
            if (
                check.judged
                or check.skipped
                or not assignment.has_free_slot(
                    task.required_judgments, task.judgment_count, check.live_leases_of_others
                )
            ):
                continue
            if check.expired_leases:
                session.execute(
                    delete(Lease)
                    .where(Lease.task_id == task.id, Lease.expires_at <= now)
                    .execution_options(synchronize_session=False)
                )
            lease = _new_lease(session, task, user, now, seconds, rng)
            return _build_claim(session, project, task, lease)
        batch = _candidate_batch(session, project_id, user, now, tried, window)
    raise NoTaskLeft("no task left for you in this project")


def heartbeat(
    session: Session, task_id: int, user: User, *, now: datetime, lease_seconds: int | None = None
) -> datetime:
    """Extend the user's lease and return the new expiry.

    An expired lease is revived when the task still needs a judgment and nobody else took
    the slot (a laptop that slept for a while should not lose its work); otherwise it is
    dropped and LeaseExpired is raised.
    """
    check_active(user)
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


def skip_then_next(
    session: Session,
    project_id: int,
    task_id: int,
    user: User,
    *,
    now: datetime,
    rng: random.Random,
) -> LabelPage:
    """Skip and lease the next task in one transaction (the page's one-round-trip skip)."""
    skip(session, task_id, user)
    return label_page(session, project_id, user, now=now, rng=rng)


def progress(session: Session, project_id: int, user: User) -> Progress:
    judged = session.scalar(
        select(func.count())
        .select_from(Judgment)
        .where(Judgment.project_id == project_id, Judgment.user_id == user.id)
    )
    by_state = dict(
        session.execute(
            select(Task.state, func.count())
            .where(Task.project_id == project_id, Task.is_gold.is_(False))
            .group_by(Task.state)
        ).all()
    )
    open_tasks = int(by_state.get(TaskState.open, 0))
    done_tasks = int(by_state.get(TaskState.done, 0))
    return Progress(
        judged_by_user=int(judged or 0),
        open_tasks=open_tasks,
        done_tasks=done_tasks,
        total_tasks=open_tasks + done_tasks,
    )


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
        .where(Task.state == TaskState.open, Task.is_gold.is_(False))
        .group_by(Task.project_id)
        .subquery()
    )
    rows = session.execute(
        select(Project, func.coalesce(open_count.c.n, 0))
        .outerjoin(open_count, open_count.c.project_id == Project.id)
        .order_by(Project.name)
    )
    return [Queue(project=p, open_tasks=int(n)) for p, n in rows]
