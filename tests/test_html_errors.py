"""Errors a browser sees are pages, with a way on; API clients keep their JSON.

What a browser opens itself (a link, the address bar, a form; Accept prefers text/html)
gets the app's error page for unknown addresses, wrong methods and bad parameters, also on
the export API that the export page's filter form submits to. curl, requests and TestClient
send ``*/*`` and get the JSON they always had. htmx polls whose session has ended are sent
to the login page whole (``HX-Redirect``), and the monitor page's gold form keeps what was
typed when it is refused.
"""

from __future__ import annotations

import re
import struct

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Project, Role, Task, User, utcnow
from app.services import judgments
from tests.factories import login, make_project, make_prompt, make_task, make_token, make_user

BROWSER = {
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
    "image/webp,*/*;q=0.8"
}
FIREFOX = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def links(html: str) -> dict[str, str]:
    """The error page's links, text by href."""
    block = html.split('<p class="links">', 1)[1].split("</p>", 1)[0]
    return {href: text for href, text in re.findall(r'<a href="([^"]*)">([^<]*)</a>', block)}


def is_page(resp) -> bool:  # type: ignore[no-untyped-def]
    return resp.headers["content-type"].startswith("text/html") and "<!doctype html>" in resp.text


def project_with_pair(db: Session, **fields) -> tuple[Project, Task]:  # type: ignore[no-untyped-def]
    project = make_project(db, **fields)
    prompt = make_prompt(db, project, ["first answer", "second answer"], text="Greet me.")
    return project, make_task(db, project, prompt)


# --- routing errors: 404 and 405 ------------------------------------------------------------


@pytest.mark.parametrize("headers", [BROWSER, FIREFOX])
def test_an_unknown_address_is_a_404_page_for_a_browser(client: TestClient, headers) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/nope", headers=headers)
    assert resp.status_code == 404 and is_page(resp)
    assert "There is no page at /nope." in resp.text
    assert links(resp.text) == {"/": "Home"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Accept": "*/*"},
        {"Accept": "application/json"},
        {"Accept": "text/html, application/json"},
    ],
)
def test_an_unknown_address_stays_json_for_api_clients(client: TestClient, headers) -> None:  # type: ignore[no-untyped-def]
    resp = client.get("/nope", headers=headers)
    assert resp.status_code == 404
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"detail": "Not Found"}


def test_api_404_is_a_page_only_for_a_browser_get(client: TestClient) -> None:
    assert is_page(client.get("/api/v1/nope", headers=BROWSER))
    assert client.post("/api/v1/nope", headers=BROWSER).json() == {"detail": "Not Found"}
    assert client.get("/api/v1/nope").json() == {"detail": "Not Found"}
    # A script's request (htmx, label.js) is no navigation, whatever it accepts.
    htmx = client.get("/nope", headers={**BROWSER, "HX-Request": "true"})
    assert htmx.json() == {"detail": "Not Found"}


def test_the_favicon_is_a_real_icon(client: TestClient) -> None:
    resp = client.get("/favicon.ico", headers={"Accept": "image/avif,image/webp,*/*;q=0.8"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/x-icon"
    reserved, kind, count = struct.unpack("<HHH", resp.content[:6])
    width, height, _, _, _, bpp, size, offset = struct.unpack("<BBBBHHII", resp.content[6:22])
    assert (reserved, kind, count, width, height, bpp) == (0, 1, 1, 16, 16, 32)
    assert offset == 22 and size == len(resp.content) - 22


@pytest.mark.parametrize(
    ("address", "back", "text"),
    [
        ("/projects/4/settings", "/projects/4", "Back to the project page"),
        ("/projects/7/prompts/upload", "/projects/7", "Back to the project page"),
        ("/projects/3/admin/gold", "/projects/3/admin", "Back to the monitor page"),
        ("/label/5/submit", "/label/5", "Go to the next task"),
        ("/users/9/active", "/users", "Back to the users"),
    ],
)
def test_opening_a_form_address_is_a_405_page_linking_to_the_form(
    client: TestClient, address: str, back: str, text: str
) -> None:
    resp = client.get(address, headers=BROWSER)
    assert resp.status_code == 405 and is_page(resp)
    assert resp.headers["allow"] == "POST"
    assert "cannot be opened or reloaded directly" in resp.text
    assert links(resp.text) == {back: text, "/": "Home"}
    api = client.get(address)
    assert api.status_code == 405 and api.json() == {"detail": "Method Not Allowed"}
    assert api.headers["allow"] == "POST"


# --- validation errors: 422 -----------------------------------------------------------------


def test_non_numeric_ids_and_params_are_a_422_page_in_words(
    client: TestClient, db: Session
) -> None:
    admin = make_user(db, Role.admin)
    login(client, admin.username)
    project = make_project(db)

    resp = client.get("/projects/abc", headers=BROWSER)
    assert resp.status_code == 422 and is_page(resp)
    assert "Some values in this request are not valid:" in resp.text
    assert (
        "<li>In the address, project_id is &#34;abc&#34;: input should be a valid integer"
        in resp.text
    )
    assert links(resp.text) == {"/projects": "Back to the projects", "/": "Home"}

    label = client.get("/label/abc", headers=BROWSER)
    assert label.status_code == 422 and "project_id is &#34;abc&#34;" in label.text
    assert links(label.text) == {"/label": "Back to the labeling queues", "/": "Home"}

    days = client.get(f"/projects/{project.id}/admin?days=abc", headers=BROWSER)
    assert days.status_code == 422 and is_page(days)
    assert "<li>The parameter days is &#34;abc&#34;: input should be a valid integer" in days.text
    assert links(days.text) == {f"/projects/{project.id}": "Back to the project page", "/": "Home"}

    too_many = client.get(f"/projects/{project.id}/admin?days=9999", headers=BROWSER)
    assert "The parameter days is &#34;9999&#34;: input should be less than or equal to 366" in (
        too_many.text
    )


def test_validation_errors_keep_their_json_for_api_clients(client: TestClient, db: Session) -> None:
    admin = make_user(db, Role.admin)
    login(client, admin.username)
    resp = client.get("/projects/abc")
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"] == "invalid_input" and body["detail"] == "invalid request"
    assert [(e["loc"], e["type"]) for e in body["errors"]] == [
        (["path", "project_id"], "int_parsing")
    ]
    token = make_token(db, admin)
    api = client.get("/api/v1/projects/1/monitor?days=abc", headers=token)
    assert api.status_code == 422
    assert [e["loc"] for e in api.json()["errors"]] == [["query", "days"]]


# --- the export API opened by the export page's filter form ---------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("annotator=nobody", "no user(s) named nobody"),
        ("since=2026-05-02&until=2026-05-01", "until"),
    ],
)
def test_export_filter_errors_are_json_for_clients_and_a_page_for_the_form(
    client: TestClient, db: Session, query: str, message: str
) -> None:
    project, _task = project_with_pair(db)
    admin = make_user(db, Role.admin)
    url = f"/api/v1/projects/{project.id}/export?shape=pairs&format=jsonl&{query}"

    api = client.get(url, headers=make_token(db, admin))
    assert api.status_code == 422 and api.headers["content-type"] == "application/json"
    assert api.json()["error"] == "invalid_input" and message in api.json()["detail"]

    login(client, admin.username)
    cookie_api = client.get(url)  # a script with the session cookie: still JSON
    assert cookie_api.json()["error"] == "invalid_input"

    page = client.get(url, headers=BROWSER)
    assert page.status_code == 422 and is_page(page)
    assert '<p class="error" role="alert">' in page.text and message in page.text
    assert "{&#34;error&#34;" not in page.text and '"error":' not in page.text
    assert links(page.text) == {
        f"/projects/{project.id}/export": "Back to the export page",
        "/": "Home",
    }


def test_a_logged_out_browser_opening_the_export_api_goes_to_login(
    client: TestClient, db: Session
) -> None:
    url = "/api/v1/projects/1/export?shape=pairs&format=jsonl"
    page = client.get(url, headers=BROWSER, follow_redirects=False)
    assert page.status_code == 303
    assert (
        page.headers["location"]
        == "/login?next=/api/v1/projects/1/export%3Fshape%3Dpairs%26format%3Djsonl"
    )
    assert client.get(url).status_code == 401  # API clients: the JSON 401 as before


# --- htmx polls after the session ended -----------------------------------------------------


def _poll(client: TestClient, path: str, current: str | None):  # type: ignore[no-untyped-def]
    headers = {"HX-Request": "true", "Accept": "*/*"}
    if current is not None:
        headers["HX-Current-URL"] = current
    return client.get(path, headers=headers, follow_redirects=False)


def test_an_htmx_poll_without_a_session_redirects_the_whole_page(
    client: TestClient, db: Session
) -> None:
    project = make_project(db)
    monitor = f"/projects/{project.id}/admin?days=7"
    resp = _poll(client, monitor, f"http://testserver{monitor}")
    assert resp.status_code == 401
    assert resp.headers["hx-redirect"] == f"/login?next=/projects/{project.id}/admin%3Fdays%3D7"
    assert resp.content == b"" and "location" not in resp.headers

    jobs = _poll(
        client, f"/projects/{project.id}/jobs", f"http://testserver/projects/{project.id}/jobs"
    )
    assert jobs.status_code == 401 and jobs.content == b""
    assert jobs.headers["hx-redirect"] == f"/login?next=/projects/{project.id}/jobs"

    # No HX-Current-URL: the polled address itself (here the page's own address).
    bare = _poll(client, monitor, None)
    assert bare.headers["hx-redirect"] == f"/login?next=/projects/{project.id}/admin%3Fdays%3D7"


@pytest.mark.parametrize(
    "current",
    [
        "https://evil.example//evil.example/x",
        "javascript:alert(1)",
        "http://testserver/\\evil.example",
    ],
)
def test_the_htmx_next_page_stays_on_this_site(
    client: TestClient, db: Session, current: str
) -> None:
    project = make_project(db)
    resp = _poll(client, f"/projects/{project.id}/admin", current)
    assert resp.headers["hx-redirect"] == f"/login?next=/projects/{project.id}/admin"


def test_an_htmx_poll_after_the_account_was_paused(client: TestClient, db: Session) -> None:
    admin = make_user(db, Role.admin)
    login(client, admin.username)
    project = make_project(db)
    page = f"http://testserver/projects/{project.id}/admin"
    assert _poll(client, f"/projects/{project.id}/admin", page).status_code == 200
    admin.active = False
    db.flush()
    resp = _poll(client, f"/projects/{project.id}/admin", page)
    assert resp.status_code == 401 and resp.content == b""
    assert resp.headers["hx-redirect"] == f"/login?next=/projects/{project.id}/admin"
    # Without htmx the page still answers with the ordinary redirect.
    plain = client.get(f"/projects/{project.id}/admin", follow_redirects=False)
    assert plain.status_code == 303 and plain.headers["location"].startswith("/login?next=")


# --- the monitor page's gold form -----------------------------------------------------------


def test_a_refused_gold_answer_re_renders_the_monitor_page_as_typed(
    client: TestClient, db: Session
) -> None:
    project, task = project_with_pair(db)
    admin = make_token(db, make_user(db, Role.admin))
    url = f"/projects/{project.id}/admin/gold"
    first, second = task.completion_ids

    bad = client.post(url, data={"task_id": str(task.id), "answer": "[1,"}, headers=admin)
    assert bad.status_code == 422 and is_page(bad)
    assert f"<h1>Monitor: {project.name}</h1>" in bad.text
    assert (
        '<p class="error" role="alert" id="gold-error">the answer must be a completion id'
        in bad.text
    )
    assert f'name="task_id" type="number" min="1" required value="{task.id}"' in bad.text
    assert 'name="answer" autocomplete="off" value="[1,"' in bad.text
    # The task's completions, with the ids an answer is written with.
    assert f"<td><code>{first}</code></td><td>first answer</td>" in bad.text
    assert f"<td><code>{second}</code></td><td>second answer</td>" in bad.text

    wrong = client.post(url, data={"task_id": str(task.id), "answer": "999999"}, headers=admin)
    assert wrong.status_code == 422
    assert f"completion 999999 is not in this task (it has [{first}, {second}])" in wrong.text
    assert 'value="999999"' in wrong.text and f"<code>{first}</code>" in wrong.text

    elsewhere = make_project(db)
    other = client.post(
        f"/projects/{elsewhere.id}/admin/gold",
        data={"task_id": str(task.id), "answer": "tie"},
        headers=admin,
    )
    assert other.status_code == 404
    assert f"no task {task.id} in project {elsewhere.id}" in other.text
    assert 'value="tie"' in other.text and f"<h1>Monitor: {elsewhere.name}</h1>" in other.text

    for typed in ("²", "0", str(2**63)):
        odd = client.post(url, data={"task_id": typed, "answer": "tie"}, headers=admin)
        assert odd.status_code == 422 and "the task id must be a whole number" in odd.text
    not_a_number = client.post(url, data={"task_id": "abc", "answer": "tie"}, headers=admin)
    assert (
        not_a_number.status_code == 422
        and "the task id must be a whole number" in not_a_number.text
    )

    db.refresh(task)
    assert not task.is_gold  # nothing was saved


def test_show_completions_lists_ids_and_saves_nothing(client: TestClient, db: Session) -> None:
    project, task = project_with_pair(db)
    admin = make_token(db, make_user(db, Role.admin))
    url = f"/projects/{project.id}/admin/gold"
    first, second = task.completion_ids
    shown = client.post(
        url, data={"task_id": str(task.id), "answer": "", "show": "1"}, headers=admin
    )
    assert shown.status_code == 200
    assert f"Task #{task.id} · prompt" in shown.text and "Greet me." in shown.text
    assert f"<td><code>{first}</code></td><td>first answer</td>" in shown.text
    assert f"<td><code>{second}</code></td><td>second answer</td>" in shown.text
    assert f"For example <code>{first}</code>" in shown.text and "<code>tie</code>." in shown.text
    db.refresh(task)
    assert not task.is_gold

    saved = client.post(url, data={"task_id": str(task.id), "answer": str(second)}, headers=admin)
    assert saved.status_code == 200  # followed to the monitor page
    db.refresh(task)
    assert task.gold_answer == [[second], [first]]

    missing = client.post(url, data={"task_id": "99999999", "show": "1"}, headers=admin)
    assert (
        missing.status_code == 404 and f"no task 99999999 in project {project.id}" in missing.text
    )


def test_the_gold_form_explains_the_answer_and_where_ids_are(
    client: TestClient, db: Session
) -> None:
    project, _task = project_with_pair(db)
    admin = make_token(db, make_user(db, Role.admin))
    html = client.get(f"/projects/{project.id}/admin", headers=admin).text
    form = html.split('id="gold-form"', 1)[1]
    assert "Show completions" in form and "<code>[12, [13, 14]]</code>" in form
    assert "Task column" in form


# --- labeling without JavaScript ------------------------------------------------------------


def test_a_refused_no_js_judgment_links_to_the_next_task(client: TestClient, db: Session) -> None:
    project, task = project_with_pair(db, judgments_per_task=1)
    other: User = make_user(db, Role.annotator)
    judgments.record(db, task.id, other, now=utcnow(), choice="tie")
    me = make_user(db, Role.annotator)
    csrf = login(client, me.username)
    resp = client.post(
        f"/label/{project.id}/submit",
        data={"task_id": str(task.id), "choice": str(task.completion_ids[0]), "csrf_token": csrf},
        headers=BROWSER,
        follow_redirects=False,
    )
    assert resp.status_code == 409 and is_page(resp)
    assert "please continue with the next task" in resp.text
    assert links(resp.text) == {f"/label/{project.id}": "Go to the next task", "/": "Home"}
    # label.js asks for JSON alongside HTML and still gets its JSON detail.
    js = client.post(
        f"/label/{project.id}/submit",
        data={"task_id": str(task.id), "choice": "tie"},
        headers={
            "HX-Request": "true",
            "X-CSRF-Token": csrf,
            "Accept": "text/html, application/json;q=0.9",
        },
    )
    assert js.status_code == 409 and "next task" in js.json()["detail"]
