"""Webhooks: a project's registered URLs, signed deliveries queued in ``jobs``, retried with backoff.

Registrations live in ``project.settings["webhooks"]`` as a list of
``{id, url, secret, events, active}`` (no table of their own). The secret is shown once, when
the hook is created; afterwards only a hint of it is returned.

Why deliveries are jobs: `emit` runs inside the caller's transaction, so an event is recorded
exactly when its cause (a judgment, a snapshot, a model) commits, and never for a cause that
rolled back. The HTTP call happens later, outside any transaction, in `run_due`, which claims
due webhook jobs itself (``FOR UPDATE SKIP LOCKED`` on Postgres, like `jobs.claim`): the
general worker must not take them, since a failed delivery waits for ``params["not_before"]``
before the next try, and `jobs.claim` knows nothing about that.

Every delivery POSTs the exact JSON body the signature was computed over, with headers
``X-Prefloop-Event``, ``X-Prefloop-Delivery`` (the job id, stable across retries, so receivers
can de-duplicate) and ``X-Prefloop-Signature: sha256=<hex HMAC-SHA256(secret, body)>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidInput, NotFound
from app.models import Job, JobState, Project
from app.services import jobs

SETTING = "webhooks"
JUDGMENT_CREATED = "judgment.created"
SNAPSHOT_CREATED = "snapshot.created"
MODEL_READY = "model.ready"
JOB_FAILED = "job.failed"
EVENTS = (JUDGMENT_CREATED, SNAPSHOT_CREATED, MODEL_READY, JOB_FAILED)

MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 3600.0
TIMEOUT_S = 10.0
MIN_SECRET_CHARS = 16
WORKER_ID = "webhooks"

Post = Callable[..., Any]
"""``httpx.post``-shaped: ``post(url, content=..., headers=..., timeout=...)`` → a response."""


class DeliveryFailed(Exception):
    """One delivery attempt failed (connection error, timeout or a non-2xx answer): retryable."""


def sign(secret: str, body: bytes) -> str:
    """The ``X-Prefloop-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff_s(attempts: int) -> float:
    """Wait after the `attempts`-th failed try: 10 s, 20 s, 40 s … capped at an hour."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


def _hint(secret: str) -> str:
    return "…" + secret[-4:]


def public(hook: dict[str, Any]) -> dict[str, Any]:
    """A registration as the API shows it after creation: the secret replaced by a hint."""
    return {
        "id": hook["id"],
        "url": hook["url"],
        "events": list(hook["events"]),
        "active": bool(hook.get("active", True)),
        "secret_hint": _hint(str(hook["secret"])),
    }


def _project(session: Session, project_id: int, *, lock: bool = False) -> Project:
    project = session.get(Project, project_id, with_for_update=True if lock else None)
    if project is None:
        raise NotFound(f"no project {project_id}")
    return project


def hooks(project: Project) -> list[dict[str, Any]]:
    """The project's registrations (with secrets); an absent or malformed setting is none."""
    found = (project.settings or {}).get(SETTING)
    return [h for h in found if isinstance(h, dict)] if isinstance(found, list) else []


def _check_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("url must be an absolute http:// or https:// URL", url=url)
    return url.strip()


def _check_events(events: Iterable[str]) -> list[str]:
    chosen = list(dict.fromkeys(events))
    unknown = [e for e in chosen if e not in EVENTS]
    if not chosen or unknown:
        raise InvalidInput(
            f"events must be a non-empty subset of {', '.join(EVENTS)}", unknown=unknown
        )
    return chosen


def register(
    session: Session,
    project_id: int,
    url: str,
    events: Sequence[str],
    *,
    secret: str | None = None,
) -> tuple[dict[str, Any], str]:
    """Add a registration; returns its public view and the secret (the only time it is shown).

    The project row is locked while its settings are rewritten, so two admins adding hooks at
    once do not lose one of them.
    """
    clean_url = _check_url(url)
    clean_events = _check_events(events)
    if secret is None:
        secret = secrets.token_urlsafe(32)
    if len(secret) < MIN_SECRET_CHARS:
        raise InvalidInput(f"secret must be at least {MIN_SECRET_CHARS} characters")
    project = _project(session, project_id, lock=True)
    hook = {
        "id": secrets.token_hex(8),
        "url": clean_url,
        "secret": secret,
        "events": clean_events,
        "active": True,
    }
    settings = {**(project.settings or {}), SETTING: [*hooks(project), hook]}
    if JUDGMENT_CREATED in clean_events and not _judgments_watched(project):
        # The cursor only moves while someone listens: start it at the newest judgment, so
        # a new receiver gets the judgments made from now on, not the project's history.
        from app.models import Judgment

        newest = session.scalar(
            select(func.max(Judgment.id)).where(Judgment.project_id == project_id)
        )
        settings[JUDGMENT_CURSOR] = int(newest or 0)
    project.settings = settings
    session.flush()
    return public(hook), secret


def _judgments_watched(project: Project) -> bool:
    return any(h.get("active", True) and JUDGMENT_CREATED in h["events"] for h in hooks(project))


def list_public(session: Session, project_id: int) -> list[dict[str, Any]]:
    return [public(h) for h in hooks(_project(session, project_id))]


def remove(session: Session, project_id: int, hook_id: str) -> None:
    """Delete a registration; deliveries already queued still go out (they were promised)."""
    project = _project(session, project_id, lock=True)
    current = hooks(project)
    kept = [h for h in current if h.get("id") != hook_id]
    if len(kept) == len(current):
        raise NotFound(f"no webhook {hook_id} in project {project_id}")
    project.settings = {**(project.settings or {}), SETTING: kept}
    session.flush()


def body_of(event: str, project_id: int, payload: dict[str, Any], now: datetime) -> bytes:
    """The exact bytes sent and signed: compact, key-sorted JSON."""
    envelope = {
        "event": event,
        "project_id": project_id,
        "created_at": now.astimezone(UTC).isoformat(),
        "data": payload,
    }
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()


def emit(
    session: Session,
    project_id: int,
    event: str,
    payload: dict[str, Any],
    *,
    now: datetime | None = None,
) -> list[Job]:
    """Queue one delivery per active registration subscribed to `event`, in the caller's
    transaction; returns the queued jobs (none when nobody listens)."""
    if event not in EVENTS:
        raise InvalidInput(f"unknown webhook event {event!r}")
    now = now or datetime.now(UTC)
    project = _project(session, project_id)
    listeners = [h for h in hooks(project) if h.get("active", True) and event in h["events"]]
    if not listeners:
        return []
    body = body_of(event, project_id, payload, now)
    queued = []
    for hook in listeners:
        params = {
            "hook_id": hook["id"],
            "url": hook["url"],
            "event": event,
            "body": body.decode(),
            "signature": sign(str(hook["secret"]), body),
            "not_before": now.astimezone(UTC).isoformat(),
        }
        queued.append(
            jobs.enqueue_internal(
                session, project_id, jobs.WEBHOOK, params, max_attempts=MAX_ATTEMPTS
            )
        )
    return queued


def emit_judgments(
    session: Session, project_id: int, judgment_ids: Sequence[int], *, now: datetime | None = None
) -> list[Job]:
    """``judgment.created`` for a whole batch as ONE delivery per registration, not one per
    judgment: a busy labeling session would otherwise flood the receiver."""
    if not judgment_ids:
        return []
    ids = sorted({int(i) for i in judgment_ids})
    return emit(session, project_id, JUDGMENT_CREATED, {"judgment_ids": ids}, now=now)


JUDGMENT_CURSOR = "webhooks_judgment_cursor"


def emit_new_judgments(session: Session, *, now: datetime | None = None) -> int:
    """Batch every judgment recorded since the last call into one ``judgment.created``
    delivery per subscribed registration, per project; returns how many were batched.

    The worker loop calls this every poll, so labeling's hot path never pays for webhooks and
    a busy hour becomes a few deliveries. The cursor (the last batched judgment id) lives in
    the project's settings and moves in the same transaction that queues the deliveries.
    """
    from app.models import Judgment  # local: keeps this module's imports about delivery

    batched = 0
    for project in session.scalars(select(Project).with_for_update(skip_locked=True)):
        if not _judgments_watched(project):
            continue
        cursor = int((project.settings or {}).get(JUDGMENT_CURSOR, 0))
        ids = list(
            session.scalars(
                select(Judgment.id)
                .where(Judgment.project_id == project.id, Judgment.id > cursor)
                .order_by(Judgment.id)
                .limit(10_000)
            )
        )
        if not ids:
            continue
        emit_judgments(session, project.id, ids, now=now)
        project.settings = {**(project.settings or {}), JUDGMENT_CURSOR: ids[-1]}
        batched += len(ids)
    session.flush()
    return batched


def not_before(job: Job) -> datetime:
    raw = (job.params or {}).get("not_before")
    if not isinstance(raw, str):
        return job.created_at
    moment = datetime.fromisoformat(raw)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def due_webhooks(session: Session, now: datetime, *, limit: int = 100) -> list[Job]:
    """Queued webhook jobs whose time has come, oldest first, row-locked (skip locked) on
    Postgres. The time filter is applied in Python: ISO strings in JSON compare differently
    on each backend, and the queue of webhook jobs is small."""
    stmt = (
        select(Job)
        .where(Job.state == JobState.queued, Job.kind == jobs.WEBHOOK)
        .order_by(Job.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return [j for j in session.scalars(stmt) if not_before(j) <= now]


def deliver(job: Job, now: datetime, post: Post = httpx.post) -> dict[str, Any]:
    """POST one delivery; returns metrics for the job row, raises `DeliveryFailed` to retry
    (and ValueError for a job that lacks its params, which no retry can fix)."""
    params = job.params or {}
    missing = [k for k in ("url", "event", "body", "signature") if not params.get(k)]
    if missing:
        raise ValueError(f"webhook job {job.id} lacks params {', '.join(missing)}")
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Prefloop-Webhook/1",
        "X-Prefloop-Event": str(params["event"]),
        "X-Prefloop-Delivery": str(job.id),
        "X-Prefloop-Signature": str(params["signature"]),
    }
    try:
        response = post(
            str(params["url"]),
            content=str(params["body"]).encode(),
            headers=headers,
            timeout=TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from exc
    if not 200 <= response.status_code < 300:
        raise DeliveryFailed(f"receiver answered HTTP {response.status_code}")
    return {"status_code": response.status_code, "delivered_at": now.astimezone(UTC).isoformat()}


def run_due(
    session_factory: sessionmaker[Session],
    now: datetime,
    post: Post = httpx.post,
    *,
    worker_id: str = WORKER_ID,
    limit: int = 100,
) -> list[tuple[int, str]]:
    """Claim the due deliveries (one short transaction), POST each outside any transaction, then
    record each outcome in its own transaction: succeeded, queued again with
    ``not_before = now + backoff`` or, after `MAX_ATTEMPTS`, failed with the last error.

    Returns ``(job_id, state)`` per delivery tried, for logs and tests.
    """
    with session_factory() as session, session.begin():
        claimed = [
            jobs.claim(session, worker_id, now, [jobs.WEBHOOK], job_id=j.id)
            for j in due_webhooks(session, now, limit=limit)
        ]
        taken = [(j.id, dict(j.params)) for j in claimed if j is not None]
    outcomes: list[tuple[int, str]] = []
    for job_id, params in taken:
        probe = Job(id=job_id, params=params)
        retryable = True
        try:
            metrics = deliver(probe, now, post)
            error = None
        except DeliveryFailed as exc:
            metrics, error = {}, str(exc)
        except ValueError as exc:  # a malformed job (queued by hand): retrying cannot help
            metrics, error, retryable = {}, str(exc), False
        with session_factory() as session, session.begin():
            if error is None:
                job = jobs.finish(session, job_id, metrics, worker_id=worker_id, now=now)
            else:
                job = jobs.fail(
                    session, job_id, error, retryable=retryable, worker_id=worker_id, now=now
                )
                if job.state is JobState.queued:
                    wait = timedelta(seconds=backoff_s(job.attempts))
                    job.params = {**job.params, "not_before": (now + wait).isoformat()}
                    session.flush()
            outcomes.append((job_id, job.state.value))
    return outcomes
