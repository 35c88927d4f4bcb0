"""Numbers too large for the database are the client's mistake: a 422 that says so, never a
500, on both backends (SQLite's driver raises OverflowError above 2**63; Postgres refuses a
bigint above 2**63 and an integer column above 2**31 with NumericValueOutOfRange)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Judgment, Project, Role
from app.schemas import INT32_MAX
from app.services import users
from tests.factories import login, make_project, make_prompt, make_task, make_token, make_user

TOO_BIG_FOR_INT64 = 99999999999999999999
"""From QA's report: above 2**63, so no id column on either backend can hold it."""


@pytest.fixture
def admin_headers(db: Session) -> dict[str, str]:
    return make_token(db, make_user(db, Role.admin))


def judgment_count(db: Session) -> int:
    return int(db.scalar(select(func.count()).select_from(Judgment)) or 0)


def test_api_project_id_beyond_int64_is_422(
    client: TestClient, db: Session, admin_headers: dict[str, str]
) -> None:
    resp = client.get(f"/api/v1/projects/{TOO_BIG_FOR_INT64}", headers=admin_headers)
    assert resp.status_code == 422, resp.text
    assert resp.json() == {
        "error": "invalid_input",
        "detail": "value out of range: a number in the request is too large for the database",
    }
    # Ids up to 2**63 - 1 are ids like any other: this one does not exist.
    resp = client.get(f"/api/v1/projects/{2**63 - 1}", headers=admin_headers)
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"


def test_api_task_id_beyond_int64_is_422_and_stores_nothing(
    client: TestClient, db: Session
) -> None:
    annotator = users.create(db, "range-annotator", Role.annotator, None)
    resp = client.post(
        f"/api/v1/tasks/{TOO_BIG_FOR_INT64}/judgments",
        json={"choice": "tie"},
        headers=make_token(db, annotator),
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"].startswith("value out of range")
    assert judgment_count(db) == 0


def test_page_with_a_project_id_beyond_int64_is_a_422_page(client: TestClient, db: Session) -> None:
    admin = make_user(db, Role.admin)
    login(client, admin.username)
    resp = client.get(f"/projects/{TOO_BIG_FOR_INT64}")
    assert resp.status_code == 422
    assert resp.headers["content-type"].startswith("text/html")
    assert "value out of range" in resp.text


@pytest.mark.parametrize(
    ("time_spent_ms", "message"),
    [
        (99999999999, f"Input should be less than or equal to {INT32_MAX}"),
        (INT32_MAX + 1, f"Input should be less than or equal to {INT32_MAX}"),
        (-1, "Input should be greater than or equal to 0"),
    ],
)
def test_api_time_spent_outside_the_column_is_422(
    client: TestClient, db: Session, time_spent_ms: int, message: str
) -> None:
    project = make_project(db)
    task = make_task(db, project, make_prompt(db, project, ["left", "right"]))
    annotator = users.create(db, f"range-{time_spent_ms}", Role.annotator, None)
    resp = client.post(
        f"/api/v1/tasks/{task.id}/judgments",
        json={"choice": "tie", "time_spent_ms": time_spent_ms},
        headers=make_token(db, annotator),
    )
    assert resp.status_code == 422, resp.text
    (error,) = resp.json()["errors"]
    assert error["loc"] == ["body", "time_spent_ms"]
    assert error["msg"] == message
    assert judgment_count(db) == 0


def test_api_time_spent_at_the_column_limit_is_stored(client: TestClient, db: Session) -> None:
    project = make_project(db)
    task = make_task(db, project, make_prompt(db, project, ["left", "right"]))
    annotator = users.create(db, "range-at-limit", Role.annotator, None)
    resp = client.post(
        f"/api/v1/tasks/{task.id}/judgments",
        json={"choice": "tie", "time_spent_ms": INT32_MAX},
        headers=make_token(db, annotator),
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["time_spent_ms"] == INT32_MAX
    assert db.scalar(select(Judgment.time_spent_ms)) == INT32_MAX


@pytest.mark.parametrize(
    ("field", "needle"),
    [
        ("judgments_per_task", "judgments_per_task must be"),
        ("candidates_per_task", "3 to 9 candidates"),
        ("lease_seconds", "lease_seconds must be"),
    ],
)
@pytest.mark.parametrize("value", [INT32_MAX + 1, TOO_BIG_FOR_INT64])
def test_api_project_settings_beyond_their_columns_are_422(
    client: TestClient,
    db: Session,
    admin_headers: dict[str, str],
    field: str,
    needle: str,
    value: int,
) -> None:
    """The service's ranges keep these far inside their integer columns."""
    resp = client.post(
        "/api/v1/projects",
        json={"name": "huge", "mode": "ranking", field: value},
        headers=admin_headers,
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "invalid_input" and needle in resp.json()["detail"]
    assert db.scalar(select(Project.id).where(Project.name == "huge")) is None
