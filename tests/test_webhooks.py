"""Webhooks: registration API and roles, event filtering, signing, retries with backoff against a
local receiver, giving up after the last attempt."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidInput, NotFound
from app.models import Job, JobState, Role
from app.services import jobs, webhooks
from tests.factories import make_project, make_token, make_user

SECRET = "s3cret-shared-with-the-receiver"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@dataclass
class Receiver:
    """A tiny HTTP server on 127.0.0.1 that answers 500 to the first `fail_first` requests."""

    fail_first: int
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(fail_first=2)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status = 500 if len(state.requests) <= state.fail_first else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(5)


def reload(db: Session, job_id: int) -> Job:
    db.expire_all()
    job = db.get(Job, job_id)
    assert job is not None
    return job


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: recompute the HMAC over the raw body, compare in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


# --- signing and queueing ---------------------------------------------------------------------


def test_sign_matches_a_receiver_side_hmac():
    body = b'{"a":1}'
    assert webhooks.sign("k" * 16, body) == (
        "sha256=" + hmac.new(b"k" * 16, body, hashlib.sha256).hexdigest()
    )
    assert verify("k" * 16, body, webhooks.sign("k" * 16, body))
    assert not verify("k" * 16, b'{"a":2}', webhooks.sign("k" * 16, body))


def test_backoff_doubles_and_is_capped():
    assert [webhooks.backoff_s(n) for n in (1, 2, 3, 4)] == [10.0, 20.0, 40.0, 80.0]
    assert webhooks.backoff_s(30) == webhooks.BACKOFF_MAX_S


def test_emit_queues_a_signed_webhook_job_in_the_callers_transaction(db):
    project = make_project(db)
    hook, secret = webhooks.register(
        db, project.id, "https://example.test/h", ["snapshot.created"], secret=SECRET
    )
    assert secret == SECRET
    [job] = webhooks.emit(db, project.id, "snapshot.created", {"snapshot_id": 7}, now=T0)
    assert job.kind == "webhook" and job.state is JobState.queued
    assert job.max_attempts == webhooks.MAX_ATTEMPTS
    body = job.params["body"].encode()
    assert json.loads(body) == {
        "event": "snapshot.created",
        "project_id": project.id,
        "created_at": T0.isoformat(),
        "data": {"snapshot_id": 7},
    }
    assert verify(SECRET, body, job.params["signature"])
    assert job.params["url"] == "https://example.test/h"
    assert job.params["hook_id"] == hook["id"]
    assert SECRET not in json.dumps(job.params)  # the job row carries the signature only


def test_events_go_only_to_active_registrations_that_subscribed(db):
    project = make_project(db)
    judged, _ = webhooks.register(db, project.id, "http://a.test/", ["judgment.created"])
    both, _ = webhooks.register(
        db, project.id, "http://b.test/", ["judgment.created", "model.ready"]
    )
    off, _ = webhooks.register(db, project.id, "http://c.test/", ["model.ready"])
    project.settings = {
        **project.settings,
        "webhooks": [{**h, "active": h["id"] != off["id"]} for h in project.settings["webhooks"]],
    }
    db.flush()

    model_jobs = webhooks.emit(db, project.id, "model.ready", {"model_id": 1}, now=T0)
    assert [j.params["hook_id"] for j in model_jobs] == [both["id"]]
    assert webhooks.emit(db, project.id, "job.failed", {"job_id": 3}, now=T0) == []
    other = make_project(db)
    assert webhooks.emit(db, other.id, "model.ready", {}, now=T0) == []  # no hooks there
    judgment_jobs = webhooks.emit_judgments(db, project.id, [5, 3, 5, 4], now=T0)
    assert sorted(j.params["hook_id"] for j in judgment_jobs) == sorted([judged["id"], both["id"]])


def test_emit_judgments_coalesces_a_batch_into_one_delivery(db):
    project = make_project(db)
    webhooks.register(db, project.id, "http://a.test/", ["judgment.created"], secret=SECRET)
    [job] = webhooks.emit_judgments(db, project.id, [9, 2, 5, 2], now=T0)
    assert json.loads(job.params["body"])["data"] == {"judgment_ids": [2, 5, 9]}
    assert webhooks.emit_judgments(db, project.id, [], now=T0) == []


def test_unknown_events_and_bad_urls_are_refused(db):
    project = make_project(db)
    with pytest.raises(InvalidInput):
        webhooks.register(db, project.id, "http://a.test/", ["judgment.deleted"])
    with pytest.raises(InvalidInput):
        webhooks.register(db, project.id, "http://a.test/", [])
    with pytest.raises(InvalidInput):
        webhooks.register(db, project.id, "ftp://a.test/", ["model.ready"])
    with pytest.raises(InvalidInput):
        webhooks.register(db, project.id, "http://a.test/", ["model.ready"], secret="short")
    with pytest.raises(InvalidInput):
        webhooks.emit(db, project.id, "model.exploded", {})
    with pytest.raises(NotFound):
        webhooks.remove(db, project.id, "nope")


# --- delivery against a local receiver --------------------------------------------------------


def test_retries_with_backoff_until_the_receiver_accepts(
    db: Session, session_factory: sessionmaker[Session], receiver: Receiver
):
    project = make_project(db)
    webhooks.register(db, project.id, receiver.url, ["model.ready"], secret=SECRET)
    [job] = webhooks.emit(db, project.id, "model.ready", {"model_id": 11}, now=T0)
    db.flush()
    job_id = job.id

    assert webhooks.run_due(session_factory, T0, httpx.post) == [(job_id, "queued")]
    first = reload(db, job_id)
    assert first.attempts == 1
    assert first.error == "receiver answered HTTP 500"
    assert webhooks.not_before(first) == T0 + timedelta(seconds=10)

    assert webhooks.run_due(session_factory, T0 + timedelta(seconds=9), httpx.post) == []
    assert len(receiver.requests) == 1  # not due yet: nothing sent

    assert webhooks.run_due(session_factory, T0 + timedelta(seconds=10), httpx.post) == [
        (job_id, "queued")
    ]
    assert webhooks.not_before(reload(db, job_id)) == T0 + timedelta(seconds=30)
    assert webhooks.run_due(session_factory, T0 + timedelta(seconds=29), httpx.post) == []

    assert webhooks.run_due(session_factory, T0 + timedelta(seconds=30), httpx.post) == [
        (job_id, "succeeded")
    ]
    done = reload(db, job_id)
    assert done.state is JobState.succeeded
    assert done.metrics["status_code"] == 200
    assert len(receiver.requests) == 3
    for headers, body in receiver.requests:
        assert headers["x-prefloop-event"] == "model.ready"
        assert headers["x-prefloop-delivery"] == str(job_id)
        assert verify(SECRET, body, headers["x-prefloop-signature"])
        assert json.loads(body)["data"] == {"model_id": 11}
    assert webhooks.run_due(session_factory, T0 + timedelta(hours=1), httpx.post) == []


def test_gives_up_after_max_attempts_with_the_last_error(
    db: Session, session_factory: sessionmaker[Session], receiver: Receiver
):
    receiver.fail_first = 1000
    project = make_project(db)
    webhooks.register(db, project.id, receiver.url, ["job.failed"], secret=SECRET)
    [job] = webhooks.emit(db, project.id, "job.failed", {"job_id": 1}, now=T0)
    db.flush()
    now = T0
    states = []
    for _ in range(webhooks.MAX_ATTEMPTS):
        states += [s for _, s in webhooks.run_due(session_factory, now, httpx.post)]
        now += timedelta(seconds=webhooks.BACKOFF_MAX_S)
    assert states == ["queued"] * (webhooks.MAX_ATTEMPTS - 1) + ["failed"]
    final = reload(db, job.id)
    assert final.state is JobState.failed
    assert final.attempts == webhooks.MAX_ATTEMPTS
    assert final.error == "receiver answered HTTP 500"
    assert len(receiver.requests) == webhooks.MAX_ATTEMPTS
    assert webhooks.run_due(session_factory, now + timedelta(days=1), httpx.post) == []


def test_a_connection_error_is_retried(db: Session, session_factory: sessionmaker[Session]):
    project = make_project(db)
    webhooks.register(db, project.id, "http://127.0.0.1:9/", ["model.ready"], secret=SECRET)
    [job] = webhooks.emit(db, project.id, "model.ready", {}, now=T0)
    db.flush()

    def refuse(url: str, **kwargs: object) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    assert webhooks.run_due(session_factory, T0, refuse) == [(job.id, "queued")]
    assert reload(db, job.id).error == "ConnectError: connection refused"


def test_other_kinds_are_left_to_the_worker(db: Session, session_factory: sessionmaker[Session]):
    """run_due only takes webhook jobs; a worker claiming the ML kinds never takes them."""
    project = make_project(db)
    reward = jobs.enqueue(db, project.id, jobs.REWARD, {}, None)
    webhooks.register(db, project.id, "http://a.test/", ["model.ready"])
    webhooks.emit(db, project.id, "model.ready", {}, now=T0)
    db.flush()
    sent: list[str] = []

    def fake_post(url: str, **kwargs: object) -> httpx.Response:
        sent.append(url)
        return httpx.Response(204)

    assert [s for _, s in webhooks.run_due(session_factory, T0, fake_post)] == ["succeeded"]
    assert sent == ["http://a.test/"]
    assert reload(db, reward.id).state is JobState.queued
    assert jobs.claim(db, "w", T0, [jobs.REWARD, jobs.PPO, jobs.GENERATE]).id == reward.id


# --- API --------------------------------------------------------------------------------------


def test_api_create_list_delete_and_secret_hiding(client, db):
    admin = make_user(db, Role.admin)
    headers = make_token(db, admin)
    project = make_project(db)
    url = f"/api/v1/projects/{project.id}/webhooks"

    made = client.post(
        url, json={"url": "https://ci.test/hook", "events": ["model.ready"]}, headers=headers
    )
    assert made.status_code == 201, made.text
    created = made.json()
    secret = created["secret"]
    assert len(secret) >= 32
    assert created["secret_hint"] == "…" + secret[-4:]
    assert created["events"] == ["model.ready"] and created["active"] is True

    listed = client.get(url, headers=headers)
    assert listed.status_code == 200
    assert listed.json() == [
        {
            "id": created["id"],
            "url": "https://ci.test/hook",
            "events": ["model.ready"],
            "active": True,
            "secret_hint": "…" + secret[-4:],
        }
    ]
    assert secret not in listed.text
    assert secret not in client.get(f"/api/v1/projects/{project.id}", headers=headers).text

    # the stored secret is the one that signs deliveries
    db.expire_all()
    [job] = webhooks.emit(db, project.id, "model.ready", {}, now=T0)
    assert verify(secret, job.params["body"].encode(), job.params["signature"])

    assert client.delete(f"{url}/{created['id']}", headers=headers).status_code == 204
    assert client.get(url, headers=headers).json() == []
    assert client.delete(f"{url}/{created['id']}", headers=headers).status_code == 404


def test_api_validation_and_missing_project(client, db):
    headers = make_token(db, make_user(db, Role.admin))
    project = make_project(db)
    url = f"/api/v1/projects/{project.id}/webhooks"
    bad_event = client.post(url, json={"url": "http://a.test/", "events": ["x"]}, headers=headers)
    assert bad_event.status_code == 422
    bad_url = client.post(url, json={"url": "a.test", "events": ["job.failed"]}, headers=headers)
    assert bad_url.status_code == 422
    missing = client.get("/api/v1/projects/999999/webhooks", headers=headers)
    assert missing.status_code == 404
    given = client.post(
        url,
        json={"url": "http://a.test/", "events": ["job.failed"], "secret": SECRET},
        headers=headers,
    )
    assert given.json()["secret"] == SECRET


@pytest.mark.parametrize("role", [Role.annotator, Role.researcher])
def test_api_is_admin_only(client, db, role):
    headers = make_token(db, make_user(db, role))
    project = make_project(db)
    url = f"/api/v1/projects/{project.id}/webhooks"
    assert client.get(url, headers=headers).status_code == 403
    body = {"url": "http://a.test/", "events": ["job.failed"]}
    assert client.post(url, json=body, headers=headers).status_code == 403
    assert client.delete(f"{url}/abc", headers=headers).status_code == 403
    assert client.get(url).status_code == 401
    db.expire_all()
    assert project.settings in (None, {})


def test_an_event_whose_cause_rolls_back_is_never_sent(
    db: Session, session_factory: sessionmaker[Session]
):
    project = make_project(db)
    webhooks.register(db, project.id, "http://a.test/", ["snapshot.created"])
    db.flush()
    with session_factory() as session:
        session.begin()
        [job] = webhooks.emit(session, project.id, "snapshot.created", {"snapshot_id": 1})
        job_id = job.id
        session.rollback()  # the snapshot failed: its event goes with it
    db.expire_all()
    assert db.get(Job, job_id) is None
    assert webhooks.run_due(session_factory, datetime.now(UTC), httpx.post) == []


# --- the events' sources ------------------------------------------------------------------


def test_a_registered_model_emits_model_ready(db, tmp_path):
    from app.models import ModelKind
    from app.services import model_registry

    project = make_project(db)
    webhooks.register(db, project.id, "https://example.test/m", ["model.ready"], secret=SECRET)
    (tmp_path / "rm").mkdir()
    model = model_registry.register(
        db, kind=ModelKind.reward, artifact_path=tmp_path / "rm", project_id=project.id
    )
    [job] = db.query(Job).filter_by(kind="webhook").all()
    body = json.loads(job.params["body"])
    assert body["event"] == "model.ready"
    assert body["data"]["model_id"] == model.id and body["data"]["kind"] == "reward"


def test_a_final_job_failure_emits_job_failed_but_a_failed_delivery_does_not(db):
    project = make_project(db)
    webhooks.register(db, project.id, "https://example.test/f", ["job.failed"], secret=SECRET)
    from app.models import utcnow

    job = jobs.enqueue(db, project.id, "reward", {}, None)
    assert jobs.claim(db, "w1", utcnow(), jobs.TRAINING_KINDS).id == job.id
    jobs.fail(db, job.id, "out of data", retryable=False)
    [delivery] = db.query(Job).filter_by(kind="webhook").all()
    body = json.loads(delivery.params["body"])
    assert body["data"] == {"job_id": job.id, "kind": "reward", "error": "out of data"}

    assert jobs.claim(db, "w2", utcnow(), ("webhook",)).id == delivery.id
    jobs.fail(db, delivery.id, "receiver down", retryable=False)
    assert db.query(Job).filter_by(kind="webhook").count() == 1  # no delivery about a delivery


def test_the_training_worker_never_claims_webhook_deliveries(db):
    from app.models import utcnow

    project = make_project(db)
    webhooks.register(db, project.id, "https://example.test/w", ["snapshot.created"], secret=SECRET)
    webhooks.emit(db, project.id, "snapshot.created", {"snapshot_id": 1})
    assert jobs.claim(db, "trainer", utcnow(), jobs.TRAINING_KINDS) is None


def test_new_judgments_are_batched_into_one_delivery_per_poll(db):
    from app.models import Judgment
    from tests.factories import make_prompt, make_task

    project = make_project(db)
    ann = make_user(db, Role.annotator)
    made = []
    for i in range(5):
        if i == 2:  # the two judgments before the hook existed are history, not news
            webhooks.register(
                db, project.id, "https://example.test/j", ["judgment.created"], secret=SECRET
            )
            made.clear()
        task = make_task(db, project, make_prompt(db, project, ["a", "b"]))
        a, b = task.completion_ids
        judgment = Judgment(
            project_id=project.id,
            task_id=task.id,
            user_id=ann.id,
            ranking=[[a], [b]],
            display_order=[a, b],
        )
        db.add(judgment)
        db.flush()
        made.append(judgment.id)

    assert webhooks.emit_new_judgments(db) == 3
    [delivery] = db.query(Job).filter_by(kind="webhook").all()
    assert json.loads(delivery.params["body"])["data"] == {"judgment_ids": made}
    assert webhooks.emit_new_judgments(db) == 0  # the cursor moved: nothing is sent twice
    assert db.query(Job).filter_by(kind="webhook").count() == 1


def test_a_new_snapshot_emits_snapshot_created(db):
    from app.services import snapshots

    project = make_project(db)
    webhooks.register(db, project.id, "https://example.test/s", ["snapshot.created"], secret=SECRET)
    snap = snapshots.create(db, project.id, {}, created_by=None)
    [delivery] = db.query(Job).filter_by(kind="webhook").all()
    data = json.loads(delivery.params["body"])["data"]
    assert data == {"snapshot_id": snap.id, "row_count": snap.row_count, "sha256": snap.sha256}
