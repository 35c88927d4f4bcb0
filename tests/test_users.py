"""Admins manage accounts; pausing a user ends their access at once."""

from __future__ import annotations

import pytest

from app.models import Role, User
from tests.factories import PASSWORD, login, make_token, make_user


def test_admin_creates_lists_pauses_and_resumes_users_over_the_api(client, db):
    admin = make_headers = make_token(db, make_user(db, Role.admin))
    created = client.post(
        "/api/v1/users",
        json={"username": "ann", "role": "annotator", "password": "long-enough-pw"},
        headers=admin,
    )
    assert created.status_code == 201 and created.json()["role"] == "annotator"
    uid = created.json()["id"]
    assert "ann" in [
        u["username"] for u in client.get("/api/v1/users", headers=make_headers).json()
    ]
    dup = client.post(
        "/api/v1/users",
        json={"username": "ann", "role": "annotator", "password": "long-enough-pw"},
        headers=admin,
    )
    assert dup.status_code == 409 and "already exists" in dup.json()["detail"]

    ann_headers = make_token(db, db.get(User, uid))
    assert client.get("/api/v1/me", headers=ann_headers).status_code == 200
    assert client.post(f"/api/v1/users/{uid}/pause", headers=admin).json()["active"] is False
    assert client.get("/api/v1/me", headers=ann_headers).status_code == 401
    assert client.post(f"/api/v1/users/{uid}/resume", headers=admin).json()["active"] is True
    assert client.get("/api/v1/me", headers=ann_headers).status_code == 200


def test_short_password_is_refused_with_a_message(client, db):
    admin = make_token(db, make_user(db, Role.admin))
    resp = client.post(
        "/api/v1/users",
        json={"username": "x", "role": "annotator", "password": "short"},
        headers=admin,
    )
    assert resp.status_code == 422


def test_only_admins_manage_users(client, db):
    for role in (Role.annotator, Role.researcher):
        headers = make_token(db, make_user(db, role))
        assert client.get("/api/v1/users", headers=headers).status_code == 403
        assert (
            client.post(
                "/api/v1/users",
                json={"username": "y", "role": "admin", "password": "long-enough-pw"},
                headers=headers,
            ).status_code
            == 403
        )


def test_users_page_form_adds_a_user_and_pausing_logs_them_out(client, db, app):
    from fastapi.testclient import TestClient

    admin = make_user(db, Role.admin)
    csrf = login(client, admin.username)
    page = client.get("/users")
    assert page.status_code == 200 and admin.username in page.text
    resp = client.post(
        "/users",
        data={"username": "bob", "role": "annotator", "password": PASSWORD, "csrf_token": csrf},
        follow_redirects=False,
    )
    assert resp.status_code == 303
    bob = db.query(User).filter_by(username="bob").one()

    with TestClient(app) as bob_client:
        login(bob_client, "bob")
        assert bob_client.get("/api/v1/me").status_code == 200
        client.post(f"/users/{bob.id}/active", data={"active": "false", "csrf_token": csrf})
        assert bob_client.get("/api/v1/me").status_code == 401


# --- lockout guards --------------------------------------------------------------------------


def test_an_admin_cannot_pause_themselves_over_the_api(client, db):
    admin = make_user(db, Role.admin)
    make_user(db, Role.admin)  # another active admin: the refusal is about "yourself"
    headers = make_token(db, admin)
    resp = client.post(f"/api/v1/users/{admin.id}/pause", headers=headers)
    assert resp.status_code == 409 and resp.json()["error"] == "conflict"
    assert "your own account" in resp.json()["detail"]
    assert client.get("/api/v1/me", headers=headers).status_code == 200
    db.refresh(admin)
    assert admin.active is True


def test_the_last_active_admin_cannot_be_paused_or_demoted(client, db):
    from app.errors import Conflict
    from app.services import users

    first = make_user(db, Role.admin)
    second = make_user(db, Role.admin)
    headers = make_token(db, first)
    # Another admin may be paused while one stays active …
    assert client.post(f"/api/v1/users/{second.id}/pause", headers=headers).status_code == 200
    # … but then `first` is the last active one: no pausing (the CLI has no "yourself") …
    with pytest.raises(Conflict, match="last active admin"):
        users.set_active(db, first.id, False)
    # … and no demoting, over the API or not.
    resp = client.post(
        f"/api/v1/users/{first.id}/role", json={"role": "annotator"}, headers=headers
    )
    assert resp.status_code == 409 and "last active admin" in resp.json()["detail"]
    with pytest.raises(Conflict, match="last active admin"):
        users.set_role(db, first.id, Role.researcher)
    db.refresh(first)
    assert first.active is True and first.role is Role.admin

    # With the second admin back, either may be demoted or paused (by the other).
    assert client.post(f"/api/v1/users/{second.id}/resume", headers=headers).status_code == 200
    demoted = client.post(
        f"/api/v1/users/{second.id}/role", json={"role": "researcher"}, headers=headers
    )
    assert demoted.status_code == 200 and demoted.json()["role"] == "researcher"
    assert users.set_active(db, second.id, False).active is False  # not an admin any more


def test_a_paused_admin_does_not_count_and_annotators_are_not_guarded(db):
    from app.errors import Conflict
    from app.services import users

    paused = make_user(db, Role.admin)
    active = make_user(db, Role.admin)
    ann = make_user(db, Role.annotator)
    users.set_active(db, paused.id, False)
    with pytest.raises(Conflict, match="last active admin"):
        users.set_active(db, active.id, False)
    assert users.set_active(db, ann.id, False, by=active).active is False
    assert users.set_role(db, ann.id, Role.researcher).role is Role.researcher
    assert users.set_active(db, paused.id, True).active is True  # resuming is always allowed
    assert users.set_active(db, active.id, False).active is False


def test_role_change_api_is_admin_only_and_checks_the_role(client, db):
    admin = make_token(db, make_user(db, Role.admin))
    ann = make_user(db, Role.annotator)
    ann_headers = make_token(db, ann)
    url = f"/api/v1/users/{ann.id}/role"
    assert client.post(url, json={"role": "admin"}, headers=ann_headers).status_code == 403
    assert client.post(url, json={"role": "boss"}, headers=admin).status_code == 422
    assert (
        client.post("/api/v1/users/999999/role", json={"role": "admin"}, headers=admin).json()[
            "error"
        ]
        == "not_found"
    )
    promoted = client.post(url, json={"role": "admin"}, headers=admin)
    assert promoted.status_code == 200 and promoted.json()["role"] == "admin"
    assert client.get("/api/v1/users", headers=ann_headers).status_code == 200


# --- usernames are case-insensitive ----------------------------------------------------------


def test_usernames_differing_only_in_case_are_refused(client, db):
    admin = make_token(db, make_user(db, Role.admin))
    body = {"username": "alice", "role": "annotator", "password": "long-enough-pw"}
    assert client.post("/api/v1/users", json=body, headers=admin).status_code == 201
    for name in ("Alice", "ALICE", " aLiCe "):
        dup = client.post("/api/v1/users", json={**body, "username": name}, headers=admin)
        assert dup.status_code == 409, name
        assert dup.json()["detail"] == "user 'alice' already exists (usernames ignore case)"
    assert [u["username"] for u in client.get("/api/v1/users", headers=admin).json()].count(
        "alice"
    ) == 1
    # Login stays exact, as before.
    login(client, "alice", "long-enough-pw")
    assert client.get("/api/v1/me").json()["username"] == "alice"


def test_non_ascii_usernames_are_refused(db):
    from app.errors import InvalidInput
    from app.services import users

    # SQLite's lower() folds ASCII only, and "Аlice" (Cyrillic А) would pass for "Alice".
    for name in ("Аlice", "jürgen"):
        with pytest.raises(InvalidInput, match="ASCII"):
            users.create(db, name, Role.annotator, None)


def test_existing_users_differing_in_case_can_still_log_in(client, db):
    """Rows made before the check (no migration merged them) keep working."""
    from app.models import User as UserRow

    for name in ("Bob", "bob"):
        db.add(UserRow(username=name, role=Role.annotator, password_hash=users_hash(), active=True))
    db.flush()
    for name in ("Bob", "bob"):
        login(client, name)
        assert client.get("/api/v1/me").json()["username"] == name


def users_hash() -> str:
    from app.services import users

    return users.hash_password(PASSWORD)


# --- the /users page shows form errors on the page ------------------------------------------


def _csrf_admin(client, db):  # type: ignore[no-untyped-def]
    admin = make_user(db, Role.admin)
    return admin, login(client, admin.username)


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"role": "boss"}, 422, "role must be one of admin, annotator, researcher"),
        ({"role": ""}, 422, "role must be one of admin, annotator, researcher"),
        ({"password": ""}, 422, "password must be at least 8 characters"),
        ({"password": "short"}, 422, "password must be at least 8 characters"),
        ({"username": ""}, 422, "username must be 1-64"),
        ({"username": "Taken"}, 409, "user &#39;taken&#39; already exists"),
    ],
)
def test_users_form_errors_re_render_the_page(client, db, fields, status, message):
    make_user(db, Role.annotator, username="taken")
    _admin, csrf = _csrf_admin(client, db)
    data = {"username": "carol", "role": "annotator", "password": PASSWORD, "csrf_token": csrf}
    resp = client.post("/users", data={**data, **fields}, follow_redirects=False)
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("text/html")
    assert '<p class="error" role="alert">' in resp.text and message in resp.text
    assert "<h1>Users</h1>" in resp.text and 'action="/users"' in resp.text
    # What was typed is kept (not the password).
    if fields.get("username", "carol"):
        assert f'value="{fields.get("username", "carol")}"' in resp.text
    assert PASSWORD not in resp.text
    assert db.query(User).filter_by(username="carol").count() == 0


def test_users_page_refuses_pausing_the_last_active_admin_with_a_message(client, db):
    from app.services import users

    admin, csrf = _csrf_admin(client, db)
    other = make_user(db, Role.admin)
    users.set_active(db, other.id, False)
    db.flush()
    resp = client.post(f"/users/{admin.id}/active", data={"active": "false", "csrf_token": csrf})
    assert resp.status_code == 409 and "your own account" in resp.text
    assert "<h1>Users</h1>" in resp.text
    db.refresh(admin)
    assert admin.active is True
    assert client.get("/api/v1/me").status_code == 200


# --- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(committed_factory, backend_settings, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    """The real `prefloop` CLI on the test backend, with real commits (emptied afterwards)."""
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", backend_settings.database_url)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return committed_factory


def _user(factory, username):  # type: ignore[no-untyped-def]
    from app.db import transaction

    with transaction(factory) as session:
        row = session.query(User).filter_by(username=username).one()
        session.expunge(row)
        return row


def test_cli_pause_resume_and_role(cli_env):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from app.cli import cli
    from app.db import transaction

    with transaction(cli_env) as session:
        make_user(session, Role.admin, username="root")
        make_user(session, Role.annotator, username="ann")
    runner = CliRunner()

    paused = runner.invoke(cli, ["user", "pause", "ann"])
    assert paused.exit_code == 0, paused.output
    assert "paused ann" in paused.output and _user(cli_env, "ann").active is False
    listed = runner.invoke(cli, ["user", "list"])
    rows = [line.split()[1:] for line in listed.output.splitlines()]
    assert ["ann", "annotator", "(paused)"] in rows and ["root", "admin"] in rows
    resumed = runner.invoke(cli, ["user", "resume", "ann"])
    assert resumed.exit_code == 0 and "resumed ann" in resumed.output
    assert _user(cli_env, "ann").active is True

    last = runner.invoke(cli, ["user", "pause", "root"])
    assert last.exit_code == 1 and "last active admin" in last.output
    assert _user(cli_env, "root").active is True
    demote = runner.invoke(cli, ["user", "role", "root", "annotator"])
    assert demote.exit_code == 1 and "last active admin" in demote.output
    promote = runner.invoke(cli, ["user", "role", "ann", "admin"])
    assert promote.exit_code == 0 and "ann is now admin" in promote.output
    assert runner.invoke(cli, ["user", "pause", "root"]).exit_code == 0
    assert _user(cli_env, "root").active is False

    unknown = runner.invoke(cli, ["user", "resume", "nobody"])
    assert unknown.exit_code == 1 and "no user 'nobody'" in unknown.output


def test_cli_ensure_admin_counts_only_active_admins(cli_env):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from app.cli import cli
    from app.db import transaction

    runner = CliRunner()
    made = runner.invoke(cli, ["user", "ensure-admin"])
    assert made.exit_code == 0 and "created admin admin with password" in made.output
    again = runner.invoke(cli, ["user", "ensure-admin"])
    assert again.exit_code == 0 and "an active admin account exists already" in again.output

    # A paused admin (left from before the guard, or paused in the database) does not count.
    with transaction(cli_env) as session:
        session.query(User).filter_by(username="admin").one().active = False
    taken = runner.invoke(cli, ["user", "ensure-admin"])
    assert taken.exit_code == 1
    assert "prefloop user resume admin" in taken.output  # says how to get back in
    other = runner.invoke(cli, ["user", "ensure-admin", "--username", "admin2"])
    assert other.exit_code == 0 and "created admin admin2" in other.output
    assert _user(cli_env, "admin2").role is Role.admin and _user(cli_env, "admin2").active
