"""Recording an annotator's verdict: exactly once, and never beyond what the task needs.

Browsers resend forms and networks retry, so a judgment carries a client key: the same key
from the same user returns the stored row instead of a second one. The task row is locked
while its counter is read and bumped (see app.services.tasks), which serializes every write
to one task; the unique constraints on (task_id, user_id) and client_key back this up.

This is the hot path of the annotation benchmark (bench/annotate.py): a judgment is five
statements (lock, earlier judgments, take the lease, insert, bump the counter), built once on
the tables and run without the ORM's unit of work or entity loading.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from app.domain import assignment, gold, rankings
from app.errors import AlreadyJudged, Conflict, InvalidInput, LeaseExpired, NotFound
from app.models import Judgment, Lease, Task, TaskState, User
from app.services import tasks
from app.services.tasks import check_active, live_leases_of_others

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
    task: Any, ranking: Sequence[Any] | None, choice: int | str | None
) -> rankings.Verdict:
    """`task` is the locked row (`completion_ids` is all this reads)."""
    try:
        if choice is not None:
            return rankings.from_choice(choice, task.completion_ids)
        assert ranking is not None
        return rankings.Verdict(rankings.normalize(ranking, task.completion_ids))
    except rankings.RankingError as exc:
        raise InvalidInput(str(exc)) from None


_judgments = cast(Table, Judgment.__table__)
_leases = cast(Table, Lease.__table__)
_tasks = cast(Table, Task.__table__)

_LOCK = (
    select(
        _tasks.c.project_id,
        _tasks.c.completion_ids,
        _tasks.c.required_judgments,
        _tasks.c.judgment_count,
        _tasks.c.is_gold,
        _tasks.c.gold_answer,
        _tasks.c.state,
    )
    .where(_tasks.c.id == bindparam("task_id"))
    .with_for_update()
)
"""The task row, locked (as app.services.tasks.lock_task), read as plain columns."""
_EARLIER = select(
    _judgments.c.id, _judgments.c.task_id, _judgments.c.user_id, _judgments.c.client_key
).where(
    or_(
        and_(
            _judgments.c.task_id == bindparam("task_id"),
            _judgments.c.user_id == bindparam("user_id"),
        ),
        _judgments.c.client_key == bindparam("client_key"),
    )
)
_TAKE_LEASE = (
    delete(_leases)
    .where(_leases.c.task_id == bindparam("task_id"), _leases.c.user_id == bindparam("user_id"))
    .returning(_leases.c.display_order, _leases.c.expires_at)
)
_INSERT = insert(_judgments).returning(_judgments.c.id)
_BUMP = (
    update(_tasks)
    .where(_tasks.c.id == bindparam("task_id"))
    .values(judgment_count=bindparam("count"), state=bindparam("state"))
)
# Built once, on the tables rather than the mapped classes: a judgment is the hottest write
# there is, and building ORM expressions per call, loading ORM entities and the ORM's
# statement handling cost more CPU than running the statements.


def _earlier(
    session: Session, task_id: int, user: User, client_key: str | None
) -> tuple[bool, int | None]:
    """Whether `user` already judged this task, and the id of the judgment stored under
    `client_key` (any task, any user), from one statement."""
    params = {"task_id": task_id, "user_id": user.id, "client_key": client_key}
    mine, keyed = False, None
    for judgment_id, judged_task, judged_by, key in session.execute(_EARLIER, params):
        mine = mine or (judged_task == task_id and judged_by == user.id)
        if client_key is not None and key == client_key:
            keyed = judgment_id
    return mine, keyed


def _replay(session: Session, task_id: int, user: User, stored: Judgment) -> Judgment:
    """The judgment a repeated client_key stored for this user and task; Conflict on misuse."""
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
    none_acceptable: bool = False,
    strength: int | None = None,
    rationale: str | None = None,
    client_key: str | None = None,
    time_spent_ms: int | None = None,
    now: datetime,
) -> tuple[Judgment, bool]:
    """Store `user`'s verdict on a task; returns (judgment, created).

    A pairwise verdict is a `choice` (a completion id, "tie" or "both_bad"); any task takes a
    `ranking` of tie groups, best first, with `none_acceptable` when every candidate is bad
    (a pairwise "both_bad" sets it too). A judgment whose lease expired (or was never taken)
    is still accepted while the task needs it, since the work was done in good faith; it is
    refused with LeaseExpired only when others filled the slots meanwhile.

    On a gold task the judgment is marked ``is_gold`` and scored against the known answer
    (``gold_correct``); it never counts towards any normal task's overlap.
    """
    check_active(user)
    now = assignment.as_utc(now)
    if rationale is not None:
        rationale = rationale.strip() or None
    _check_input(ranking, choice, strength, rationale, client_key, time_spent_ms)

    # The statements below are plain table statements, which do not autoflush: send what
    # the caller left pending first (a no-op on the API path).
    session.flush()
    task = session.execute(_LOCK, {"task_id": task_id}).first()
    if task is None:
        raise NotFound(f"no task {task_id}")
    mine, keyed = _earlier(session, task_id, user, client_key)
    if keyed is not None:
        stored = session.get(Judgment, keyed)
        assert stored is not None
        return _replay(session, task_id, user, stored), False
    verdict = _verdict(task, ranking, choice)
    if mine:
        raise AlreadyJudged(f"you have already judged task {task_id}")

    # Taking the lease out and reading it is one statement; a refusal below rolls it back.
    lease = session.execute(_TAKE_LEASE, {"task_id": task_id, "user_id": user.id}).first()
    live = lease is not None and assignment.is_live(lease.expires_at, now)
    others = 0 if live or task.is_gold else live_leases_of_others(session, task_id, user.id, now)
    needed = task.is_gold or assignment.has_free_slot(
        task.required_judgments, task.judgment_count, others
    )
    if task.state is not TaskState.open or not needed:
        if task.state is TaskState.retired:
            why = "an admin retired it"
        elif lease is not None:
            why = "your lease ran out and others completed it"
        elif task.state is TaskState.open:
            why = "others hold its remaining slots and you had not claimed it"
        else:
            why = "it has all the judgments it needs"
        raise LeaseExpired(
            f"task {task_id} no longer needs a judgment ({why}); your answer was not stored, "
            "please continue with the next task"
        )

    values = {
        "project_id": task.project_id,
        "task_id": task_id,
        "user_id": user.id,
        "ranking": verdict.ranking,
        "none_acceptable": verdict.none_acceptable or none_acceptable,
        "strength": strength,
        "rationale": rationale,
        "display_order": list(lease.display_order if lease is not None else task.completion_ids),
        "time_spent_ms": time_spent_ms,
        "client_key": client_key,
        "is_gold": task.is_gold,
        "gold_correct": gold.is_correct(task.gold_answer or [], verdict.ranking)
        if task.is_gold
        else None,
        "created_at": now,
    }
    try:
        judgment_id = session.execute(_INSERT, values).scalar_one()
    except IntegrityError:
        # Two judgments by one user on one task, or one client_key twice, are serialized by
        # the task lock above and answered as replays; what is left is the same client_key
        # sent for another task at the same moment.
        raise Conflict(
            "this client_key is being used for another task right now; generate a new one"
        ) from None
    count = task.judgment_count + 1
    state = TaskState.done if not task.is_gold and count >= task.required_judgments else task.state
    session.execute(_BUMP, {"task_id": task_id, "count": count, "state": state})
    _sync_loaded_task(session, task_id, count, state)
    return Judgment(id=judgment_id, **values), True


def _sync_loaded_task(session: Session, task_id: int, count: int, state: TaskState) -> None:
    """Make a Task this session already holds show the counter as now stored (the UPDATE
    above went around the ORM); a dictionary lookup when it holds none."""
    loaded = session.identity_map.get(identity_key(Task, task_id))
    if loaded is not None:
        set_committed_value(loaded, "judgment_count", count)
        set_committed_value(loaded, "state", state)


def record_then_next(
    session: Session,
    project_id: int,
    task_id: int,
    user: User,
    *,
    now: datetime,
    rng: random.Random,
    **verdict: Any,
) -> tasks.LabelPage:
    """Store a verdict and lease the next task in the same transaction, so the labeling page
    swaps to the next task with one round trip (the browser's "instant" next)."""
    record(session, task_id, user, now=now, **verdict)
    return tasks.label_page(session, project_id, user, now=now, rng=rng)
