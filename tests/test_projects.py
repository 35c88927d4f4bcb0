"""Projects: the service, the JSON API with its role matrix, and the admin pages."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.models import Judgment, Project, ProjectMode, Role, Task, TaskState, User
from app.services import projects
from tests.factories import login, make_project, make_prompt, make_task, make_token, make_user

BRIEF_KEYS = {"id", "name", "mode", "instructions"}


def judge(db: Session, task: Task, user: User) -> Judgment:
    ids = list(task.completion_ids)
    judgment = Judgment(
        project_id=task.project_id,
        task_id=task.id,
        user_id=user.id,
        ranking=[[ids[0]], [ids[1]]],
        display_order=ids,
    )
    db.add(judgment)
    db.flush()
    return judgment


def project_count(db: Session) -> int:
    return int(db.scalar(select(func.count()).select_from(Project)) or 0)


@pytest.fixture
def admin_headers(db: Session) -> dict[str, str]:
    return make_token(db, make_user(db, Role.admin))


# --- service ----------------------------------------------------------------------------------


def test_create_with_defaults(db: Session) -> None:
    admin = make_user(db, Role.admin)
    project = projects.create(
        db, name="  Helpfulness  ", mode="pairwise", instructions="Pick one.", created_by=admin
    )
    assert (
        project.name,
        project.mode,
        project.candidates_per_task,
        project.judgments_per_task,
        project.lease_seconds,
        project.gold_rate,
        project.created_by,
    ) == ("Helpfulness", ProjectMode.pairwise, 2, 1, 300, 0.0, admin.id)


def test_ranking_defaults_to_four_candidates(db: Session) -> None:
    project = projects.create(db, name="rank", mode=ProjectMode.ranking, instructions="")
    assert (project.mode, project.candidates_per_task) == (ProjectMode.ranking, 4)


def test_duplicate_name_is_a_conflict(db: Session) -> None:
    projects.create(db, name="same", mode="pairwise", instructions="")
    with pytest.raises(Conflict, match="already exists"):
        projects.create(db, name="same", mode="pairwise", instructions="")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "   "}, "name must be 1 to 200"),
        ({"name": "x" * 201}, "name must be 1 to 200"),
        ({"mode": "tournament"}, "mode must be one of pairwise, ranking"),
        ({"judgments_per_task": 0}, "judgments_per_task"),
        ({"judgments_per_task": 51}, "judgments_per_task"),
        ({"judgments_per_task": True}, "judgments_per_task"),
        ({"candidates_per_task": 3}, "exactly 2 candidates"),
        ({"mode": "ranking", "candidates_per_task": 2}, "3 to 9 candidates"),
        ({"mode": "ranking", "candidates_per_task": 10}, "3 to 9 candidates"),
        ({"lease_seconds": 5}, "lease_seconds"),
        ({"gold_rate": 1.5}, "gold_rate"),
        ({"gold_rate": -0.1}, "gold_rate"),
        ({"gold_rate": True}, "gold_rate"),
        ({"instructions": "x" * 20_001}, "instructions"),
    ],
)
def test_bad_values_are_invalid_input(db: Session, fields: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"name": "valid", "mode": "pairwise", "instructions": ""} | fields
    with pytest.raises(InvalidInput, match=message):
        projects.create(db, **values)
    assert project_count(db) == 0


def test_resolve_by_id_or_name(db: Session) -> None:
    first = projects.create(db, name="alpha", mode="pairwise", instructions="")
    named_digits = projects.create(db, name="2024", mode="pairwise", instructions="")
    assert projects.resolve(db, str(first.id)) is first
    assert projects.resolve(db, " alpha ") is first
    assert projects.resolve(db, "2024") is named_digits  # no project has id 2024
    with pytest.raises(NotFound, match="no project with id or name 'beta'"):
        projects.resolve(db, "beta")


def test_list_all_is_newest_first(db: Session) -> None:
    a = projects.create(db, name="a", mode="pairwise", instructions="")
    b = projects.create(db, name="b", mode="pairwise", instructions="")
    assert projects.list_all(db) == [b, a]


def test_progress_counts_everything(db: Session) -> None:
    project = make_project(db)
    other = make_project(db)
    p1 = make_prompt(db, project, ["a", "b"])
    p2 = make_prompt(db, project, ["c", "d"])
    make_prompt(db, project, [])  # waiting for generated completions
    make_prompt(db, other, ["x", "y"])
    t1 = make_task(db, project, p1, state=TaskState.done, judgment_count=1)
    t2 = make_task(db, project, p2)
    make_task(db, project, p2, state=TaskState.retired)
    ann1, ann2 = make_user(db, Role.annotator, "ann-one"), make_user(db, Role.annotator, "ann-two")
    judge(db, t1, ann1)
    judge(db, t2, ann1)
    judge(db, t2, ann2)

    assert projects.progress(db, project.id) == {
        "prompts": 3,
        "prompts_waiting": 1,
        "completions": 4,
        "tasks": {"open": 1, "done": 1, "retired": 1},
        "judgments": 3,
        "annotators": [
            {"user_id": ann1.id, "username": "ann-one", "judgments": 2},
            {"user_id": ann2.id, "username": "ann-two", "judgments": 1},
        ],
    }
    empty = projects.progress(db, other.id)
    assert empty["tasks"] == {"open": 0, "done": 0, "retired": 0} and empty["annotators"] == []


def test_progress_leaves_gold_tasks_out_of_the_task_counts(client: TestClient, db: Session) -> None:
    """A finished project whose gold tasks stay open for every annotator reads as finished."""
    project = make_project(db)
    real = make_task(db, project, make_prompt(db, project, ["a", "b"]), state=TaskState.done)
    prompt = make_prompt(db, project, ["c", "d"])
    golden = make_task(db, project, prompt, is_gold=True, gold_answer=[[prompt.completions[0].id]])
    make_task(db, project, make_prompt(db, project, ["e", "f"]), is_gold=True, gold_answer=[])
    annotator = make_user(db, Role.annotator)
    judge(db, real, annotator)
    judge(db, golden, annotator)  # gold judgments are work done: they count for the annotator

    counts = projects.progress(db, project.id)
    assert counts["tasks"] == {"open": 0, "done": 1, "retired": 0}
    assert counts["judgments"] == 2 and counts["annotators"][0]["judgments"] == 2
    resp = client.get(
        f"/api/v1/projects/{project.id}", headers=make_token(db, make_user(db, Role.researcher))
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["progress"]["tasks"] == {"open": 0, "done": 1, "retired": 0}


def test_progress_of_a_missing_project(db: Session) -> None:
    with pytest.raises(NotFound):
        projects.progress(db, 999_999)


# --- JSON API ---------------------------------------------------------------------------------


def test_api_create_returns_the_project(client: TestClient, db: Session) -> None:
    admin = make_user(db, Role.admin)
    resp = client.post(
        "/api/v1/projects",
        headers=make_token(db, admin),
        json={
            "name": "Helpful",
            "mode": "ranking",
            "instructions": "Order best first.",
            "judgments_per_task": 3,
            "candidates_per_task": 5,
        },
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert {
        k: body[k]
        for k in (
            "name",
            "mode",
            "instructions",
            "judgments_per_task",
            "candidates_per_task",
            "lease_seconds",
            "gold_rate",
            "created_by",
        )
    } == {
        "name": "Helpful",
        "mode": "ranking",
        "instructions": "Order best first.",
        "judgments_per_task": 3,
        "candidates_per_task": 5,
        "lease_seconds": 300,
        "gold_rate": 0.0,
        "created_by": admin.id,
    }
    assert db.get(Project, body["id"]) is not None


@pytest.mark.parametrize(
    ("payload", "status", "error"),
    [
        ({"name": "dup"}, 409, "conflict"),
        ({"name": "x", "judgments_per_task": 0}, 422, "invalid_input"),
        ({"name": "x", "mode": "ranking", "candidates_per_task": 12}, 422, "invalid_input"),
        ({"name": "x", "mode": "tournament"}, 422, "invalid_input"),
        ({"name": "x", "judgements_per_task": 2}, 422, "invalid_input"),  # misspelt: refused
        ({"name": ""}, 422, "invalid_input"),
    ],
)
def test_api_create_rejects_bad_input(
    client: TestClient,
    db: Session,
    admin_headers: dict[str, str],
    payload: dict[str, Any],
    status: int,
    error: str,
) -> None:
    make_project(db, name="dup")
    resp = client.post("/api/v1/projects", headers=admin_headers, json=payload)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert project_count(db) == 1


@pytest.mark.parametrize("role", [Role.annotator, Role.researcher])
def test_api_create_needs_admin(client: TestClient, db: Session, role: Role) -> None:
    resp = client.post(
        "/api/v1/projects", headers=make_token(db, make_user(db, role)), json={"name": "nope"}
    )
    assert resp.status_code == 403
    assert resp.json()["error"] == "forbidden" and "admin" in resp.json()["detail"]
    assert project_count(db) == 0


def test_api_create_needs_login(client: TestClient, db: Session) -> None:
    resp = client.post("/api/v1/projects", json={"name": "nope"})
    assert resp.status_code == 401 and resp.json()["error"] == "not_authenticated"
    assert project_count(db) == 0


def test_api_create_with_a_bad_token_is_401(client: TestClient, db: Session) -> None:
    resp = client.post(
        "/api/v1/projects", headers={"Authorization": "Bearer pfl_nope"}, json={"name": "nope"}
    )
    assert resp.status_code == 401 and resp.json()["error"] == "not_authenticated"


def test_api_create_with_a_session_cookie_needs_the_csrf_header(
    client: TestClient, db: Session
) -> None:
    csrf = login(client, make_user(db, Role.admin).username)
    refused = client.post("/api/v1/projects", json={"name": "no-token"})
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    accepted = client.post(
        "/api/v1/projects", json={"name": "with-token"}, headers={"X-CSRF-Token": csrf}
    )
    assert accepted.status_code == 201


@pytest.mark.parametrize("role", [Role.admin, Role.researcher])
def test_api_list_for_admins_and_researchers_is_complete(
    client: TestClient, db: Session, role: Role
) -> None:
    older, newer = make_project(db, name="older"), make_project(db, name="newer")
    resp = client.get("/api/v1/projects", headers=make_token(db, make_user(db, role)))
    assert resp.status_code == 200
    body = resp.json()
    assert [p["id"] for p in body] == [newer.id, older.id]
    assert {"judgments_per_task", "candidates_per_task", "lease_seconds", "gold_rate"} <= set(
        body[0]
    )


def test_api_list_for_annotators_is_brief(client: TestClient, db: Session) -> None:
    project = make_project(db, name="labelme", instructions="Be kind.")
    resp = client.get("/api/v1/projects", headers=make_token(db, make_user(db, Role.annotator)))
    assert resp.status_code == 200
    assert resp.json() == [
        {"id": project.id, "name": "labelme", "mode": "pairwise", "instructions": "Be kind."}
    ]


def test_api_list_needs_login(client: TestClient) -> None:
    resp = client.get("/api/v1/projects")
    assert resp.status_code == 401 and resp.json()["error"] == "not_authenticated"


def test_api_get_project_has_progress(client: TestClient, db: Session) -> None:
    project = make_project(db)
    prompt = make_prompt(db, project, ["a", "b"])
    make_prompt(db, project, [])
    task = make_task(db, project, prompt)
    annotator = make_user(db, Role.annotator)
    judge(db, task, annotator)
    resp = client.get(
        f"/api/v1/projects/{project.id}", headers=make_token(db, make_user(db, Role.researcher))
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["id"] == project.id and body["name"] == project.name
    assert body["progress"] == {
        "prompts": 2,
        "prompts_waiting": 1,
        "completions": 2,
        "tasks": {"open": 1, "done": 0, "retired": 0},
        "judgments": 1,
        "annotators": [{"user_id": annotator.id, "username": annotator.username, "judgments": 1}],
    }


def test_api_get_project_for_annotators_is_brief(client: TestClient, db: Session) -> None:
    project = make_project(db)
    resp = client.get(
        f"/api/v1/projects/{project.id}", headers=make_token(db, make_user(db, Role.annotator))
    )
    assert resp.status_code == 200 and set(resp.json()) == BRIEF_KEYS


def test_api_get_missing_project_is_404(
    client: TestClient, db: Session, admin_headers: dict[str, str]
) -> None:
    resp = client.get("/api/v1/projects/999999", headers=admin_headers)
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"


def test_api_get_project_needs_login(client: TestClient, db: Session) -> None:
    project = make_project(db)
    assert client.get(f"/api/v1/projects/{project.id}").status_code == 401


# --- pages ------------------------------------------------------------------------------------


def test_projects_page_lists_projects_with_counts_and_the_create_form(
    client: TestClient, db: Session
) -> None:
    project = make_project(db, name="<b>bold</b> project")
    make_prompt(db, project, [])
    login(client, make_user(db, Role.admin).username)
    page = client.get("/projects")
    assert page.status_code == 200
    assert f'href="/projects/{project.id}"' in page.text
    assert "&lt;b&gt;bold&lt;/b&gt; project" in page.text and "<b>bold</b>" not in page.text
    assert 'action="/projects#create"' in page.text and 'name="csrf_token"' in page.text


def test_researchers_see_projects_but_cannot_create(client: TestClient, db: Session) -> None:
    project = make_project(db)
    csrf = login(client, make_user(db, Role.researcher).username)
    page = client.get("/projects")
    assert page.status_code == 200 and project.name in page.text
    assert 'action="/projects#create"' not in page.text
    resp = client.post("/projects", data={"name": "sneaky", "csrf_token": csrf})
    assert resp.status_code == 403
    assert project_count(db) == 1


def test_annotators_cannot_open_admin_pages(client: TestClient, db: Session) -> None:
    project = make_project(db)
    login(client, make_user(db, Role.annotator).username)
    assert client.get("/projects").status_code == 403
    assert client.get(f"/projects/{project.id}").status_code == 403


def test_pages_send_anonymous_visitors_to_login(client: TestClient, db: Session) -> None:
    resp = client.get("/projects", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/login?next=/projects")


def test_create_form_creates_and_redirects(client: TestClient, db: Session) -> None:
    csrf = login(client, make_user(db, Role.admin).username)
    resp = client.post(
        "/projects",
        data={
            "name": "From the form",
            "mode": "ranking",
            "instructions": "Rank them.",
            "judgments_per_task": "2",
            "candidates_per_task": "",
            "csrf_token": csrf,
        },
        follow_redirects=False,
    )
    assert resp.status_code == 303
    project = projects.resolve(db, "From the form")
    assert resp.headers["location"] == f"/projects/{project.id}"
    assert (project.mode, project.candidates_per_task, project.judgments_per_task) == (
        ProjectMode.ranking,
        4,
        2,
    )


@pytest.mark.parametrize(
    ("form", "status", "message"),
    [
        ({"name": "taken"}, 409, "already exists"),
        ({"name": "n", "judgments_per_task": "two"}, 422, "must be a whole number"),
        ({"name": "n", "mode": "ranking", "candidates_per_task": "12"}, 422, "3 to 9 candidates"),
    ],
)
def test_create_form_errors_rerender_with_the_values(
    client: TestClient, db: Session, form: dict[str, str], status: int, message: str
) -> None:
    make_project(db, name="taken")
    csrf = login(client, make_user(db, Role.admin).username)
    resp = client.post("/projects", data={"instructions": "keep <me>", **form, "csrf_token": csrf})
    assert resp.status_code == status
    assert message in resp.text
    assert "keep &lt;me&gt;</textarea>" in resp.text
    assert project_count(db) == 1


def test_create_form_without_csrf_token_is_403(client: TestClient, db: Session) -> None:
    login(client, make_user(db, Role.admin).username)
    resp = client.post("/projects", data={"name": "csrf-less"})
    assert resp.status_code == 403 and "CSRF" in resp.text
    assert project_count(db) == 0


def test_project_page_for_admins(client: TestClient, db: Session) -> None:
    project = make_project(
        db, instructions="Prefer <code>correct</code> answers.\nThen short ones."
    )
    prompt = make_prompt(db, project, ["a", "b"])
    make_prompt(db, project, [])
    task = make_task(db, project, prompt)
    annotator = make_user(db, Role.annotator, "busy-bee")
    judge(db, task, annotator)
    login(client, make_user(db, Role.admin).username)
    page = client.get(f"/projects/{project.id}")
    assert page.status_code == 200
    text = page.text
    assert "Prefer &lt;code&gt;correct&lt;/code&gt; answers." in text
    assert "<b>2</b>prompts" in text and "<b>1</b>waiting for completions" in text
    assert "<b>1</b>tasks open" in text and "<b>0</b>tasks done" in text
    assert "<b>1</b>judgments" in text
    assert "<tr><td>busy-bee</td><td>1</td></tr>" in text
    assert f'href="/projects/{project.id}/export"' in text
    assert f'href="/label/{project.id}"' in text
    assert f'action="/projects/{project.id}/prompts/upload#upload"' in text
    assert 'enctype="multipart/form-data"' in text


def test_project_page_for_researchers_is_read_only(client: TestClient, db: Session) -> None:
    project = make_project(db)
    csrf = login(client, make_user(db, Role.researcher).username)
    text = client.get(f"/projects/{project.id}").text
    assert f'href="/projects/{project.id}/export"' in text
    assert "/prompts/upload" not in text and f'href="/label/{project.id}"' not in text
    resp = client.post(
        f"/projects/{project.id}/prompts/upload",
        files={"file": ("a.jsonl", b'{"id": "a", "prompt": "p"}\n')},
        data={"csrf_token": csrf},
    )
    assert resp.status_code == 403


def test_missing_project_page_is_404(client: TestClient, db: Session) -> None:
    login(client, make_user(db, Role.admin).username)
    assert client.get("/projects/999999").status_code == 404


def test_tasks_created_by_upload_show_on_the_page(client: TestClient, db: Session) -> None:
    project = make_project(db)
    csrf = login(client, make_user(db, Role.admin).username)
    data = b'{"id": "a", "prompt": "p", "completions": ["x", "y", "z"]}\n'
    resp = client.post(
        f"/projects/{project.id}/prompts/upload",
        files={"file": ("a.jsonl", data)},
        data={"csrf_token": csrf},
    )
    assert resp.status_code == 200
    assert "<b>3</b>tasks open" in resp.text
    assert (
        db.scalar(select(func.count()).select_from(Task).where(Task.project_id == project.id)) == 3
    )


# --- changing settings ------------------------------------------------------------------------


def _task_states(db: Session, project: Project) -> list[tuple[int, int, str]]:
    db.expire_all()
    rows = db.execute(
        select(Task.judgment_count, Task.required_judgments, Task.state)
        .where(Task.project_id == project.id)
        .order_by(Task.id)
    )
    return [(count, required, TaskState(state).value) for count, required, state in rows]


def test_update_overlap_applies_to_existing_tasks(db: Session) -> None:
    """Raising judgments per task reopens done tasks with fewer judgments; lowering it closes
    open tasks that have enough; retired tasks stay retired; gold tasks keep their own."""
    project = make_project(db, judgments_per_task=1)
    users = [make_user(db, Role.annotator) for _ in range(2)]
    tasks = [make_task(db, project, make_prompt(db, project, ["a", "b"])) for _ in range(4)]
    for task, judges in zip(tasks, ([users[0]], [users[0], users[1]], [], [users[0]]), strict=True):
        for user in judges:
            judge(db, task, user)
        task.judgment_count = len(judges)
        task.state = TaskState.done if judges else TaskState.open
    tasks[3].state = TaskState.retired
    make_task(db, project, make_prompt(db, project, ["g", "h"]), is_gold=True)
    db.flush()

    projects.update(db, project.id, {"judgments_per_task": 2})
    assert project.judgments_per_task == 2
    assert _task_states(db, project) == [
        (1, 2, "open"),  # reopened: one more judgment needed
        (2, 2, "done"),
        (0, 2, "open"),
        (1, 1, "retired"),  # untouched
        (0, 1, "open"),  # gold: open for everyone, whatever the overlap
    ]
    projects.update(db, project.id, {"judgments_per_task": 1})
    assert _task_states(db, project) == [
        (1, 1, "done"),
        (2, 1, "done"),
        (0, 1, "open"),
        (1, 1, "retired"),
        (0, 1, "open"),
    ]
    assert db.scalar(select(func.count()).select_from(Judgment)) == 4  # nothing removed


def test_update_checks_everything_before_changing_anything(db: Session) -> None:
    project = make_project(db, name="keep", gold_rate=0.0)
    make_project(db, name="other")
    before = (project.name, project.gold_rate, project.lease_seconds)
    for changes, message in [
        ({"gold_rate": 0.2, "lease_seconds": 5}, "lease_seconds must be from 10"),
        ({"gold_rate": 1.5}, "gold_rate must be between 0 and 1"),
        ({"name": "other"}, "already exists"),
        ({"mode": "ranking"}, "cannot change mode"),
        ({"judgments_per_task": 0}, "judgments_per_task must be a whole number"),
    ]:
        with pytest.raises((InvalidInput, Conflict), match=message):
            projects.update(db, project.id, changes)
        db.refresh(project)
        assert (project.name, project.gold_rate, project.lease_seconds) == before
    assert projects.update(db, project.id, {"name": "keep"}).name == "keep"  # its own name
    with pytest.raises(NotFound):
        projects.update(db, 987654, {"gold_rate": 0.1})


def test_api_patch_changes_only_the_given_settings(
    client: TestClient, db: Session, admin_headers: dict[str, str]
) -> None:
    project = make_project(db, instructions="old", lease_seconds=300)
    resp = client.patch(
        f"/api/v1/projects/{project.id}",
        json={"gold_rate": 0.1, "instructions": "new"},
        headers=admin_headers,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["gold_rate"], body["instructions"], body["lease_seconds"]) == (0.1, "new", 300)
    db.refresh(project)
    assert (project.gold_rate, project.instructions) == (0.1, "new")

    bad = client.patch(
        f"/api/v1/projects/{project.id}", json={"gold_rate": 2}, headers=admin_headers
    )
    assert bad.status_code == 422 and "gold_rate must be between 0 and 1" in bad.text
    extra = client.patch(
        f"/api/v1/projects/{project.id}", json={"mode": "ranking"}, headers=admin_headers
    )
    assert extra.status_code == 422
    missing = client.patch(
        "/api/v1/projects/987654", json={"gold_rate": 0.1}, headers=admin_headers
    )
    assert missing.status_code == 404
    researcher = make_token(db, make_user(db, Role.researcher))
    forbidden = client.patch(
        f"/api/v1/projects/{project.id}", json={"gold_rate": 0.5}, headers=researcher
    )
    assert forbidden.status_code == 403
    db.refresh(project)
    assert project.gold_rate == 0.1


def test_settings_form_saves_and_rerenders_errors(client: TestClient, db: Session) -> None:
    project = make_project(db, name="form-project")
    csrf = login(client, make_user(db, Role.admin).username)
    page = client.get(f"/projects/{project.id}").text
    assert f'action="/projects/{project.id}/settings#settings"' in page
    fields = {
        "name": "renamed",
        "instructions": "Be <kind>.",
        "judgments_per_task": "3",
        "lease_seconds": "600",
        "gold_rate": "0.25",
    }
    resp = client.post(
        f"/projects/{project.id}/settings",
        data={**fields, "csrf_token": csrf},
        follow_redirects=False,
    )
    assert resp.status_code == 303
    db.refresh(project)
    assert (
        project.name,
        project.instructions,
        project.judgments_per_task,
        project.lease_seconds,
        project.gold_rate,
    ) == ("renamed", "Be <kind>.", 3, 600, 0.25)
    assert "Settings saved." in client.get(resp.headers["location"]).text

    resp = client.post(
        f"/projects/{project.id}/settings",
        data={**fields, "name": "again", "gold_rate": "lots", "csrf_token": csrf},
    )
    assert resp.status_code == 422 and "gold rate must be a number, not &#39;lots&#39;" in resp.text
    assert 'value="again"' in resp.text and 'value="lots"' in resp.text
    db.refresh(project)
    assert project.name == "renamed"
    short = client.post(
        f"/projects/{project.id}/settings",
        data={**fields, "lease_seconds": "5", "csrf_token": csrf},
    )
    assert short.status_code == 422 and "Lease (seconds) must be from 10 to 86400" in short.text
    assert client.post(f"/projects/{project.id}/settings", data=fields).status_code == 403


def test_create_form_takes_lease_and_gold_rate(client: TestClient, db: Session) -> None:
    csrf = login(client, make_user(db, Role.admin).username)
    resp = client.post(
        "/projects",
        data={"name": "gold", "lease_seconds": "120", "gold_rate": "0.1", "csrf_token": csrf},
        follow_redirects=False,
    )
    assert resp.status_code == 303
    project = projects.resolve(db, "gold")
    assert (project.lease_seconds, project.gold_rate) == (120, 0.1)
