"""Gold items: the pure answer/scoring rules, marking tasks gold (API and upload), mixing gold
into annotators' streams, gold accuracy, and paused annotators (both backends)."""

from __future__ import annotations

import itertools
import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.domain import gold as rules
from app.errors import Forbidden, InvalidInput, InvalidUpload, NoTaskLeft, NotFound
from app.models import Judgment, Project, ProjectMode, Role, Task, TaskState, User
from app.services import gold, judgments, monitoring, prompts, tasks
from app.services import users as users_service
from app.settings import Settings
from tests.factories import make_project, make_prompt, make_task, make_token

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
_names = itertools.count(1)


def make_user(db: Session, role: Role = Role.annotator) -> User:
    return users_service.create(db, f"gold-{role.value}{next(_names)}", role, None)


def claim(db: Session, project: Project, user: User, seed: int = 0, at: float = 0):  # type: ignore[no-untyped-def]
    return tasks.claim_next(
        db,
        project.id,
        user,
        now=T0 + timedelta(seconds=at),
        rng=random.Random(seed),
        lease_seconds=60,
    )


def judge(db: Session, task_id: int, user: User, at: float = 1, **verdict):  # type: ignore[no-untyped-def]
    j, created = judgments.record(db, task_id, user, now=T0 + timedelta(seconds=at), **verdict)
    assert created
    return j


def project_with(
    db: Session, normal: int, golden: int, **fields
) -> tuple[Project, list[Task], list[Task]]:  # type: ignore[no-untyped-def]
    """`normal` plain pairs and `golden` gold pairs whose known winner is the first completion."""
    project = make_project(db, **fields)
    plain = [
        make_task(db, project, make_prompt(db, project, [f"n{i} a", f"n{i} b"]))
        for i in range(normal)
    ]
    gold_tasks = []
    for i in range(golden):
        task = make_task(db, project, make_prompt(db, project, [f"g{i} good", f"g{i} bad"]))
        gold_tasks.append(gold.mark(db, task.id, task.completion_ids[0]))
    return project, plain, gold_tasks


# --- the pure rules ----------------------------------------------------------------------


def test_wants_gold_bounds_and_rate():
    rng = random.Random(5)
    assert not any(rules.wants_gold(0.0, rng) for _ in range(200))
    assert all(rules.wants_gold(1.0, rng) for _ in range(200))
    draws = [rules.wants_gold(0.2, random.Random(9)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed decides the same way
    share = sum(rules.wants_gold(0.2, rng) for _ in range(10_000)) / 10_000
    assert 0.18 < share < 0.22


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        (10, [[10], [20]]),
        (20, [[20], [10]]),
        ("tie", [[10, 20]]),
        ([[20, 10]], [[10, 20]]),
        ([20, 10], [[20], [10]]),
    ],
)
def test_answer_from_ids_pairwise(raw, answer):
    assert rules.answer_from_ids(raw, [10, 20]) == answer


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        (3, [[3]]),
        ([3, [2, 1]], [[3], [1, 2]]),
        ([[4, 2]], [[2, 4]]),
        ([1, 2, 3, 4], [[1], [2], [3], [4]]),
    ],
)
def test_answer_from_ids_ranking_may_be_partial(raw, answer):
    assert rules.answer_from_ids(raw, [1, 2, 3, 4]) == answer


@pytest.mark.parametrize(
    ("raw", "candidates", "message"),
    [
        (99, [10, 20], "not in this task"),
        ("tie", [1, 2, 3], "pairwise answer"),
        ([1, 1], [1, 2, 3], "more than once"),
        ([[1, 2, 3]], [1, 2, 3], "every candidate"),
        ([7], [1, 2, 3], "not in this task"),
        (True, [10, 20], "must be"),
        ([], [10, 20], "must be"),
        ("left", [10, 20], "must be"),
    ],
)
def test_answer_from_ids_rejects(raw, candidates, message):
    with pytest.raises(rules.GoldError, match=message):
        rules.answer_from_ids(raw, candidates)


def test_answer_from_indices_maps_to_completion_ids():
    assert rules.answer_from_indices(0, [10, 20]) == [[10], [20]]
    assert rules.answer_from_indices(1, [10, 20]) == [[20], [10]]
    assert rules.answer_from_indices("tie", [10, 20]) == [[10, 20]]
    assert rules.answer_from_indices([2, [0, 1]], [7, 8, 9]) == [[9], [7, 8]]
    assert rules.answer_from_indices([[1]], [7, 8, 9]) == [[8]]
    with pytest.raises(rules.GoldError, match="out of range"):
        rules.answer_from_indices(2, [10, 20])
    with pytest.raises(rules.GoldError, match=r"\[3\] out of range"):
        rules.answer_from_indices([3, 0], [7, 8, 9])


@pytest.mark.parametrize(
    ("answer", "ranking", "correct"),
    [
        ([[1], [2]], [[1], [2]], True),  # pairwise: the right winner
        ([[1], [2]], [[2], [1]], False),
        ([[1], [2]], [[1, 2]], False),  # a tie is not a winner
        ([[1, 2]], [[1, 2]], True),  # a tie answer: tie or both bad
        ([[1, 2]], [[2], [1]], False),
        ([[3]], [[3], [1, 2]], True),  # ranking: only the top group counts
        ([[3]], [[3, 1], [2]], False),  # ... and must be exactly the top group
        ([[3], [1], [2]], [[3], [2], [1]], True),
        ([[1, 3]], [[3, 1], [2]], True),
        ([], [[1], [2]], False),
    ],
)
def test_is_correct_compares_top_groups(answer, ranking, correct):
    assert rules.is_correct(answer, ranking) is correct


# --- marking tasks gold ------------------------------------------------------------------


def test_api_marks_a_task_gold_and_back(client, db):
    project, (task,), _ = project_with(db, 1, 0, judgments_per_task=2)
    admin = make_user(db, Role.admin)
    auth = make_token(db, admin)
    winner = task.completion_ids[1]
    resp = client.post(f"/api/v1/tasks/{task.id}/gold", json={"answer": winner}, headers=auth)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "task_id": task.id,
        "is_gold": True,
        "gold_answer": [[winner], [task.completion_ids[0]]],
        "state": "open",
    }
    bad = client.post(f"/api/v1/tasks/{task.id}/gold", json={"answer": 123456}, headers=auth)
    assert bad.status_code == 422 and "not in this task" in bad.json()["detail"]
    missing = client.post("/api/v1/tasks/999999/gold", json={"answer": "tie"}, headers=auth)
    assert missing.status_code == 404

    annotator_auth = make_token(db, make_user(db))
    denied = client.post(
        f"/api/v1/tasks/{task.id}/gold", json={"answer": "tie"}, headers=annotator_auth
    )
    assert denied.status_code == 403

    back = client.post(f"/api/v1/tasks/{task.id}/gold", json={"answer": None}, headers=auth)
    assert back.json()["is_gold"] is False and back.json()["gold_answer"] is None


def test_unmarking_recounts_overlap_from_normal_judgments_only(db):
    project, (task,), _ = project_with(db, 1, 0, judgments_per_task=2)
    alice, bob, carol = make_user(db), make_user(db), make_user(db)
    judge(db, task.id, alice, choice="tie")  # a normal judgment
    gold.mark(db, task.id, "tie")
    judge(db, task.id, bob, choice="tie")  # a gold one
    judge(db, task.id, carol, choice="tie")  # gold is never full
    db.refresh(task)
    assert (task.judgment_count, task.state) == (3, TaskState.open)
    gold.mark(db, task.id, None)
    assert (task.judgment_count, task.state, task.is_gold) == (1, TaskState.open, False)


def test_marking_a_done_task_gold_reopens_it(db):
    project, (task,), _ = project_with(db, 1, 0)
    judge(db, task.id, make_user(db), choice="tie")
    db.refresh(task)
    assert task.state is TaskState.done
    gold.mark(db, task.id, [task.completion_ids[0]])
    assert task.state is TaskState.open and task.gold_answer == [[task.completion_ids[0]]]


def test_mark_checks_the_project_when_given(db):
    project, (task,), _ = project_with(db, 1, 0)
    other = make_project(db)
    with pytest.raises(NotFound):
        gold.mark(db, task.id, "tie", project_id=other.id)
    with pytest.raises(InvalidInput, match="must be"):
        gold.mark(db, task.id, {"winner": 1})


# --- gold in the annotator's stream ------------------------------------------------------


def test_gold_rate_one_serves_each_gold_task_once_then_normal_work(db):
    project, plain, golden = project_with(db, 3, 2, gold_rate=1.0)
    user = make_user(db)
    served = []
    for step in range(5):
        got = claim(db, project, user, seed=step, at=step * 10)
        served.append(got.task.id)
        judge(db, got.task.id, user, at=step * 10 + 1, choice=got.task.completion_ids[0])
    assert set(served[:2]) == {t.id for t in golden}
    assert set(served[2:]) == {t.id for t in plain}
    with pytest.raises(NoTaskLeft):
        claim(db, project, user, at=100)


def test_gold_is_never_exhausted_and_never_fills_overlap(db):
    project, (plain,), (golden,) = project_with(db, 1, 1, gold_rate=1.0, judgments_per_task=1)
    users = [make_user(db) for _ in range(3)]
    for n, user in enumerate(users):
        got = claim(db, project, user, seed=n, at=n)
        assert got.task.id == golden.id  # every annotator gets it, though required is 1
        correct = n != 1
        choice = golden.completion_ids[0] if correct else "tie"
        j = judge(db, golden.id, user, at=n + 0.5, choice=choice)
        assert (j.is_gold, j.gold_correct) == (True, correct)
    db.refresh(golden)
    db.refresh(plain)
    assert (golden.state, golden.judgment_count) == (TaskState.open, 3)
    assert (plain.state, plain.judgment_count) == (TaskState.open, 0)
    progress = tasks.progress(db, project.id, users[0])
    assert (progress.open_tasks, progress.done_tasks, progress.total_tasks) == (1, 0, 1)
    assert progress.judged_by_user == 1  # the annotator's own count includes gold
    normal = claim(db, project, users[0], at=10)
    assert normal.task.id == plain.id


def test_gold_alone_does_not_keep_annotators_busy(db):
    project, _, golden = project_with(db, 0, 2, gold_rate=1.0)
    with pytest.raises(NoTaskLeft):
        claim(db, project, make_user(db))
    assert golden


def test_gold_rate_zero_never_serves_gold(db):
    project, plain, _ = project_with(db, 4, 3, gold_rate=0.0)
    user = make_user(db)
    for step in range(4):
        got = claim(db, project, user, seed=step, at=step)
        assert not got.task.is_gold
        judge(db, got.task.id, user, at=step + 0.5, choice="tie")
    with pytest.raises(NoTaskLeft):
        claim(db, project, user, at=10)
    assert plain


def test_gold_rate_mixes_gold_in_at_about_that_share(db):
    project, _, golden = project_with(db, 40, 40, gold_rate=0.25)
    user = make_user(db)
    rng = random.Random(2024)
    kinds = []
    for step in range(40):
        now = T0 + timedelta(seconds=step)
        got = tasks.claim_next(db, project.id, user, now=now, rng=rng, lease_seconds=60)
        kinds.append(got.task.is_gold)
        judge(db, got.task.id, user, at=step + 0.5, choice="tie")
    assert 4 <= sum(kinds) <= 16  # 10 expected; binomial(40, .25) stays in this range
    assert kinds[0] is not None and golden


def test_gold_claims_look_like_normal_tasks(client, db):
    project, _, (golden,) = project_with(db, 1, 1, gold_rate=1.0)
    auth = make_token(db, make_user(db))
    body = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth).json()
    assert body["task_id"] == golden.id
    assert set(body) == {"task_id", "lease_expires_at", "prompt", "candidates", "instructions"}
    assert "gold" not in json.dumps(body).replace("g0 good", "")


def test_heartbeat_keeps_a_gold_lease_though_many_judged_it(db):
    project, _, (golden,) = project_with(db, 1, 1, gold_rate=1.0, judgments_per_task=1)
    first, second = make_user(db), make_user(db)
    claim(db, project, first)
    judge(db, golden.id, first, choice="tie")
    claim(db, project, second, at=2)
    assert tasks.heartbeat(db, golden.id, second, now=T0 + timedelta(seconds=30), lease_seconds=60)


def test_scores_per_annotator(db):
    project, _, golden = project_with(db, 1, 3)
    good, poor = make_user(db), make_user(db)
    for task in golden:
        judge(db, task.id, good, choice=task.completion_ids[0])
        judge(db, task.id, poor, choice=task.completion_ids[1] if task is not golden[0] else "tie")
    scores = {s.username: s for s in gold.scores(db, project.id)}
    assert (scores[good.username].judged, scores[good.username].correct) == (3, 3)
    assert scores[good.username].accuracy == 1.0
    assert (scores[poor.username].judged, scores[poor.username].correct) == (3, 0)
    stats = gold.task_stats(db, project.id)
    assert [(s.judged, s.correct) for s in stats] == [(2, 1)] * 3


# --- uploads with a "gold" field ---------------------------------------------------------


def _settings() -> Settings:
    return Settings(env="test", database_url="sqlite://")


def upload(db: Session, project: Project, name: str, lines: list[dict] | str):  # type: ignore[no-untyped-def]
    data = lines if isinstance(lines, str) else "\n".join(json.dumps(x) for x in lines)
    return prompts.import_upload(
        db,
        project.id,
        name,
        data.encode(),
        upsert=False,
        rng=random.Random(0),
        settings=_settings(),
    )


def test_upload_gold_rows_make_gold_tasks_over_their_completions_in_order(db):
    project = make_project(db)
    result = upload(
        db,
        project,
        "set.jsonl",
        [
            {"id": "g1", "prompt": "2+2?", "completions": ["5", "4"], "gold": 1},
            {"id": "g2", "prompt": "Hi", "completions": ["Hello", "Hey"], "gold": "tie"},
            {"id": "n1", "prompt": "Plain", "completions": ["x", "y"]},
        ],
    )
    assert (result.tasks_created, result.gold_tasks) == (3, 2)
    assert "3 tasks created (2 gold)" in result.summary()
    # make_project leaves the gold rate at 0: the upload says the items will not be served
    assert result.notes == (
        "The project's gold rate is 0, so gold items are not served: "
        "set it in the project's settings",
    )
    assert result.summary().endswith(result.notes[0])
    project.gold_rate = 0.1
    again = upload(
        db,
        project,
        "more.jsonl",
        [{"id": "g3", "prompt": "3+3?", "completions": ["6", "7"], "gold": 0}],
    )
    assert again.gold_tasks == 1 and again.notes == ()
    rows = db.execute(
        select(Task, Judgment.id)
        .outerjoin(Judgment, Judgment.task_id == Task.id)
        .where(Task.project_id == project.id)
        .order_by(Task.id)
    ).all()
    by_prompt = {t.prompt.external_id: t for t, _ in rows}
    g1, g2, n1 = by_prompt["g1"], by_prompt["g2"], by_prompt["n1"]
    texts = {c.id: c.text for t in (g1, g2) for c in t.prompt.completions}
    assert [texts[c] for c in g1.completion_ids] == ["5", "4"]
    assert g1.is_gold and g1.gold_answer == [[g1.completion_ids[1]], [g1.completion_ids[0]]]
    assert g2.is_gold and g2.gold_answer == [sorted(g2.completion_ids)]
    assert not n1.is_gold and n1.gold_answer is None


def test_upload_gold_for_a_ranking_project(db):
    project = make_project(db, mode=ProjectMode.ranking, candidates_per_task=3)
    upload(
        db,
        project,
        "rank.jsonl",
        [{"id": "r", "prompt": "Rank", "completions": ["a", "b", "c"], "gold": [2, [0, 1]]}],
    )
    task = db.scalar(select(Task).where(Task.project_id == project.id))
    a, b, c = task.completion_ids
    assert task.is_gold and task.gold_answer == [[c], sorted([a, b])]


def test_upload_gold_from_csv(db):
    project = make_project(db)
    csv_text = "id,prompt,completion_1,completion_2,gold\nq1,Pick,A,B,tie\nq2,Pick,C,D,0\n"
    result = upload(db, project, "set.csv", csv_text)
    assert result.gold_tasks == 2
    answers = db.scalars(
        select(Task.gold_answer).where(Task.project_id == project.id).order_by(Task.id)
    ).all()
    assert len(answers[0][0]) == 2 and len(answers[1]) == 2


def test_upload_rejects_bad_gold_rows_by_line(db):
    project = make_project(db, mode=ProjectMode.ranking, candidates_per_task=3)
    with pytest.raises(InvalidUpload) as caught:
        upload(
            db,
            project,
            "bad.jsonl",
            [
                {"id": "a", "prompt": "p", "completions": ["x", "y", "z"], "gold": 5},
                {"id": "b", "prompt": "p", "completions": ["x", "y", "z", "w"], "gold": 0},
                {"id": "c", "prompt": "p", "gold": 0},
                {"id": "d", "prompt": "p", "completions": ["x", "y", "z"], "gold": "tie"},
                {"id": "e", "prompt": "p", "completions": ["x", "y", "z"], "gold": [0]},
            ],
        )
    errors = {e["line"]: e["error"] for e in caught.value.errors}
    assert set(errors) == {1, 2, 3, 4}
    assert "out of range" in errors[1]
    assert "exactly 3 completions" in errors[2]
    assert "needs its completions" in errors[3]
    assert "pairwise answer" in errors[4]
    assert db.scalar(select(func.count()).select_from(Task)) == 0


# --- paused annotators -------------------------------------------------------------------


def test_paused_annotators_cannot_claim_judge_or_use_tokens(client, db):
    project, (task,), _ = project_with(db, 1, 0, judgments_per_task=2)
    user = make_user(db)
    auth = make_token(db, user)
    claim(db, project, user)
    users_service.set_active(db, user.id, False)
    db.flush()
    with pytest.raises(Forbidden, match="paused"):
        claim(db, project, user, at=1)
    with pytest.raises(Forbidden, match="paused"):
        judgments.record(db, task.id, user, choice="tie", now=T0)
    with pytest.raises(Forbidden, match="paused"):
        tasks.heartbeat(db, task.id, user, now=T0)
    resp = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth)
    assert resp.status_code == 401
    users_service.set_active(db, user.id, True)
    db.flush()
    assert client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth).status_code == 200


def test_monitoring_reports_gold_accuracy_apart_from_normal_counts(db):
    project, (plain,), golden = project_with(db, 1, 2)
    user = make_user(db)
    judge(db, plain.id, user, choice="tie")
    judge(db, golden[0].id, user, choice=golden[0].completion_ids[0])
    judge(db, golden[1].id, user, choice="both_bad")
    (row,) = monitoring.annotators(db, project.id)
    assert (row.judgments, row.gold_judged, row.gold_correct) == (1, 2, 1)
    assert row.gold_accuracy == 0.5
