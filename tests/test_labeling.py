"""The labeling API and the labeling page (plain form, no JavaScript), on both backends."""

from __future__ import annotations

import itertools
import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import (
    Judgment,
    Lease,
    Project,
    ProjectMode,
    Prompt,
    Role,
    Skip,
    Task,
    TaskState,
    User,
)
from app.services import users as users_service
from tests.factories import login, make_project, make_prompt, make_task, make_token, make_user

_names = itertools.count(1)


def token_user(db: Session, role: Role = Role.annotator) -> tuple[User, dict[str, str]]:
    """A token-only user (no argon2 hash to compute) and its Authorization header."""
    user = users_service.create(db, f"label-{role.value}{next(_names)}", role, None)
    return user, make_token(db, user)


def pairs_project(db: Session, n: int, **fields) -> tuple[Project, list[Task]]:  # type: ignore[no-untyped-def]
    project = make_project(db, **fields)
    made = [
        make_task(db, project, make_prompt(db, project, [f"left {i}", f"right {i}"]))
        for i in range(n)
    ]
    return project, made


def count(db: Session, model: type) -> int:
    return int(db.scalar(select(func.count()).select_from(model)) or 0)


def form_value(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no {name} field in the page"
    return match.group(1)


# --- JSON API ----------------------------------------------------------------------------


def test_api_flow_next_judge_next_then_204(client: TestClient, db: Session):
    project, made = pairs_project(db, 2, instructions="Prefer the shorter one.")
    user, auth = token_user(db)
    seen = []
    for _ in made:
        resp = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"task_id", "lease_expires_at", "prompt", "candidates", "instructions"}
        assert body["instructions"] == "Prefer the shorter one."
        assert body["prompt"]["text"] == "Say hello." and body["prompt"]["messages"] is None
        db.expire_all()  # SQLite reuses the deleted lease's id; don't read a stale object
        task = db.get(Task, body["task_id"])
        lease = db.scalar(select(Lease).where(Lease.task_id == task.id))
        assert [c["id"] for c in body["candidates"]] == lease.display_order
        assert sorted(c["id"] for c in body["candidates"]) == sorted(task.completion_ids)
        winner = body["candidates"][1]["id"]
        judged = client.post(
            f"/api/v1/tasks/{task.id}/judgments",
            json={"choice": winner, "strength": 3, "rationale": "short", "time_spent_ms": 900},
            headers=auth,
        )
        assert judged.status_code == 201, judged.text
        out = judged.json()
        assert out["ranking"][0] == [winner] and out["strength"] == 3
        assert out["display_order"] == lease.display_order and out["user_id"] == user.id
        seen.append(task.id)
    assert sorted(seen) == sorted(t.id for t in made)
    done = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth)
    assert done.status_code == 204 and done.content == b""
    db.expire_all()
    assert all(db.get(Task, t.id).state is TaskState.done for t in made)


def test_api_next_and_submit_statements(client, db, connection, backend):  # type: ignore[no-untyped-def]
    """The hot path's SQL, pinned: `next` is auth plus the claim's seven statements, a
    judgment is auth plus five (lock, earlier judgments, take the lease, insert, bump)."""
    from sqlalchemy import event

    project, _ = pairs_project(db, 3)
    _, auth = token_user(db)
    sent: list[str] = []

    def record(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if not statement.lstrip().upper().startswith(("SAVEPOINT", "RELEASE", "ROLLBACK TO")):
            sent.append(" ".join(statement.split()).lower())

    event.listen(connection, "before_cursor_execute", record)
    client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth)  # touches the token
    sent.clear()
    resp = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth)  # held lease
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    sent.clear()
    judged = client.post(
        f"/api/v1/tasks/{body['task_id']}/judgments",
        json={"choice": body["candidates"][0]["id"], "client_key": "pinned"},
        headers=auth,
    )
    assert judged.status_code == 201, judged.text
    assert [s.split()[0] for s in sent] == [
        "select",
        "select",
        "select",
        "delete",
        "insert",
        "update",
    ]
    assert "join api_tokens" in sent[0] and "from tasks where tasks.id" in sent[1]
    assert ("for update" in sent[1]) == (backend == "postgres")  # SQLite: BEGIN IMMEDIATE
    assert judged.json()["client_key"] == "pinned"
    assert judged.json()["created_at"].endswith(("Z", "+00:00"))

    sent.clear()
    resp = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth)
    assert resp.status_code == 200
    assert len(sent) == 8 and "join api_tokens" in sent[0]
    assert resp.json()["lease_expires_at"].endswith(("Z", "+00:00"))


def test_api_next_on_an_empty_project_is_204_and_missing_project_404(client, db):
    project = make_project(db)
    _, auth = token_user(db)
    assert client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth).status_code == 204
    missing = client.get("/api/v1/projects/999999/tasks/next", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_api_chat_prompt_comes_back_as_messages(client, db):
    project = make_project(db)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt = make_prompt(db, project, ["a", "b"], text=None, messages=messages)
    make_task(db, project, prompt)
    _, auth = token_user(db)
    body = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth).json()
    assert body["prompt"]["messages"] == messages and body["prompt"]["text"] is None


def test_api_reload_returns_the_same_task(client, db):
    project, _ = pairs_project(db, 3)
    _, auth = token_user(db)
    url = f"/api/v1/projects/{project.id}/tasks/next"
    first, second = client.get(url, headers=auth).json(), client.get(url, headers=auth).json()
    assert first == second
    assert count(db, Lease) == 1


def test_api_two_annotators_never_get_the_same_task(client, db):
    project, (only,) = pairs_project(db, 1)
    _, alice = token_user(db)
    _, bob = token_user(db)
    url = f"/api/v1/projects/{project.id}/tasks/next"
    assert client.get(url, headers=alice).json()["task_id"] == only.id
    assert client.get(url, headers=bob).status_code == 204


def test_api_same_client_key_twice_stores_one_judgment(client, db):
    project, (task,) = pairs_project(db, 1)
    _, auth = token_user(db)
    client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth)
    body = {"choice": "tie", "client_key": "form-123"}
    first = client.post(f"/api/v1/tasks/{task.id}/judgments", json=body, headers=auth)
    second = client.post(f"/api/v1/tasks/{task.id}/judgments", json=body, headers=auth)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json() == second.json()
    db.refresh(task)
    assert count(db, Judgment) == 1 and task.judgment_count == 1


def test_api_client_key_reused_by_another_user_is_409(client, db):
    project, (task,) = pairs_project(db, 1, judgments_per_task=2)
    _, alice = token_user(db)
    _, bob = token_user(db)
    body = {"choice": "both_bad", "client_key": "k"}
    assert (
        client.post(f"/api/v1/tasks/{task.id}/judgments", json=body, headers=alice).status_code
        == 201
    )
    resp = client.post(f"/api/v1/tasks/{task.id}/judgments", json=body, headers=bob)
    assert resp.status_code == 409 and resp.json()["error"] == "conflict"
    assert count(db, Judgment) == 1


def test_api_judging_twice_with_new_key_is_409_already_judged(client, db):
    project, (task,) = pairs_project(db, 1, judgments_per_task=2)
    _, auth = token_user(db)
    url = f"/api/v1/tasks/{task.id}/judgments"
    assert client.post(url, json={"choice": "tie"}, headers=auth).status_code == 201
    again = client.post(url, json={"choice": "tie"}, headers=auth)
    assert again.status_code == 409 and again.json()["error"] == "already_judged"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"choice": 987654321}, "choice must be one of"),
        ({"choice": "left"}, "choice"),
        ({"ranking": [987654321, 987654320]}, "exactly this task's candidates"),
        ({"ranking": [[]]}, "empty"),
        ({}, "exactly one of"),
        ({"choice": "tie", "strength": 7}, "strength"),
        ({"choice": True}, "choice"),
    ],
)
def test_api_invalid_verdicts_are_422_with_a_message(client, db, body, needle):
    project, (task,) = pairs_project(db, 1)
    _, auth = token_user(db)
    resp = client.post(f"/api/v1/tasks/{task.id}/judgments", json=body, headers=auth)
    assert resp.status_code == 422, resp.text
    assert needle in resp.text
    assert count(db, Judgment) == 0


def test_api_tie_ranking_is_stored_as_one_group(client, db):
    project, (task,) = pairs_project(db, 1)
    _, auth = token_user(db)
    a, b = task.completion_ids
    resp = client.post(
        f"/api/v1/tasks/{task.id}/judgments", json={"ranking": [[b, a]]}, headers=auth
    )
    assert resp.status_code == 201 and resp.json()["ranking"] == [sorted([a, b])]


def test_api_heartbeat_and_skip(client, db):
    project = make_project(db)
    prompts = [make_prompt(db, project, ["a", "b"]) for _ in range(2)]
    for p in prompts:
        make_task(db, project, p)
    user, auth = token_user(db)
    url = f"/api/v1/projects/{project.id}/tasks/next"
    first = client.get(url, headers=auth).json()
    beat = client.post(f"/api/v1/tasks/{first['task_id']}/heartbeat", headers=auth)
    assert beat.status_code == 200 and beat.json()["lease_expires_at"] >= first["lease_expires_at"]
    skipped = client.post(f"/api/v1/tasks/{first['task_id']}/skip", headers=auth)
    assert skipped.status_code == 204
    skip = db.scalar(select(Skip))
    assert skip.user_id == user.id and skip.prompt_id == first["prompt"]["id"]
    second = client.get(url, headers=auth).json()
    assert second["task_id"] != first["task_id"]
    gone = client.post(f"/api/v1/tasks/{first['task_id']}/heartbeat", headers=auth)
    assert gone.status_code == 409 and gone.json()["error"] == "lease_expired"


def test_api_late_judgment_after_someone_else_filled_the_slot_is_409(client, db):
    project, (task,) = pairs_project(db, 1)
    _, alice = token_user(db)
    _, bob = token_user(db)
    url = f"/api/v1/tasks/{task.id}/judgments"
    assert client.post(url, json={"choice": "tie"}, headers=bob).status_code == 201
    resp = client.post(url, json={"choice": "tie"}, headers=alice)
    assert resp.status_code == 409 and resp.json()["error"] == "lease_expired"
    assert "not stored" in resp.json()["detail"]
    assert "(it has all the judgments it needs)" in resp.json()["detail"]


def test_api_unclaimed_judgment_while_another_holds_the_last_slot_is_409(client, db):
    """alice judges a task she never claimed while bob holds its only slot: refused, and the
    message says why (not that her lease ran out: she had none)."""
    project, (task,) = pairs_project(db, 1)
    _, alice = token_user(db)
    _, bob = token_user(db)
    claimed = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=bob).json()
    assert claimed["task_id"] == task.id
    resp = client.post(f"/api/v1/tasks/{task.id}/judgments", json={"choice": "tie"}, headers=alice)
    assert resp.status_code == 409 and resp.json()["error"] == "lease_expired"
    assert "others hold its remaining slots and you had not claimed it" in resp.json()["detail"]
    bobs = client.post(f"/api/v1/tasks/{task.id}/judgments", json={"choice": "tie"}, headers=bob)
    assert bobs.status_code == 201


def _labeling_calls(project_id: int, task_id: int) -> list[tuple[str, str, dict]]:
    return [
        ("GET", f"/api/v1/projects/{project_id}/tasks/next", {}),
        ("POST", f"/api/v1/tasks/{task_id}/heartbeat", {}),
        ("POST", f"/api/v1/tasks/{task_id}/skip", {}),
        ("POST", f"/api/v1/tasks/{task_id}/judgments", {"json": {"choice": "tie"}}),
        ("GET", "/label", {}),
        ("GET", f"/label/{project_id}", {}),
    ]


def test_researchers_get_403_everywhere_in_labeling(client, db):
    project, (task,) = pairs_project(db, 1)
    _, auth = token_user(db, Role.researcher)
    for method, url, kw in _labeling_calls(project.id, task.id):
        resp = client.request(method, url, headers={**auth, "Accept": "application/json"}, **kw)
        assert resp.status_code == 403, (method, url, resp.status_code)
        assert resp.json()["error"] == "forbidden"
    assert count(db, Lease) == count(db, Judgment) == count(db, Skip) == 0


def test_unauthenticated_requests_get_401(client, db):
    project, (task,) = pairs_project(db, 1)
    bogus = {"Authorization": "Bearer pfl_not-a-token", "Accept": "application/json"}
    for method, url, kw in _labeling_calls(project.id, task.id):
        if method == "GET":
            resp = client.request(method, url, headers={"Accept": "application/json"}, **kw)
            assert resp.status_code == 401, (method, url, resp.status_code)
        resp = client.request(method, url, headers=bogus, **kw)
        assert resp.status_code == 401, (method, url, resp.status_code)
        assert resp.json()["error"] == "not_authenticated"


def test_unsafe_request_with_no_credentials_is_401(client, db):
    project, (task,) = pairs_project(db, 1)
    resp = client.post(f"/api/v1/tasks/{task.id}/judgments", json={"choice": "tie"})
    assert resp.status_code == 401


def test_admins_may_label(client, db):
    project, (task,) = pairs_project(db, 1)
    _, auth = token_user(db, Role.admin)
    assert client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth).status_code == 200


def test_cookie_session_api_post_needs_the_csrf_header(client, db):
    project, _ = pairs_project(db, 1)
    user = make_user(db)
    csrf = login(client, user.username)
    task_id = client.get(f"/api/v1/projects/{project.id}/tasks/next").json()["task_id"]
    assert client.post(f"/api/v1/tasks/{task_id}/heartbeat").status_code == 403
    ok = client.post(f"/api/v1/tasks/{task_id}/heartbeat", headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200


# --- the labeling page, without JavaScript -----------------------------------------------


def test_label_index_lists_projects_with_open_counts(client, db):
    project, _ = pairs_project(db, 3, name="Helpfulness round 1")
    user = make_user(db)
    login(client, user.username)
    page = client.get("/label")
    assert page.status_code == 200
    row = re.search(r"Helpfulness round 1</td>.*?</tr>", page.text, re.S)
    assert row and "<td>3</td>" in row.group(0) and f'href="/label/{project.id}"' in row.group(0)


def test_label_page_escapes_completions_and_the_form_flow_works(client, db):
    project = make_project(db, instructions="Pick the <em>safer</em> one.")
    evil = "<script>alert(1)</script>\n    indented & kept"
    prompt = make_prompt(db, project, [evil, "plain answer"], text="Write <b>HTML</b>?")
    task = make_task(db, project, prompt)
    user = make_user(db)
    login(client, user.username)

    page = client.get(f"/label/{project.id}")
    assert page.status_code == 200
    html = page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\n    indented &amp; kept" in html
    assert "<script>alert(1)</script>" not in html
    assert "Write &lt;b&gt;HTML&lt;/b&gt;?" in html
    assert "Pick the &lt;em&gt;safer&lt;/em&gt; one." in html
    assert '<script src="/static/label.js" defer></script>' in html
    assert "You have judged 0 tasks here · 1 task open" in html
    assert int(form_value(html, "task_id")) == task.id

    lease = db.scalar(select(Lease).where(Lease.task_id == task.id))
    left, right = lease.display_order
    a_block = html.split('id="candidate-A"', 1)[1].split("</article>", 1)[0]
    assert (evil.replace("<", "&lt;").replace(">", "&gt;").replace("& ", "&amp; ") in a_block) == (
        left == prompt.completions[0].id
    )
    form = {
        "csrf_token": form_value(html, "csrf_token"),
        "task_id": form_value(html, "task_id"),
        "client_key": form_value(html, "client_key"),
        "time_started": form_value(html, "time_started"),
        "choice": str(right),
        "rationale": "B is safe",
    }
    first = client.post(f"/label/{project.id}/submit", data=form, follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == f"/label/{project.id}"
    second = client.post(f"/label/{project.id}/submit", data=form, follow_redirects=False)
    assert second.status_code == 303  # a resent form just continues
    stored = db.scalars(select(Judgment)).all()
    assert len(stored) == 1
    assert stored[0].ranking == [[right], [left]] and stored[0].rationale == "B is safe"
    assert stored[0].display_order == [left, right] and stored[0].time_spent_ms is not None

    done = client.get(f"/label/{project.id}")
    assert "All done" in done.text and "You have judged 1 task here" in done.text


def test_label_page_renders_chat_messages_as_a_conversation(client, db):
    project = make_project(db)
    messages = [
        {"role": "system", "content": "Be <terse>."},
        {"role": "user", "content": "Hi\n  there"},
    ]
    make_task(db, project, make_prompt(db, project, ["a", "b"], text=None, messages=messages))
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    assert html.count('<div class="msg msg-') == 2
    assert (
        '<div class="role">system</div><pre class="prompt" dir="auto">Be &lt;terse&gt;.</pre>'
        in html
    )
    assert "Hi\n  there" in html


def test_label_form_without_csrf_is_403_and_without_choice_is_422(client, db):
    project, (task,) = pairs_project(db, 1)
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    form = {"task_id": str(task.id), "choice": "tie", "client_key": "x"}
    assert client.post(f"/label/{project.id}/submit", data=form).status_code == 403
    form["csrf_token"] = form_value(html, "csrf_token")
    del form["choice"]
    missing = client.post(
        f"/label/{project.id}/submit", data=form, headers={"Accept": "application/json"}
    )
    assert missing.status_code == 422 and "choose A, B, Tie or Both bad" in missing.text
    assert count(db, Judgment) == 0


def test_html_error_page_for_a_logged_in_annotator(client, db):
    project, (task,) = pairs_project(db, 1)
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    form = {"csrf_token": form_value(html, "csrf_token"), "task_id": str(task.id)}
    resp = client.post(f"/label/{project.id}/submit", data=form)
    assert resp.status_code == 422 and "choose A, B, Tie or Both bad" in resp.text


def test_label_form_tie_and_both_bad(client, db):
    project, made = pairs_project(db, 2)
    login(client, make_user(db).username)
    for choice in ("tie", "both_bad"):
        html = client.get(f"/label/{project.id}").text
        form = {
            "csrf_token": form_value(html, "csrf_token"),
            "task_id": form_value(html, "task_id"),
            "client_key": form_value(html, "client_key"),
            "choice": choice,
        }
        assert (
            client.post(
                f"/label/{project.id}/submit", data=form, follow_redirects=False
            ).status_code
            == 303
        )
    rows = db.scalars(select(Judgment).order_by(Judgment.id)).all()
    assert [r.none_acceptable for r in rows] == [False, True]
    assert all(len(r.ranking) == 1 and len(r.ranking[0]) == 2 for r in rows)
    assert made


def test_label_skip_form(client, db):
    project, made = pairs_project(db, 2)
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    first = int(form_value(html, "task_id"))
    resp = client.post(
        f"/label/{project.id}/skip",
        data={"csrf_token": form_value(html, "csrf_token"), "task_id": str(first)},
        follow_redirects=False,
    )
    assert resp.status_code == 303
    nxt = client.get(f"/label/{project.id}").text
    assert int(form_value(nxt, "task_id")) != first
    assert count(db, Skip) == 1 and made


def test_label_pages_redirect_anonymous_browsers_to_login(client, db):
    project, _ = pairs_project(db, 1)
    resp = client.get(f"/label/{project.id}", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/login?next=")


def test_label_reload_shows_the_same_task(client, db):
    project, _ = pairs_project(db, 3)
    login(client, make_user(db).username)
    one = client.get(f"/label/{project.id}").text
    two = client.get(f"/label/{project.id}").text
    assert form_value(one, "task_id") == form_value(two, "task_id")
    assert form_value(one, "client_key") != form_value(two, "client_key")
    assert count(db, Lease) == 1 and count(db, Prompt) == 3


# --- ranking, strength, the one-round-trip swap, progress --------------------------------


def ranking_project(db: Session, n: int, k: int = 4, **fields) -> tuple[Project, list[Task]]:  # type: ignore[no-untyped-def]
    project = make_project(db, mode=ProjectMode.ranking, candidates_per_task=k, **fields)
    made = [
        make_task(db, project, make_prompt(db, project, [f"answer {i}.{j}" for j in range(k)]))
        for i in range(n)
    ]
    return project, made


def rank_options(html: str) -> dict[str, list[str]]:
    """The rank select of each item on the page: label -> option values."""
    items = re.findall(r'<li class="rank-item" id="item-(\w)".*?</select>', html, re.S)
    blocks = re.findall(r'<li class="rank-item".*?</select>', html, re.S)
    return {
        label: re.findall(r'<option value="([^"]*)"', block)
        for label, block in zip(items, blocks, strict=True)
    }


def test_ranking_page_without_javascript_has_a_rank_select_per_item(client, db):
    project, (task,) = ranking_project(db, 1, k=4)
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    assert 'data-mode="ranking"' in html and 'name="none_acceptable"' in html
    options = rank_options(html)
    assert sorted(options) == ["A", "B", "C", "D"]
    lease = db.scalar(select(Lease).where(Lease.task_id == task.id))
    for label, cid in zip("ABCD", lease.display_order, strict=True):
        assert options[label] == [""] + [f"{cid}:{n}" for n in range(1, 5)]
    assert "answers, best first" in html.lower()


def test_ranking_form_with_ties_and_none_acceptable(client, db):
    project, (task,) = ranking_project(db, 1, k=4)
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    a, b, c, d = db.scalar(select(Lease).where(Lease.task_id == task.id)).display_order
    form = {
        "csrf_token": form_value(html, "csrf_token"),
        "task_id": str(task.id),
        "client_key": form_value(html, "client_key"),
        "rank": [f"{a}:3", f"{b}:1", f"{c}:3", f"{d}:2"],  # c and a tie for third
        "none_acceptable": "true",
        "rationale": "B is best",
        "time_spent_ms": "4321",
    }
    resp = client.post(f"/label/{project.id}/submit", data=form, follow_redirects=False)
    assert resp.status_code == 303, resp.text
    (stored,) = db.scalars(select(Judgment)).all()
    assert stored.ranking == [[b], [d], sorted([a, c])]
    assert stored.none_acceptable and stored.time_spent_ms == 4321
    assert stored.display_order == [a, b, c, d] and stored.rationale == "B is best"


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        (["first:1"], "bad rank value"),
        ([""], "give every answer a rank"),
    ],
)
def test_ranking_form_rejects_missing_or_bad_ranks(client, db, ranks, message):
    project, (task,) = ranking_project(db, 1, k=3)
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    a, b, _ = db.scalar(select(Lease).where(Lease.task_id == task.id)).display_order
    form = {
        "csrf_token": form_value(html, "csrf_token"),
        "task_id": str(task.id),
        "rank": [f"{a}:1", f"{b}:2", *ranks],
    }
    resp = client.post(
        f"/label/{project.id}/submit", data=form, headers={"Accept": "application/json"}
    )
    assert resp.status_code == 422 and message in resp.json()["detail"]
    assert count(db, Judgment) == 0


def test_pair_form_strength_is_kept_for_a_winner_and_dropped_for_a_tie(client, db):
    project, made = pairs_project(db, 2)
    login(client, make_user(db).username)
    for choice, strength in (("winner", "3"), ("tie", "2")):
        html = client.get(f"/label/{project.id}").text
        assert 'name="strength" value="3" data-key="e"' in html
        task_id = int(form_value(html, "task_id"))
        winner = db.scalar(select(Lease).where(Lease.task_id == task_id)).display_order[0]
        form = {
            "csrf_token": form_value(html, "csrf_token"),
            "task_id": str(task_id),
            "choice": str(winner) if choice == "winner" else "tie",
            "strength": strength,
        }
        client.post(f"/label/{project.id}/submit", data=form, follow_redirects=False)
    rows = db.scalars(select(Judgment).order_by(Judgment.id)).all()
    assert [r.strength for r in rows] == [3, None] and made


def test_htmx_submit_answers_with_the_next_task_block(client, db):
    project, made = pairs_project(db, 3)
    user = make_user(db)
    csrf = login(client, user.username)
    html = client.get(f"/label/{project.id}").text
    first = int(form_value(html, "task_id"))
    form = {
        "task_id": str(first),
        "choice": "tie",
        "client_key": form_value(html, "client_key"),
        "time_started": form_value(html, "time_started"),
        "time_spent_ms": "2500",
    }
    headers = {"HX-Request": "true", "X-CSRF-Token": csrf}
    swap = client.post(f"/label/{project.id}/submit", data=form, headers=headers)
    assert swap.status_code == 200
    block = swap.text
    assert "<html" not in block and '<div id="label-root">' in block
    second = int(form_value(block, "task_id"))
    assert second != first and second in {t.id for t in made}
    assert "You have judged 1 task here · 2 tasks open" in block
    assert re.search(r'id="project-progress" max="3" value="1"', block)
    assert re.search(r'id="user-progress" max="3" value="1"', block)
    (stored,) = db.scalars(select(Judgment)).all()
    assert stored.task_id == first and stored.time_spent_ms == 2500
    leased = db.scalars(select(Lease.task_id).where(Lease.user_id == user.id)).all()
    assert leased == [second]  # the next task was leased in the same request

    again = client.post(f"/label/{project.id}/submit", data=form, headers=headers)
    assert again.status_code == 200 and int(form_value(again.text, "task_id")) == second
    assert count(db, Judgment) == 1  # a resent request stores nothing twice

    skipped = client.post(
        f"/label/{project.id}/skip", data={"task_id": str(second)}, headers=headers
    )
    assert skipped.status_code == 200 and "<html" not in skipped.text
    third = int(form_value(skipped.text, "task_id"))
    assert third not in (first, second)


def test_htmx_submit_of_the_last_task_answers_with_the_done_block(client, db):
    project, (task,) = pairs_project(db, 1)
    csrf = login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    form = {"task_id": str(task.id), "choice": "both_bad"}
    done = client.post(
        f"/label/{project.id}/submit",
        data=form,
        headers={"HX-Request": "true", "X-CSRF-Token": csrf},
    )
    assert done.status_code == 200 and 'id="all-done"' in done.text and "<html" not in done.text
    assert re.search(r'id="project-progress" max="1" value="1"', done.text)
    assert html


def test_htmx_submit_on_a_lost_lease_is_409_json(client, db):
    project, (task,) = pairs_project(db, 1)
    csrf = login(client, make_user(db).username)
    client.get(f"/label/{project.id}")
    lease = db.scalar(select(Lease).where(Lease.task_id == task.id))
    lease.expires_at = lease.created_at - timedelta(seconds=1)  # it ran out
    db.flush()
    _, other = token_user(db)
    assert (
        client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=other).json()["task_id"]
        == task.id
    )
    judged = client.post(
        f"/api/v1/tasks/{task.id}/judgments", json={"choice": "tie"}, headers=other
    )
    assert judged.status_code == 201
    resp = client.post(
        f"/label/{project.id}/submit",
        data={"task_id": str(task.id), "choice": "tie"},
        headers={
            "HX-Request": "true",
            "X-CSRF-Token": csrf,
            "Accept": "text/html, application/json;q=0.9",
        },
    )
    assert resp.status_code == 409 and resp.json()["error"] == "lease_expired"
    assert "not stored" in resp.json()["detail"] and count(db, Judgment) == 1


def test_code_fences_and_line_breaks_are_kept_and_escaped(client, db):
    project = make_project(db)
    code = "Try this:\n```python\nif a < b:\n    print('<ok>')\n```\ndone"
    make_task(db, project, make_prompt(db, project, [code, "plain"]))
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    assert (
        '<span class="fence">```</span><code class="code-block">python\nif a &lt; b:\n'
        '    print(&#39;&lt;ok&gt;&#39;)\n</code><span class="fence">```</span>\ndone'
    ) in html
    assert "<ok>" not in html


def test_progress_counts_leave_gold_and_retired_tasks_out(client, db):
    project, made = pairs_project(db, 3)
    made[0].state = TaskState.retired
    made[1].is_gold = True
    db.flush()
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    assert re.search(r'id="project-progress" max="1" value="0"', html)
    assert "1 task open" in html


def test_api_ranking_with_ties_and_none_acceptable(client, db):
    project, (task,) = ranking_project(db, 1, k=3)
    _, auth = token_user(db)
    body = client.get(f"/api/v1/projects/{project.id}/tasks/next", headers=auth).json()
    a, b, c = (x["id"] for x in body["candidates"])
    resp = client.post(
        f"/api/v1/tasks/{task.id}/judgments",
        json={"ranking": [c, [b, a]], "none_acceptable": True, "client_key": "r1"},
        headers=auth,
    )
    assert resp.status_code == 201, resp.text
    out = resp.json()
    assert out["ranking"] == [[c], sorted([a, b])] and out["none_acceptable"] is True
    assert out["display_order"] == [a, b, c]
    again = client.post(
        f"/api/v1/tasks/{task.id}/judgments",
        json={"ranking": [c, [b, a]], "client_key": "r1"},
        headers=auth,
    )
    assert again.status_code == 200 and again.json()["id"] == out["id"]


def test_the_app_gives_every_in_flight_request_a_thread(client):
    """Fewer threads than in-flight requests let requests hold pooled DB connections while
    queueing for a thread, which deadlocked 200 annotators at once (bench/annotate.py)."""
    import anyio.to_thread

    from app.main import REQUEST_THREADS

    tokens = client.portal.call(
        lambda: anyio.to_thread.current_default_thread_limiter().total_tokens
    )
    assert tokens >= REQUEST_THREADS >= 200


@pytest.mark.parametrize(("lease_seconds", "beat"), [(300, 60), (120, 40), (10, 3), (2, 1)])
def test_the_label_page_beats_at_least_three_times_per_lease(client, db, lease_seconds, beat):
    """The page's heartbeat interval: the configured 60 s, but a third of a shorter lease, so
    the lease of an annotator who has the page open never runs out."""
    project = make_project(db, lease_seconds=lease_seconds)
    make_task(db, project, make_prompt(db, project, ["a", "b"]))
    login(client, make_user(db).username)
    html = client.get(f"/label/{project.id}").text
    assert f'data-heartbeat-s="{beat}"' in html
