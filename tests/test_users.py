"""Admins manage accounts; pausing a user ends their access at once."""

from __future__ import annotations

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
