"""Retiring tasks and prompts: out of the queue at once, judgments kept, and back again."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Judgment, Lease, Project, Role, Task, TaskState
from tests.factories import make_project, make_prompt, make_task, make_token, make_user


def _project(db: Session, n: int, **fields) -> tuple[Project, list[Task]]:  # type: ignore[no-untyped-def]
    project = make_project(db, **fields)
    tasks = [
        make_task(db, project, make_prompt(db, project, [f"left {i}", f"right {i}"]))
        for i in range(n)
    ]
    return project, tasks


def test_a_retired_task_leaves_the_queue_and_its_holder_is_told(
    client: TestClient, db: Session
) -> None:
    project, (first, second) = _project(db, 2, judgments_per_task=2)
    admin = make_token(db, make_user(db, Role.admin))
    alice = make_token(db, make_user(db, Role.annotator))
    bob = make_token(db, make_user(db, Role.annotator))
    next_url = f"/api/v1/projects/{project.id}/tasks/next"
    claimed = client.get(next_url, headers=alice).json()["task_id"]
    other = second.id if claimed == first.id else first.id
    done = client.post(f"/api/v1/tasks/{other}/judgments", json={"choice": "tie"}, headers=bob)
    assert done.status_code == 201  # bob judged the other task: its judgment must stay

    resp = client.post(f"/api/v1/tasks/{claimed}/retire", headers=admin)
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "retired"
    assert db.scalar(select(func.count()).select_from(Lease).where(Lease.task_id == claimed)) == 0
    late = client.post(f"/api/v1/tasks/{claimed}/judgments", json={"choice": "tie"}, headers=alice)
    assert late.status_code == 409 and "an admin retired it" in late.json()["detail"]
    # bob has judged the other task, so nothing is left for him; alice gets the other one
    assert client.get(next_url, headers=bob).status_code == 204
    assert client.get(next_url, headers=alice).json()["task_id"] == other

    retired_other = client.post(
        f"/api/v1/tasks/{other}/retire", json={"retired": True}, headers=admin
    )
    assert retired_other.json()["state"] == "retired"
    assert db.scalar(select(func.count()).select_from(Judgment)) == 1  # kept
    counts = client.get(f"/api/v1/projects/{project.id}", headers=admin).json()["progress"]
    assert counts["tasks"] == {"open": 0, "done": 0, "retired": 2}

    back = client.post(f"/api/v1/tasks/{claimed}/retire", json={"retired": False}, headers=admin)
    assert back.json()["state"] == "open"
    assert client.get(next_url, headers=bob).json()["task_id"] == claimed


def test_putting_a_full_task_back_makes_it_done(client: TestClient, db: Session) -> None:
    project, (task,) = _project(db, 1)
    admin = make_token(db, make_user(db, Role.admin))
    alice = make_token(db, make_user(db, Role.annotator))
    assert (
        client.post(
            f"/api/v1/tasks/{task.id}/judgments", json={"choice": "tie"}, headers=alice
        ).status_code
        == 201
    )
    assert client.post(f"/api/v1/tasks/{task.id}/retire", headers=admin).json()["state"] == (
        "retired"
    )
    again = client.post(f"/api/v1/tasks/{task.id}/retire", headers=admin)  # idempotent
    assert again.json()["state"] == "retired"
    back = client.post(f"/api/v1/tasks/{task.id}/retire", json={"retired": False}, headers=admin)
    assert back.json()["state"] == "done"


def test_retire_a_prompt_and_the_role_checks(client: TestClient, db: Session) -> None:
    project = make_project(db, mode="ranking", candidates_per_task=3)
    prompt = make_prompt(db, project, ["a", "b", "c"])
    tasks = [make_task(db, project, prompt) for _ in range(2)]
    admin = make_token(db, make_user(db, Role.admin))
    resp = client.post(f"/api/v1/prompts/{prompt.id}/retire", headers=admin)
    assert resp.status_code == 200
    assert resp.json() == [
        {"task_id": t.id, "prompt_id": prompt.id, "state": "retired"} for t in tasks
    ]
    db.expire_all()
    assert {db.get(Task, t.id).state for t in tasks} == {TaskState.retired}
    assert client.post("/api/v1/prompts/987654/retire", headers=admin).status_code == 404
    assert client.post("/api/v1/tasks/987654/retire", headers=admin).status_code == 404
    bad = client.post(f"/api/v1/tasks/{tasks[0].id}/retire", json={"retired": "x"}, headers=admin)
    assert bad.status_code == 422
    for role in (Role.annotator, Role.researcher):
        headers = make_token(db, make_user(db, role))
        assert (
            client.post(f"/api/v1/tasks/{tasks[0].id}/retire", headers=headers).status_code == 403
        )
