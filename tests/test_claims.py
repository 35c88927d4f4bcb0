"""Task claiming, leases, skips and judgment recording at the service level (both backends),
the pure assignment strategy, and a many-thread claim/judge run on Postgres."""

from __future__ import annotations

import itertools
import random
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.domain import assignment
from app.errors import AlreadyJudged, Conflict, InvalidInput, LeaseExpired, NoTaskLeft, NotFound
from app.models import Completion, Judgment, Lease, Project, Role, Skip, Task, TaskState, User
from app.services import judgments, tasks
from app.services import users as users_service
from tests.factories import make_project, make_prompt, make_task

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
_names = itertools.count(1)


def make_user(db: Session, role: Role = Role.annotator) -> User:
    """A token-only user: no argon2 hash, which costs most of a second per user."""
    return users_service.create(db, f"claims-{role.value}{next(_names)}", role, None)


def secs(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def claim(db: Session, project: Project, user: User, at: float = 0, seed: int = 0, **kw):  # type: ignore[no-untyped-def]
    return tasks.claim_next(
        db, project.id, user, now=secs(at), rng=random.Random(seed), lease_seconds=60, **kw
    )


def pairs_project(db: Session, n: int, **fields) -> tuple[Project, list[Task]]:  # type: ignore[no-untyped-def]
    project = make_project(db, **fields)
    made = []
    for i in range(n):
        prompt = make_prompt(db, project, [f"left {i}", f"right {i}"])
        made.append(make_task(db, project, prompt))
    return project, made


# --- the pure strategy -------------------------------------------------------------------


def test_default_order_puts_partly_judged_first_then_priority_then_random():
    c = assignment.Candidate
    batch = [c(1, 0, 0), c(2, 0, 5), c(3, 1, 0), c(4, 0, 5), c(5, 0, 0), c(6, 1, 9)]
    orders = {
        tuple(x.task_id for x in assignment.default_order(batch, random.Random(s)))
        for s in range(40)
    }
    for order in orders:
        assert order[:2] == (6, 3)  # partly judged, higher priority first
        assert set(order[2:4]) == {2, 4} and set(order[4:]) == {1, 5}
    assert len(orders) == 4  # ties really are broken at random: 2 x 2 orders seen


def test_default_order_is_reproducible_with_the_same_seed():
    batch = [assignment.Candidate(i, 0, 0) for i in range(20)]
    one = assignment.default_order(batch, random.Random(7))
    two = assignment.default_order(batch, random.Random(7))
    assert one == two and sorted(x.task_id for x in one) == list(range(20))


@pytest.mark.parametrize(
    ("required", "judged", "leased", "free"),
    [
        (1, 0, 0, True),
        (1, 0, 1, False),
        (1, 1, 0, False),
        (2, 1, 0, True),
        (2, 1, 1, False),
        (3, 0, 2, True),
        (3, 2, 1, False),
    ],
)
def test_has_free_slot(required, judged, leased, free):
    assert assignment.has_free_slot(required, judged, leased) is free


def test_display_order_is_a_permutation_and_both_orders_occur():
    rng = random.Random(3)
    seen = {tuple(assignment.display_order([10, 20], rng)) for _ in range(50)}
    assert seen == {(10, 20), (20, 10)}


def test_is_live_handles_naive_sqlite_datetimes():
    assert assignment.is_live(datetime(2026, 1, 1, 12, 1), T0)
    assert not assignment.is_live(datetime(2026, 1, 1, 12, 0), T0)


# --- claiming ----------------------------------------------------------------------------


def test_reload_returns_the_same_leased_task(db):
    project, _ = pairs_project(db, 3)
    user = make_user(db)
    first = claim(db, project, user, at=0, seed=1)
    again = claim(db, project, user, at=10, seed=2)
    assert again.task.id == first.task.id
    assert again.candidates == first.candidates
    assert again.lease_expires_at == first.lease_expires_at == secs(60)
    assert db.scalar(select(func.count()).select_from(Lease)) == 1


def test_claim_returns_prompt_candidates_and_project(db):
    project = make_project(db, instructions="Be kind.")
    prompt = make_prompt(db, project, ["one", "two"], text="Question?")
    task = make_task(db, project, prompt)
    got = claim(db, project, make_user(db))
    assert got.task.id == task.id and got.prompt.text == "Question?"
    assert got.project.instructions == "Be kind."
    assert sorted(got.candidates) == sorted((c.id, c.text) for c in prompt.completions)


def test_two_annotators_never_hold_the_same_single_judgment_task(db):
    project, made = pairs_project(db, 2)
    alice, bob, carol = make_user(db), make_user(db), make_user(db)
    a = claim(db, project, alice)
    b = claim(db, project, bob)
    assert {a.task.id, b.task.id} == {t.id for t in made}
    with pytest.raises(NoTaskLeft):
        claim(db, project, carol)


def test_expired_lease_goes_to_another_annotator(db):
    project, (task,) = pairs_project(db, 1)
    alice, bob = make_user(db), make_user(db)
    assert claim(db, project, alice, at=0).task.id == task.id
    with pytest.raises(NoTaskLeft):
        claim(db, project, bob, at=59)
    assert claim(db, project, bob, at=61).task.id == task.id
    leases = db.scalars(select(Lease)).all()
    assert [lease.user_id for lease in leases] == [bob.id]  # alice's dead lease was cleaned up


def test_overlap_gives_the_task_to_distinct_annotators_until_full(db):
    project, (task,) = pairs_project(db, 1, judgments_per_task=2)
    alice, bob, carol = make_user(db), make_user(db), make_user(db)
    assert claim(db, project, alice).task.id == task.id
    assert claim(db, project, bob).task.id == task.id
    with pytest.raises(NoTaskLeft):
        claim(db, project, carol)
    judgments.record(db, task.id, alice, choice="tie", now=secs(5))
    with pytest.raises(NoTaskLeft):  # alice judged it; she never gets it again
        claim(db, project, alice, at=6)
    judgments.record(db, task.id, bob, choice="tie", now=secs(7))
    db.refresh(task)
    assert (task.judgment_count, task.state) == (2, TaskState.done)


def test_partly_judged_tasks_come_first(db):
    project, made = pairs_project(db, 5, judgments_per_task=2)
    alice, bob = make_user(db), make_user(db)
    first = claim(db, project, alice, seed=4)
    judgments.record(db, first.task.id, alice, choice="tie", now=secs(1))
    for seed in range(5):
        got = claim(db, project, bob, at=2, seed=seed)
        assert got.task.id == first.task.id
    assert made


def test_higher_priority_tasks_come_first(db):
    project = make_project(db)
    low = make_task(db, project, make_prompt(db, project, ["a", "b"]), priority=0)
    high = make_task(db, project, make_prompt(db, project, ["a", "b"]), priority=3)
    user = make_user(db)
    assert claim(db, project, user).task.id == high.id
    judgments.record(db, high.id, user, choice="tie", now=secs(1))
    assert claim(db, project, user, at=2).task.id == low.id


def test_display_order_is_randomized_per_lease_and_recorded(db):
    project, made = pairs_project(db, 12)
    user = make_user(db)
    rng = random.Random(11)
    seen = set()
    for _ in made:
        got = tasks.claim_next(db, project.id, user, now=T0, rng=rng, lease_seconds=60)
        order = [cid for cid, _ in got.candidates]
        seen.add(order == sorted(order))
        j, created = judgments.record(db, got.task.id, user, choice=order[0], now=secs(1))
        assert created and j.display_order == order and j.ranking[0] == [order[0]]
    assert seen == {True, False}
    with pytest.raises(NoTaskLeft):
        claim(db, project, user, at=2)


def test_retired_and_done_tasks_are_not_handed_out(db):
    project, (retired, done) = pairs_project(db, 2)
    retired.state, done.state = TaskState.retired, TaskState.done
    db.flush()
    with pytest.raises(NoTaskLeft):
        claim(db, project, make_user(db))


def test_claim_in_a_missing_project_is_not_found(db):
    with pytest.raises(NotFound):
        tasks.claim_next(db, 999_999, make_user(db), now=T0, rng=random.Random(0))


def test_lease_seconds_defaults_to_the_project_setting(db):
    project, _ = pairs_project(db, 1, lease_seconds=90)
    got = tasks.claim_next(db, project.id, make_user(db), now=T0, rng=random.Random(0))
    assert got.lease_expires_at == secs(90)


# --- heartbeat and skip ------------------------------------------------------------------


def test_heartbeat_extends_a_live_lease(db):
    project, (task,) = pairs_project(db, 1)
    user = make_user(db)
    claim(db, project, user, at=0)
    assert tasks.heartbeat(db, task.id, user, now=secs(30), lease_seconds=60) == secs(90)


def test_heartbeat_revives_an_expired_lease_nobody_took(db):
    project, (task,) = pairs_project(db, 1)
    user = make_user(db)
    claim(db, project, user, at=0)
    assert tasks.heartbeat(db, task.id, user, now=secs(300), lease_seconds=60) == secs(360)


def test_heartbeat_after_someone_else_took_the_slot_is_refused(db):
    project, (task,) = pairs_project(db, 1)
    alice, bob = make_user(db), make_user(db)
    claim(db, project, alice, at=0)
    claim(db, project, bob, at=120)
    with pytest.raises(LeaseExpired):
        tasks.heartbeat(db, task.id, alice, now=secs(121), lease_seconds=60)
    with pytest.raises(LeaseExpired):  # and with no lease at all
        tasks.heartbeat(db, task.id, make_user(db), now=secs(121), lease_seconds=60)


def test_skip_drops_the_lease_and_the_prompt_for_that_user_only(db):
    project = make_project(db)
    prompt = make_prompt(db, project, ["a", "b", "c"])
    ids = [c.id for c in prompt.completions]
    for pair in (ids[:2], ids[1:]):  # two tasks from one prompt
        db.add(Task(project_id=project.id, prompt_id=prompt.id, completion_ids=pair))
    db.flush()
    alice, bob = make_user(db), make_user(db)
    got = claim(db, project, alice)
    tasks.skip(db, got.task.id, alice)
    tasks.skip(db, got.task.id, alice)  # a double click is harmless
    assert db.scalar(select(func.count()).select_from(Skip)) == 1
    assert db.scalar(select(func.count()).select_from(Lease)) == 0
    with pytest.raises(NoTaskLeft):  # both tasks come from the skipped prompt
        claim(db, project, alice, at=1)
    assert claim(db, project, bob, at=1).task.prompt_id == prompt.id


# --- recording judgments -----------------------------------------------------------------


def test_record_stores_the_verdict_and_closes_the_task(db):
    project, (task,) = pairs_project(db, 1)
    user = make_user(db)
    got = claim(db, project, user)
    a, b = task.completion_ids
    j, created = judgments.record(
        db,
        task.id,
        user,
        choice=b,
        strength=2,
        rationale="  clearer  ",
        time_spent_ms=1234,
        client_key="k1",
        now=secs(5),
    )
    assert created
    assert j.ranking == [[b], [a]] and not j.none_acceptable
    assert (j.strength, j.rationale, j.time_spent_ms, j.client_key) == (2, "clearer", 1234, "k1")
    assert j.display_order == [cid for cid, _ in got.candidates]
    assert j.project_id == project.id
    db.refresh(task)
    assert (task.judgment_count, task.state) == (1, TaskState.done)
    assert db.scalar(select(func.count()).select_from(Lease)) == 0


@pytest.mark.parametrize(
    ("kwargs", "ranking", "none_ok"),
    [
        ({"choice": "tie"}, "tie", False),
        ({"choice": "both_bad"}, "tie", True),
        ({"ranking": "a_then_b"}, "a_then_b", False),
        ({"ranking": "tied"}, "tie", False),
    ],
)
def test_record_verdict_shapes(db, kwargs, ranking, none_ok):
    project, (task,) = pairs_project(db, 1)
    a, b = task.completion_ids
    shapes = {"tie": [sorted([a, b])], "a_then_b": [[a], [b]], "tied": [[b, a]]}
    if "ranking" in kwargs:
        kwargs = {"ranking": shapes[kwargs["ranking"]]}
    user = make_user(db)
    claim(db, project, user)
    j, _ = judgments.record(db, task.id, user, now=secs(1), **kwargs)
    assert j.ranking == shapes[ranking] and j.none_acceptable is none_ok


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"choice": "tie", "ranking": [1, 2]}, "exactly one"),
        ({"choice": 123456789}, "choice must be one of"),
        ({"choice": "left"}, "choice must be one of"),
        ({"ranking": [999_998, 999_999]}, "exactly this task's candidates"),
        ({"choice": "tie", "strength": 5}, "strength"),
        ({"choice": "tie", "time_spent_ms": -1}, "negative"),
    ],
)
def test_record_rejects_invalid_verdicts(db, kwargs, message):
    project, (task,) = pairs_project(db, 1)
    user = make_user(db)
    claim(db, project, user)
    with pytest.raises(InvalidInput, match=message):
        judgments.record(db, task.id, user, now=secs(1), **kwargs)
    assert db.scalar(select(func.count()).select_from(Judgment)) == 0


def test_record_is_idempotent_by_client_key(db):
    project, (task,) = pairs_project(db, 1)
    user = make_user(db)
    claim(db, project, user)
    first, created = judgments.record(
        db, task.id, user, choice="tie", client_key="same", now=secs(1)
    )
    again, created_again = judgments.record(
        db, task.id, user, choice="tie", client_key="same", now=secs(2)
    )
    assert (created, created_again) == (True, False) and again.id == first.id
    assert db.scalar(select(func.count()).select_from(Judgment)) == 1
    db.refresh(task)
    assert task.judgment_count == 1


def test_client_key_of_another_user_or_task_is_a_conflict(db):
    project, (t1, t2) = pairs_project(db, 2, judgments_per_task=2)
    alice, bob = make_user(db), make_user(db)
    judgments.record(db, t1.id, alice, choice="tie", client_key="shared", now=T0)
    with pytest.raises(Conflict, match="another user"):
        judgments.record(db, t1.id, bob, choice="tie", client_key="shared", now=T0)
    with pytest.raises(Conflict, match="task"):
        judgments.record(db, t2.id, alice, choice="tie", client_key="shared", now=T0)


def test_judging_twice_is_already_judged(db):
    project, (task,) = pairs_project(db, 1, judgments_per_task=2)
    user = make_user(db)
    judgments.record(db, task.id, user, choice="tie", client_key="one", now=T0)
    with pytest.raises(AlreadyJudged):
        judgments.record(db, task.id, user, choice="tie", client_key="two", now=T0)
    with pytest.raises(AlreadyJudged):
        judgments.record(db, task.id, user, choice="tie", now=T0)


def test_judgment_on_expired_lease_is_accepted_while_still_needed(db):
    project, (task,) = pairs_project(db, 1)
    user = make_user(db)
    got = claim(db, project, user, at=0)
    j, created = judgments.record(db, task.id, user, choice="both_bad", now=secs(3600))
    assert created and j.display_order == [cid for cid, _ in got.candidates]
    # and without any lease at all (e.g. an API client that never claimed)
    project2, (task2,) = pairs_project(db, 1)
    j2, created2 = judgments.record(db, task2.id, user, choice="tie", now=T0)
    assert created2 and j2.display_order == task2.completion_ids


def test_judgment_on_expired_lease_is_refused_when_the_slot_was_taken(db):
    project, (task,) = pairs_project(db, 1)
    alice, bob = make_user(db), make_user(db)
    claim(db, project, alice, at=0)
    claim(db, project, bob, at=120)  # alice's lease ran out; bob holds the slot now
    with pytest.raises(LeaseExpired, match="not stored"):
        judgments.record(db, task.id, alice, choice="tie", now=secs(130))
    judgments.record(db, task.id, bob, choice="tie", now=secs(131))
    with pytest.raises(LeaseExpired):  # and once bob filled it, for good
        judgments.record(db, task.id, alice, choice="tie", now=secs(132))
    assert db.scalar(select(func.count()).select_from(Judgment)) == 1


def test_judgment_on_a_missing_task_is_not_found(db):
    with pytest.raises(NotFound):
        judgments.record(db, 999_999, make_user(db), choice="tie", now=T0)


# --- concurrency (Postgres) --------------------------------------------------------------


def test_many_annotators_at_once_never_over_assign(
    committed_factory: sessionmaker[Session], backend
):
    """16 threads claim and judge 50 tasks that each need 2 distinct annotators."""
    if backend != "postgres":
        pytest.skip(
            "SQLite serializes writers with BEGIN IMMEDIATE; concurrency is a Postgres test"
        )
    n_tasks, n_users, required = 50, 16, 2
    with committed_factory() as s, s.begin():
        project = make_project(s, judgments_per_task=required)
        for i in range(n_tasks):
            make_task(s, project, make_prompt(s, project, [f"a{i}", f"b{i}"]))
        users = [make_user(s, Role.annotator) for _ in range(n_users)]
        project_id = project.id
    errors: list[BaseException] = []
    judged_by: dict[int, int] = {}
    start = threading.Barrier(n_users)

    def annotate(user: User, seed: int) -> None:
        rng = random.Random(seed)
        count = 0
        try:
            start.wait()
            while True:
                now = datetime.now(UTC)
                try:
                    with committed_factory() as s, s.begin():
                        got = tasks.claim_next(
                            s, project_id, user, now=now, rng=rng, lease_seconds=600
                        )
                        task_id = got.task.id
                        choice = got.candidates[0][0]
                except NoTaskLeft:
                    break
                with committed_factory() as s, s.begin():
                    judgments.record(
                        s,
                        task_id,
                        user,
                        choice=choice,
                        client_key=f"{user.id}-{task_id}",
                        now=datetime.now(UTC),
                    )
                count += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        judged_by[user.id] = count

    threads = [threading.Thread(target=annotate, args=(u, i)) for i, u in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]

    with committed_factory() as s:
        counted = s.execute(select(Judgment.task_id, func.count()).group_by(Judgment.task_id))
        per_task = {task_id: n for task_id, n in counted}
        pairs = [(t, u) for t, u in s.execute(select(Judgment.task_id, Judgment.user_id))]
        rows = s.scalars(select(Task)).all()
        assert len(pairs) == len(set(pairs)) == n_tasks * required
        assert max(per_task.values()) == required and len(per_task) == n_tasks
        assert all(t.judgment_count == per_task[t.id] and t.state is TaskState.done for t in rows)
        assert s.scalar(select(func.count()).select_from(Lease)) == 0
        assert s.scalar(select(func.count()).select_from(Completion)) == 2 * n_tasks
    assert sum(judged_by.values()) == n_tasks * required
    assert sum(1 for n in judged_by.values() if n) > 1  # the work really was spread out


# --- the candidate window ----------------------------------------------------------------


def test_claim_looks_past_windows_that_hold_nothing_for_this_user(db, monkeypatch):
    """The eligibility check runs on a window of open tasks; a window full of tasks this user
    already judged must not hide the eligible ones behind it."""
    monkeypatch.setattr(tasks, "CANDIDATE_WINDOW", 2)
    project = make_project(db, judgments_per_task=2)
    made = [
        make_task(db, project, make_prompt(db, project, [f"a{i}", f"b{i}"]), priority=6 - i)
        for i in range(6)
    ]
    user, other = make_user(db), make_user(db)
    for task in made[:4]:  # partly judged, so they head the order, but judged by this user
        judgments.record(db, task.id, user, choice="tie", now=T0)
    got = claim(db, project, user, at=1)
    assert got.task.id == made[4].id  # the third window; the higher priority of the two left
    assert claim(db, project, other, at=1).task.id in {t.id for t in made[:4]}
    judgments.record(db, got.task.id, user, choice="tie", now=secs(2))
    assert claim(db, project, user, at=3).task.id == made[5].id
    judgments.record(db, made[5].id, user, choice="tie", now=secs(4))
    with pytest.raises(NoTaskLeft):  # every window read, nothing left for this user
        claim(db, project, user, at=5)


def test_tasks_the_user_judged_are_skipped_inside_one_window_read(db, monkeypatch):
    """An annotator far ahead of the others: their own judged tasks lead the order (partly
    judged first) but are filtered while the window is read, so a claim stays seven
    statements however many of them there are, instead of a window read per window-full."""
    monkeypatch.setattr(tasks, "CANDIDATE_WINDOW", 2)
    project = make_project(db, judgments_per_task=3)
    made = [make_task(db, project, make_prompt(db, project, [f"a{i}", f"b{i}"])) for i in range(9)]
    user = make_user(db)
    for task in made[:8]:
        judgments.record(db, task.id, user, choice="tie", now=T0)
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args):  # type: ignore[no-untyped-def]
        statements.append(statement)

    bind = db.connection()
    event.listen(bind, "before_cursor_execute", count)
    try:
        got = claim(db, project, user, at=1)
    finally:
        event.remove(bind, "before_cursor_execute", count)
    assert got.task.id == made[8].id
    # project, own leases, candidates, lock, re-check, insert the lease, the texts
    assert len(statements) == 7, statements
