"""Active-learning claims: the SQL window ordered by fixed task predictions (both backends),
the random share, gold mixing, and the per-project setting through the loop API."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.errors import InvalidInput, NoTaskLeft
from app.models import Judgment, Project, Role, Skip, Task, TaskPrediction, User
from app.services import chaining, tasks
from app.services import users as users_service
from tests.factories import make_project, make_prompt, make_task, make_token
from tests.factories import make_user as make_user_with_password

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
_names = itertools.count(1)


def make_user(db: Session) -> User:
    """A token-only annotator (no argon2 hash: that costs most of a second per user)."""
    return users_service.create(db, f"active-{next(_names)}", Role.annotator, None)


def claim(db: Session, project: Project, user: User, seed: int = 0) -> Task:
    got = tasks.claim_next(db, project.id, user, now=T0, rng=random.Random(seed), lease_seconds=60)
    return got.task


def project_with(
    db: Session, n: int, strategy: str | None = "uncertainty", share: float = 0.0, **fields: Any
) -> tuple[Project, list[Task]]:
    settings = {} if strategy is None else {"assignment_strategy": strategy, "random_share": share}
    fields.setdefault("judgments_per_task", 1)
    project = make_project(db, settings=settings, **fields)
    made = []
    for i in range(n):
        prompt = make_prompt(db, project, [f"left {i}", f"right {i}"])
        made.append(make_task(db, project, prompt))
    return project, made


def predict(db: Session, task: Task, uncertainty: float, disagreement: float | None = None) -> None:
    db.add(TaskPrediction(task_id=task.id, uncertainty=uncertainty, disagreement=disagreement))
    db.flush()


def claims_by_new_users(db: Session, project: Project, n: int) -> list[int]:
    """The tasks `n` fresh annotators get, one claim each (a 1-judgment task leased by one is
    no longer open to the next)."""
    return [claim(db, project, make_user(db)).id for _ in range(n)]


def five_tasks(db: Session, strategy: str | None, share: float = 0.0) -> list[Task]:
    """Five pairs: predictions 0.3, 0.01, none, 0.2, none; priorities 0, 1, 4, 3, 2 (so the
    default order, by priority, differs from the model's)."""
    project, made = project_with(db, 5, strategy, share)
    for task, priority in zip(made, (0, 1, 4, 3, 2), strict=True):
        task.priority = priority
    predict(db, made[0], 0.3)
    predict(db, made[1], 0.01)
    predict(db, made[3], 0.2)
    return made


# --- the window's order ------------------------------------------------------------------------


def test_uncertainty_claims_the_closest_calls_first_then_the_unscored_in_id_order(db):
    t = five_tasks(db, "uncertainty")
    project = db.get(Project, t[0].project_id)
    assert claims_by_new_users(db, project, 5) == [t[1].id, t[3].id, t[0].id, t[2].id, t[4].id]
    with pytest.raises(NoTaskLeft):
        claim(db, project, make_user(db))


def test_random_share_one_is_the_default_order_and_default_ignores_predictions(db):
    by_priority = [2, 3, 4, 1, 0]  # indices of five_tasks by priority, highest first
    t = five_tasks(db, "uncertainty", share=1.0)
    project = db.get(Project, t[0].project_id)
    assert claims_by_new_users(db, project, 5) == [t[i].id for i in by_priority]

    t = five_tasks(db, None)  # no strategy set: the default, predictions or not
    project = db.get(Project, t[0].project_id)
    assert claims_by_new_users(db, project, 5) == [t[i].id for i in by_priority]


def test_partly_judged_tasks_come_before_the_models_order(db):
    project, t = project_with(db, 3, judgments_per_task=2)
    predict(db, t[0], 0.4)
    predict(db, t[1], 0.0)
    predict(db, t[2], 0.1)
    t[0].judgment_count = 1  # one judgment in: finishing its overlap comes first
    db.flush()
    user = make_user(db)
    assert claim(db, project, user).id == t[0].id


def test_disagreement_first_then_uncertainty_then_main_only_then_unscored(db):
    project, t = project_with(db, 6, "disagreement")
    predict(db, t[0], 0.30, disagreement=0.10)
    predict(db, t[1], 0.40, disagreement=0.50)
    predict(db, t[2], 0.05, disagreement=0.10)  # same gap as t0, less certain: before it
    predict(db, t[3], 0.00)  # no held-out opinion: after every task that has one
    predict(db, t[5], 0.20)
    order = claims_by_new_users(db, project, 6)
    assert order == [t[1].id, t[2].id, t[0].id, t[3].id, t[5].id, t[4].id]


def test_the_window_keeps_eligibility_judged_skipped_and_reserved_tasks_are_passed(db):
    project, t = project_with(db, 3)
    for task, u in zip(t, (0.0, 0.1, 0.2), strict=True):
        predict(db, task, u)
    user = make_user(db)
    a, b = t[0].completion_ids
    judged = Judgment(
        project_id=project.id,
        task_id=t[0].id,
        user_id=user.id,
        ranking=[[a], [b]],
        display_order=[a, b],
    )  # the counter is left alone: t0 stays open for others
    db.add_all([judged, Skip(user_id=user.id, prompt_id=t[1].prompt_id, task_id=t[1].id)])
    db.flush()
    assert claim(db, project, user).id == t[2].id  # passes judged t0 and skipped t1
    assert claim(db, project, make_user(db)).id == t[0].id  # t0 is still open to others
    assert claim(db, project, make_user(db)).id == t[1].id  # t0, t2 reserved: t1


def test_a_random_share_of_claims_use_the_default_window(db):
    """Each claim draws its window first: the model's with probability 1 - share."""
    project, t = project_with(db, 3, share=0.5, judgments_per_task=100)
    predict(db, t[0], 0.0)  # the model's pick
    t[2].priority = 5  # the default window's pick
    db.flush()
    got = [claim(db, project, make_user(db), seed=s).id for s in range(40)]
    expected = [t[2].id if random.Random(s).random() < 0.5 else t[0].id for s in range(40)]
    assert got == expected
    assert 10 < got.count(t[2].id) < 30  # both windows are really used


def test_gold_is_still_mixed_in_at_the_gold_rate(db):
    project, t = project_with(db, 2, gold_rate=1.0)
    predict(db, t[1], 0.0)
    prompt = make_prompt(db, project, ["gold left", "gold right"])
    golden = make_task(db, project, prompt, is_gold=True)
    golden.gold_answer = [[golden.completion_ids[0]], [golden.completion_ids[1]]]
    db.flush()
    assert claim(db, project, make_user(db)).id == golden.id


def test_large_projects_reach_past_the_first_window(db, monkeypatch):
    """Unscored tasks beyond the window are still reached once the scored ones are taken."""
    monkeypatch.setattr(tasks, "CANDIDATE_WINDOW", 2)
    monkeypatch.setattr(tasks, "CANDIDATE_BATCH", 2)
    project, t = project_with(db, 5)
    predict(db, t[4], 0.1)
    predict(db, t[3], 0.2)
    assert claims_by_new_users(db, project, 5) == [t[4].id, t[3].id, t[0].id, t[1].id, t[2].id]


# --- the per-project setting -------------------------------------------------------------------


def test_loop_settings_carry_the_strategy_with_defaults_and_checks(db):
    project = make_project(db)
    got = chaining.get_loop(db, project.id)
    assert (got["assignment_strategy"], got["random_share"]) == ("default", 0.2)
    got = chaining.update_loop(
        db, project.id, {"assignment_strategy": "disagreement", "random_share": 0}
    )
    assert (got["assignment_strategy"], got["random_share"]) == ("disagreement", 0.0)
    assert project.settings["assignment_strategy"] == "disagreement"
    for bad, message in (
        ({"assignment_strategy": "smart"}, "must be one of default, uncertainty, disagreement"),
        ({"assignment_strategy": 3}, "must be one of"),
        ({"random_share": 1.5}, "random_share must be a number from 0 to 1, not 1.5"),
        ({"random_share": -0.1}, "from 0 to 1"),
        ({"random_share": True}, "from 0 to 1"),
        ({"random_share": "half"}, "from 0 to 1"),
    ):
        with pytest.raises(InvalidInput, match=message):
            chaining.update_loop(db, project.id, bad)
    assert chaining.get_loop(db, project.id)["assignment_strategy"] == "disagreement"
    got = chaining.update_loop(db, project.id, {"assignment_strategy": None, "random_share": None})
    assert (got["assignment_strategy"], got["random_share"]) == ("default", 0.2)
    assert "assignment_strategy" not in project.settings


def test_an_admin_sets_the_strategy_through_the_api_and_claims_follow_it(client, db):
    admin = make_token(db, make_user_with_password(db, Role.admin))
    annotator = make_token(db, make_user_with_password(db, Role.annotator))
    project, t = project_with(db, 3, strategy=None)
    t[0].priority = 9  # the default order's first pick
    predict(db, t[2], 0.0)  # the model's
    db.flush()
    url = f"/api/v1/projects/{project.id}/loop"

    shown = client.get(url, headers=admin).json()
    assert (shown["assignment_strategy"], shown["random_share"]) == ("default", 0.2)
    assert client.put(url, json={"random_share": 0}, headers=annotator).status_code == 403
    put = client.put(
        url, json={"assignment_strategy": "uncertainty", "random_share": 0}, headers=admin
    )
    assert put.status_code == 200, put.text
    assert (put.json()["assignment_strategy"], put.json()["random_share"]) == ("uncertainty", 0)
    assert client.get(url, headers=admin).json() == put.json()

    nxt = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=annotator)
    assert nxt.status_code == 200, nxt.text
    assert nxt.json()["task_id"] == t[2].id

    for bad, field in (
        ({"assignment_strategy": "smart"}, "assignment_strategy"),
        ({"random_share": 2}, "random_share"),
        ({"random_share": "half"}, "random_share"),
    ):
        resp = client.put(url, json=bad, headers=admin)
        assert resp.status_code == 422, (bad, resp.text)
        assert resp.json()["errors"][0]["loc"][-1] == field
    assert client.get(url, headers=admin).json() == put.json()  # nothing half-written
