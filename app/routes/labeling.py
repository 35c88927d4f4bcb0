"""Labeling over the JSON API and in the browser: claim a task, heartbeat, skip, judge.

The browser page is a plain form that works without JavaScript (pairwise radios, or a rank
select per answer for rankings); app/static/label.js adds the keyboard, drag-and-drop, the
lease heartbeat, and the one-round-trip swap to the next task on top.

The JSON routes are the annotation hot path (bench/annotate.py). They return the response
already serialized: for a plain ``def`` route FastAPI validates a returned model against
`response_model` in one more worker-thread hop, although the route just built that model
from the same schema. `response_model` stays on the decorators for the OpenAPI document.
`next` and posting a judgment run their whole transaction, authentication included, in one
thread (app.deps.OneHop): with 200 annotators at once that took the web CPU per judgment
from about 18 ms to about 11 ms (bench/README.md).
"""

from __future__ import annotations

import random
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.deps import AnnotatorUser, AnnotatorWork, Db, SettingsDep
from app.errors import InvalidInput
from app.models import User, utcnow
from app.schemas import CandidateView, JudgmentIn, JudgmentOut, LeaseOut, PromptView, TaskOut
from app.services import judgments, tasks
from app.settings import Settings
from app.web import render

router = APIRouter(tags=["labeling"])
LABELS = "ABCDEFGHI"
"""Candidates are shown as A, B, C … (at most 9, the largest ranking K)."""
MAX_TIME_MS = 2**31 - 1


# --- JSON API ----------------------------------------------------------------------------


def _json(body: BaseModel, status_code: int = 200) -> Response:
    return Response(body.model_dump_json(), status_code, media_type="application/json")


@router.get(
    "/api/v1/projects/{project_id}/tasks/next",
    response_model=TaskOut,
    responses={204: {"description": "nothing is left for you in this project"}},
)
async def next_task(project_id: int, work: AnnotatorWork) -> Response:
    """Lease the next task (or the one you already hold); 204 when nothing is left."""

    def claim_next(db: Session, user: User) -> Response:
        claim = tasks.claim_next(db, project_id, user, now=utcnow(), rng=random.Random())
        prompt = claim.prompt
        return _json(
            TaskOut(
                task_id=claim.task.id,
                lease_expires_at=claim.lease_expires_at,
                prompt=PromptView(
                    id=prompt.id,
                    external_id=prompt.external_id,
                    text=prompt.text,
                    messages=prompt.messages,
                ),
                candidates=[CandidateView(id=cid, text=text) for cid, text in claim.candidates],
                instructions=claim.project.instructions,
            )
        )

    return await work.run(claim_next)


@router.post("/api/v1/tasks/{task_id}/heartbeat", response_model=LeaseOut)
def heartbeat(task_id: int, db: Db, user: AnnotatorUser) -> Response:
    return _json(LeaseOut(lease_expires_at=tasks.heartbeat(db, task_id, user, now=utcnow())))


@router.post("/api/v1/tasks/{task_id}/skip", status_code=204)
def skip(task_id: int, db: Db, user: AnnotatorUser) -> Response:
    tasks.skip(db, task_id, user)
    return Response(status_code=204)


@router.post(
    "/api/v1/tasks/{task_id}/judgments",
    response_model=JudgmentOut,
    status_code=201,
    responses={200: {"description": "replay of a stored judgment (same client_key)"}},
)
async def judge(task_id: int, body: JudgmentIn, work: AnnotatorWork) -> Response:
    """201 with the new judgment, or 200 with the stored one when `client_key` repeats."""

    def record(db: Session, user: User) -> Response:
        judgment, created = judgments.record(
            db, task_id, user, **body.model_dump(exclude_none=True), now=utcnow()
        )
        return _json(JudgmentOut.model_validate(judgment), 201 if created else 200)

    return await work.run(record)


# --- browser pages -----------------------------------------------------------------------


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def heartbeat_every(settings: Settings, lease_seconds: int) -> int:
    """Seconds between the label page's heartbeats: the configured interval, but at least
    three beats per lease, so a short lease (10 s) does not run out under an open page."""
    return max(1, min(settings.heartbeat_interval_s, lease_seconds // 3))


def _render_label_page(request: Request, page: tasks.LabelPage, settings: SettingsDep) -> Response:
    """The task (or "all done") page; only its content block when label.js swaps it in."""
    if page.claim is None:
        return render(request, "label/done.html", {"page": page}, block="content")
    return render(
        request,
        "label/task.html",
        {
            "page": page,
            "claim": page.claim,
            "labels": LABELS,
            "client_key": secrets.token_urlsafe(18),
            "time_started": int(time.time() * 1000),
            "heartbeat_s": heartbeat_every(settings, page.claim.project.lease_seconds),
        },
        block="content",
    )


@router.get("/label", include_in_schema=False)
def label_index(request: Request, db: Db, user: AnnotatorUser) -> Response:
    return render(request, "label/index.html", {"queues": tasks.queues(db)})


@router.get("/label/{project_id}", include_in_schema=False)
def label_page(
    request: Request, project_id: int, db: Db, user: AnnotatorUser, settings: SettingsDep
) -> Response:
    page = tasks.label_page(db, project_id, user, now=utcnow(), rng=random.Random())
    return _render_label_page(request, page, settings)


def _parse_choice(raw: str | None) -> int | str | None:
    """Radio values are completion ids, 'tie' or 'both_bad'."""
    if raw is None or raw == "":
        return None
    return int(raw) if raw.isdigit() else raw


def _parse_ranks(values: list[str]) -> list[list[int]]:
    """Rank selects send "<completion id>:<rank>"; equal ranks are a tie group, best first."""
    by_rank: dict[int, list[int]] = {}
    for value in values:
        cid, sep, rank = value.partition(":")
        if not value:
            raise InvalidInput("give every answer a rank before submitting (equal ranks tie)")
        if not (sep and cid.isdigit() and rank.isdigit()):
            raise InvalidInput(f"bad rank value {value!r}")
        by_rank.setdefault(int(rank), []).append(int(cid))
    return [by_rank[r] for r in sorted(by_rank)]


def _verdict(
    choice: str | None, strength: str | None, rank: list[str], none_acceptable: bool
) -> dict[str, Any]:
    """The form's fields as keyword arguments for judgments.record."""
    if rank:
        return {"ranking": _parse_ranks(rank), "none_acceptable": none_acceptable}
    parsed = _parse_choice(choice)
    if parsed is None:
        raise InvalidInput("choose A, B, Tie or Both bad before submitting")
    verdict: dict[str, Any] = {"choice": parsed}
    if strength and isinstance(parsed, int):  # "how much better" means nothing for a tie
        if strength not in ("1", "2", "3"):
            raise InvalidInput("strength must be 1, 2 or 3")
        verdict["strength"] = int(strength)
    return verdict


def _time_spent(time_spent_ms: str | None, time_started: int | None) -> int | None:
    """The browser's own measure (page shown to submit) when sent, else the server's."""
    if time_spent_ms and time_spent_ms.isdigit():
        return min(int(time_spent_ms), MAX_TIME_MS)
    if time_started is not None:
        return max(0, min(int(time.time() * 1000) - time_started, MAX_TIME_MS))
    return None


@router.post("/label/{project_id}/submit", include_in_schema=False)
def label_submit(
    request: Request,
    project_id: int,
    db: Db,
    user: AnnotatorUser,
    settings: SettingsDep,
    task_id: Annotated[int, Form()],
    choice: Annotated[str | None, Form()] = None,
    strength: Annotated[str | None, Form()] = None,
    rank: Annotated[list[str] | None, Form()] = None,
    none_acceptable: Annotated[bool, Form()] = False,
    rationale: Annotated[str | None, Form()] = None,
    client_key: Annotated[str | None, Form()] = None,
    time_started: Annotated[int | None, Form()] = None,
    time_spent_ms: Annotated[str | None, Form()] = None,
) -> Response:
    """Store the verdict, then go to the next task; a resent form stores nothing twice.

    From label.js (an htmx-style request) the answer is the next task's block, leased in the
    same transaction; a plain form gets a redirect to the page.
    """
    fields = {
        **_verdict(choice, strength, rank or [], none_acceptable),
        "rationale": rationale,
        "client_key": client_key or None,
        "time_spent_ms": _time_spent(time_spent_ms, time_started),
    }
    if _is_htmx(request):
        page = judgments.record_then_next(
            db, project_id, task_id, user, now=utcnow(), rng=random.Random(), **fields
        )
        return _render_label_page(request, page, settings)
    judgments.record(db, task_id, user, now=utcnow(), **fields)
    return RedirectResponse(f"/label/{project_id}", status_code=303)


@router.post("/label/{project_id}/skip", include_in_schema=False)
def label_skip(
    request: Request,
    project_id: int,
    db: Db,
    user: AnnotatorUser,
    settings: SettingsDep,
    task_id: Annotated[int, Form()],
) -> Response:
    if _is_htmx(request):
        page = tasks.skip_then_next(
            db, project_id, task_id, user, now=utcnow(), rng=random.Random()
        )
        return _render_label_page(request, page, settings)
    tasks.skip(db, task_id, user)
    return RedirectResponse(f"/label/{project_id}", status_code=303)
