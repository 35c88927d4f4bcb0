"""Login, logout, sessions, API tokens, CSRF, and the role matrix."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.models import Role
from app.settings import Settings
from tests.factories import PASSWORD, login, make_token, make_user


def test_login_sets_httponly_signed_cookie_and_logout_clears_it(client, db):
    user = make_user(db, Role.admin)
    page = client.get("/login")
    csrf = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    resp = client.post(
        "/login",
        data={"username": user.username, "password": PASSWORD, "csrf_token": csrf},
        follow_redirects=False,
    )
    assert resp.status_code == 303
    cookie = resp.headers["set-cookie"].lower()
    assert "prefloop_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    assert client.get("/api/v1/me").json()["username"] == user.username

    assert (
        client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    )
    assert client.get("/api/v1/me").status_code == 401


def test_wrong_password_and_unknown_user_get_the_same_answer(client, db):
    user = make_user(db)
    page = client.get("/login")
    csrf = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    wrong = client.post(
        "/login", data={"username": user.username, "password": "nope-nope", "csrf_token": csrf}
    )
    unknown = client.post(
        "/login", data={"username": "ghost", "password": "nope-nope", "csrf_token": csrf}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert (
        "wrong username or password" in wrong.text and "wrong username or password" in unknown.text
    )
    assert client.get("/api/v1/me").status_code == 401


def test_a_paused_user_is_told_only_after_the_right_password(client, db):
    user = make_user(db)
    user.active = False
    db.flush()
    page = client.get("/login")
    csrf = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    wrong = client.post(
        "/login", data={"username": user.username, "password": "nope-nope", "csrf_token": csrf}
    )
    assert wrong.status_code == 401 and "wrong username or password" in wrong.text
    right = client.post(
        "/login", data={"username": user.username, "password": PASSWORD, "csrf_token": csrf}
    )
    assert right.status_code == 401 and "this account is paused" in right.text
    assert client.get("/api/v1/me").status_code == 401


def test_login_form_without_csrf_token_is_refused(client, db):
    user = make_user(db)
    client.get("/login")
    resp = client.post("/login", data={"username": user.username, "password": PASSWORD})
    assert resp.status_code == 403
    assert "CSRF" in resp.text


def test_cookie_authenticated_post_needs_the_csrf_header(client, db):
    user = make_user(db)
    csrf = login(client, user.username)
    assert client.post("/api/v1/tokens", json={"name": "x"}).status_code == 403
    assert (
        client.post(
            "/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": "forged"}
        ).status_code
        == 403
    )
    ok = client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201 and ok.json()["token"].startswith("pfl_")


def test_logout_without_csrf_is_refused(client, db):
    user = make_user(db)
    login(client, user.username)
    assert client.post("/logout", follow_redirects=False).status_code == 403
    assert client.get("/api/v1/me").status_code == 200


def test_bearer_token_works_is_stored_hashed_and_needs_no_csrf(client, db):
    from sqlalchemy import select

    from app.models import ApiToken

    user = make_user(db, Role.researcher)
    headers = make_token(db, user)
    token = headers["Authorization"].split()[1]
    stored = db.scalars(select(ApiToken.token_hash)).all()
    assert token not in stored and len(stored[0]) == 64
    assert client.get("/api/v1/me", headers=headers).json()["role"] == "researcher"
    assert client.post("/api/v1/tokens", json={"name": "n"}, headers=headers).status_code == 201


def test_revoked_token_and_paused_user_are_refused(client, db):
    from sqlalchemy import select

    from app.models import ApiToken
    from app.services import users

    user = make_user(db)
    headers = make_token(db, user)
    users.set_active(db, user.id, False)
    db.flush()
    assert client.get("/api/v1/me", headers=headers).status_code == 401
    users.set_active(db, user.id, True)
    users.revoke_token(db, db.scalars(select(ApiToken.id)).one())
    db.flush()
    resp = client.get("/api/v1/me", headers=headers)
    assert resp.status_code == 401 and resp.json()["error"] == "not_authenticated"


def _statements(connection):  # type: ignore[no-untyped-def]
    """Record the SQL the app sends on `connection` (the test's, shared with the app)."""
    from sqlalchemy import event

    sent: list[str] = []

    def record(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        sent.append(" ".join(statement.split()).lower())

    event.listen(connection, "before_cursor_execute", record)
    return sent


def test_token_auth_is_one_statement_and_touches_last_used_at_once_a_minute(client, db, connection):
    from datetime import timedelta

    from sqlalchemy import select

    from app.models import ApiToken, utcnow
    from app.services import users

    user = make_user(db, Role.researcher)
    headers = make_token(db, user)
    sent = _statements(connection)
    assert client.get("/api/v1/me", headers=headers).json()["id"] == user.id
    auth = [s for s in sent if "api_tokens" in s or "from users" in s]
    assert len(auth) == 2 and auth[0].startswith("select") and "join api_tokens" in auth[0]
    assert auth[1].startswith("update api_tokens")  # first use: last_used_at written
    first = db.scalar(select(ApiToken.last_used_at))
    assert first is not None and abs((utcnow() - first).total_seconds()) < 60

    sent.clear()
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    auth = [s for s in sent if "api_tokens" in s or "from users" in s]
    assert len(auth) == 1 and auth[0].startswith("select")  # within the minute: no write
    db.expire_all()
    assert db.scalar(select(ApiToken.last_used_at)) == first

    token = headers["Authorization"].split()[1]
    assert users.user_for_token(db, token, now=first + timedelta(seconds=59)).id == user.id
    db.expire_all()
    assert db.scalar(select(ApiToken.last_used_at)) == first
    later = first + users.TOKEN_TOUCH_INTERVAL
    assert users.user_for_token(db, token, now=later).id == user.id
    db.expire_all()
    assert db.scalar(select(ApiToken.last_used_at)) == later


def test_token_needs_touch():
    from datetime import UTC, datetime, timedelta

    from app.services.users import token_needs_touch

    t = datetime(2026, 1, 1, tzinfo=UTC)
    assert token_needs_touch(None, t)
    assert not token_needs_touch(t, t + timedelta(seconds=59.9))
    assert token_needs_touch(t, t + timedelta(seconds=60))


def test_cookie_session_auth_is_one_statement(client, db, connection):
    user = make_user(db, Role.annotator)
    login(client, user.username)
    sent = _statements(connection)
    assert client.get("/api/v1/me").json()["username"] == user.username
    assert [s for s in sent if "users" in s or "api_tokens" in s] == [
        next(s for s in sent if "from users" in s)
    ]


def test_pages_redirect_to_login_and_api_answers_401(client):
    page = client.get("/projects", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/login?next=")
    api = client.get("/api/v1/projects")
    assert api.status_code == 401 and api.json()["error"] == "not_authenticated"


def test_login_redirect_target_must_be_local(client, db):
    user = make_user(db)
    page = client.get("/login?next=https://evil.example/")
    assert 'name="next" value="/"' in page.text
    csrf = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    resp = client.post(
        "/login",
        data={
            "username": user.username,
            "password": PASSWORD,
            "csrf_token": csrf,
            "next": "//evil.example",
        },
        follow_redirects=False,
    )
    assert resp.headers["location"] == "/"


@pytest.mark.parametrize(
    ("role", "landing"),
    [(Role.admin, "/projects"), (Role.researcher, "/projects"), (Role.annotator, "/label")],
)
def test_home_sends_each_role_to_its_work(client, db, role, landing):
    user = make_user(db, role)
    login(client, user.username)
    assert client.get("/", follow_redirects=False).headers["location"] == landing


# The role matrix: (method, path template, body) → the roles allowed. Paths use {p} for a
# project id and {t} for a task id; a forbidden role must get 403, never 2xx or 5xx.
ROLE_MATRIX = [
    ("POST", "/api/v1/projects", {"name": "m", "mode": "pairwise"}, {Role.admin}),
    (
        "GET",
        "/api/v1/projects/{p}/export?shape=pairs&format=jsonl",
        None,
        {Role.admin, Role.researcher},
    ),
    ("GET", "/api/v1/projects/{p}/tasks/next", None, {Role.admin, Role.annotator}),
    ("POST", "/api/v1/tasks/{t}/judgments", {"choice": "tie"}, {Role.admin, Role.annotator}),
]


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(("method", "path", "body", "allowed"), ROLE_MATRIX)
def test_role_matrix(client, db, role, method, path, body, allowed):
    from tests.factories import make_project, make_prompt, make_task

    project = make_project(db)
    task = make_task(db, project, make_prompt(db, project, ["a", "b"]))
    user = make_user(db, role)
    url = path.format(p=project.id, t=task.id)
    resp = client.request(method, url, json=body, headers=make_token(db, user))
    if role in allowed:
        assert resp.status_code not in (401, 403), (role, url, resp.text)
        assert resp.status_code < 500
    else:
        assert resp.status_code == 403, (role, url, resp.text)
        assert resp.json()["error"] == "forbidden"


def test_settings_refuse_a_placeholder_secret_in_prod():
    with pytest.raises(ValidationError, match="PREFLOOP_SECRET_KEY"):
        Settings(env="prod", secret_key="changeme")
    with pytest.raises(ValidationError):
        Settings(env="prod")  # the dev default is a placeholder too
    assert Settings(env="prod", secret_key="x" * 32).secret_key == "x" * 32
    assert Settings(env="dev").database_url.startswith("sqlite:///")


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("PREFLOOP_LEASE_SECONDS", "42")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@h/db" and s.lease_seconds == 42
    assert not s.is_sqlite


# --- listing and revoking API tokens ---------------------------------------------------------

TOKEN_FIELDS = {"id", "user", "name", "created_at", "last_used_at", "revoked"}


def _bearer(client, headers, name):  # type: ignore[no-untyped-def]
    """A new token made over the API; returns (its id, its headers)."""
    made = client.post("/api/v1/tokens", json={"name": name}, headers=headers)
    assert made.status_code == 201
    listed = client.get("/api/v1/tokens", headers=headers).json()
    token_id = next(t["id"] for t in listed if t["name"] == name)
    return token_id, {"Authorization": f"Bearer {made.json()['token']}"}


def test_users_list_their_own_tokens_without_secrets(client, db):
    from sqlalchemy import select

    from app.models import ApiToken

    alice = make_user(db, Role.annotator)
    headers = make_token(db, alice)
    make_token(db, make_user(db, Role.annotator))  # someone else's
    laptop_id, laptop = _bearer(client, headers, "laptop")
    assert client.get("/api/v1/me", headers=laptop).status_code == 200

    listed = client.get("/api/v1/tokens", headers=headers)
    assert listed.status_code == 200
    rows = listed.json()
    assert [r["name"] for r in rows] == ["test", "laptop"]
    assert all(set(r) == TOKEN_FIELDS for r in rows)
    assert {r["user"] for r in rows} == {alice.username}
    assert all(r["revoked"] is False and r["created_at"] for r in rows)
    assert rows[1]["id"] == laptop_id and rows[1]["last_used_at"] is not None
    secrets_ = [h["Authorization"].split()[1] for h in (headers, laptop)]
    secrets_ += list(db.scalars(select(ApiToken.token_hash)))
    assert not any(s in listed.text for s in secrets_)


def test_admins_list_one_users_or_everyones_tokens_and_others_may_not(client, db):
    admin = make_user(db, Role.admin)
    admin_headers = make_token(db, admin)
    ann = make_user(db, Role.annotator)
    ann_headers = make_token(db, ann)
    res = make_user(db, Role.researcher)
    make_token(db, res)

    only_ann = client.get(f"/api/v1/tokens?user={ann.username}", headers=admin_headers).json()
    assert [t["user"] for t in only_ann] == [ann.username]
    everyone = client.get("/api/v1/tokens?all=true", headers=admin_headers).json()
    assert sorted(t["user"] for t in everyone) == sorted(
        [admin.username, ann.username, res.username]
    )
    own = client.get("/api/v1/tokens", headers=admin_headers).json()
    assert [t["user"] for t in own] == [admin.username]
    unknown = client.get("/api/v1/tokens?user=ghost", headers=admin_headers)
    assert unknown.status_code == 404 and unknown.json()["detail"] == "no user 'ghost'"

    for query in (f"user={res.username}", "all=true"):
        resp = client.get(f"/api/v1/tokens?{query}", headers=ann_headers)
        assert resp.status_code == 403 and resp.json()["error"] == "forbidden"
    # Naming yourself is fine.
    assert len(client.get(f"/api/v1/tokens?user={ann.username}", headers=ann_headers).json()) == 1


def test_revoking_a_token_ends_it_at_the_next_request(client, db):
    user = make_user(db, Role.researcher)
    headers = make_token(db, user)
    token_id, leaked = _bearer(client, headers, "leaked")
    assert client.get("/api/v1/me", headers=leaked).status_code == 200

    resp = client.delete(f"/api/v1/tokens/{token_id}", headers=headers)
    assert resp.status_code == 200
    assert resp.json()["id"] == token_id and resp.json()["revoked"] is True
    gone = client.get("/api/v1/me", headers=leaked)
    assert gone.status_code == 401 and gone.json()["detail"] == "invalid or revoked API token"
    assert client.get("/api/v1/me", headers=headers).status_code == 200  # the other one lives
    listed = {t["id"]: t["revoked"] for t in client.get("/api/v1/tokens", headers=headers).json()}
    assert listed[token_id] is True

    again = client.delete(f"/api/v1/tokens/{token_id}", headers=headers)  # idempotent
    assert again.status_code == 200 and again.json()["revoked"] is True
    missing = client.delete("/api/v1/tokens/999999", headers=headers)
    assert missing.status_code == 404 and missing.json()["detail"] == "no token 999999"


def test_a_token_can_revoke_itself(client, db):
    user = make_user(db)
    headers = make_token(db, user)
    token_id = client.get("/api/v1/tokens", headers=headers).json()[0]["id"]
    assert client.delete(f"/api/v1/tokens/{token_id}", headers=headers).status_code == 200
    assert client.get("/api/v1/me", headers=headers).status_code == 401


def test_only_the_owner_or_an_admin_revokes_a_token(client, db):
    owner = make_user(db)
    owner_headers = make_token(db, owner)
    token_id = client.get("/api/v1/tokens", headers=owner_headers).json()[0]["id"]
    other = make_token(db, make_user(db, Role.researcher))
    # Someone else's token is "not found", so ids do not reveal whose tokens exist.
    resp = client.delete(f"/api/v1/tokens/{token_id}", headers=other)
    assert resp.status_code == 404
    assert client.get("/api/v1/me", headers=owner_headers).status_code == 200

    admin = make_token(db, make_user(db, Role.admin))
    assert client.delete(f"/api/v1/tokens/{token_id}", headers=admin).json()["revoked"] is True
    assert client.get("/api/v1/me", headers=owner_headers).status_code == 401


def test_revoking_from_the_browser_needs_csrf(client, db):
    user = make_user(db)
    csrf = login(client, user.username)
    made = client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": csrf})
    token_id = client.get("/api/v1/tokens").json()[0]["id"]
    assert client.delete(f"/api/v1/tokens/{token_id}").status_code == 403
    ok = client.delete(f"/api/v1/tokens/{token_id}", headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200
    bearer = {"Authorization": f"Bearer {made.json()['token']}"}
    assert client.get("/api/v1/me", headers=bearer).status_code == 401


def test_a_paused_users_token_says_the_account_is_paused(client, db):
    from app.services import users

    user = make_user(db)
    headers = make_token(db, user)
    users.set_active(db, user.id, False)
    db.flush()
    resp = client.get("/api/v1/me", headers=headers)
    assert resp.status_code == 401 and resp.json()["error"] == "not_authenticated"
    assert resp.json()["detail"] == "this account is paused; ask an admin to resume it"
    unknown = client.get("/api/v1/me", headers={"Authorization": "Bearer pfl_nope"})
    assert unknown.json()["detail"] == "invalid or revoked API token"


def test_cli_token_list_and_revoke(committed_factory, backend_settings, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from app.cli import cli
    from app.db import transaction
    from app.main import create_app

    monkeypatch.setenv("PREFLOOP_DATABASE_URL", backend_settings.database_url)
    monkeypatch.chdir(tmp_path)
    with transaction(committed_factory) as session:
        make_user(session, Role.annotator, username="tok-ann")
        make_user(session, Role.researcher, username="tok-res")
    runner = CliRunner()
    assert "list" in runner.invoke(cli, ["token", "--help"]).output
    made = runner.invoke(cli, ["token", "create", "tok-ann", "--name", "laptop"])
    assert made.exit_code == 0, made.output
    secret = made.output.strip()
    assert runner.invoke(cli, ["token", "create", "tok-res", "--name", "ci"]).exit_code == 0

    everyone = runner.invoke(cli, ["token", "list"])
    assert everyone.exit_code == 0, everyone.output
    assert "tok-ann" in everyone.output and "tok-res" in everyone.output
    assert secret not in everyone.output
    mine = runner.invoke(cli, ["token", "list", "--user", "tok-ann"])
    lines = [line for line in mine.output.splitlines() if "laptop" in line]
    assert len(lines) == 1 and "tok-res" not in mine.output and "live" in lines[0]
    token_id = int(lines[0].split()[0])

    with TestClient(create_app(backend_settings)) as web:
        bearer = {"Authorization": f"Bearer {secret}"}
        assert web.get("/api/v1/me", headers=bearer).status_code == 200
        revoked = runner.invoke(cli, ["token", "revoke", str(token_id)])
        assert revoked.exit_code == 0, revoked.output
        assert f"revoked token {token_id} (laptop of tok-ann)" in revoked.output
        assert web.get("/api/v1/me", headers=bearer).status_code == 401
    again = runner.invoke(cli, ["token", "revoke", str(token_id)])
    assert again.exit_code == 0 and "already revoked" in again.output
    assert "revoked" in runner.invoke(cli, ["token", "list", "--user", "tok-ann"]).output
    missing = runner.invoke(cli, ["token", "revoke", "999999"])
    assert missing.exit_code == 1 and "no token 999999" in missing.output
    nobody = runner.invoke(cli, ["token", "list", "--user", "ghost"])
    assert nobody.exit_code == 1 and "no user 'ghost'" in nobody.output
