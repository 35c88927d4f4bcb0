"""Labeling over the JSON API and in the browser: claim a task, heartbeat, skip, judge.

The browser page is a plain form that works without JavaScript; app/static/label.js adds the
keyboard shortcuts and the lease heartbeat on top.
"""

from __future__ import annotations

import random
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse

from app.deps import AnnotatorUser, Db, SettingsDep
from app.errors import InvalidInput
from app.models import utcnow
from app.schemas import CandidateView, JudgmentIn, JudgmentOut, LeaseOut, PromptView, TaskOut
from app.services import judgments, tasks
from app.web import render

router = APIRouter(tags=["labeling"])


# --- JSON API ----------------------------------------------------------------------------


@router.get(
    "/api/v1/projects/{project_id}/tasks/next",
    response_model=TaskOut,
    responses={204: {"description": "nothing is left for you in this project"}},
)
def next_task(project_id: int, db: Db, user: AnnotatorUser) -> TaskOut:
    """Lease the next task (or the one you already hold); 204 when nothing is left."""
    claim = tasks.claim_next(db, project_id, user, now=utcnow(), rng=random.Random())
    prompt = claim.prompt
    return TaskOut(
        task_id=claim.task.id,
        lease_expires_at=claim.lease_expires_at,
        prompt=PromptView(
            id=prompt.id, external_id=prompt.external_id, text=prompt.text, messages=prompt.messages
        ),
        candidates=[CandidateView(id=cid, text=text) for cid, text in claim.candidates],
        instructions=claim.project.instructions,
    )


@router.post("/api/v1/tasks/{task_id}/heartbeat", response_model=LeaseOut)
def heartbeat(task_id: int, db: Db, user: AnnotatorUser) -> LeaseOut:
    return LeaseOut(lease_expires_at=tasks.heartbeat(db, task_id, user, now=utcnow()))


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
def judge(
    task_id: int, body: JudgmentIn, db: Db, user: AnnotatorUser, response: Response
) -> JudgmentOut:
    """201 with the new judgment, or 200 with the stored one when `client_key` repeats."""
    judgment, created = judgments.record(
        db, task_id, user, **body.model_dump(exclude_none=True), now=utcnow()
    )
    if not created:
        response.status_code = 200
    return JudgmentOut.model_validate(judgment)


# --- browser pages -----------------------------------------------------------------------


@router.get("/label", include_in_schema=False)
def label_index(request: Request, db: Db, user: AnnotatorUser) -> Response:
    return render(request, "label/index.html", {"queues": tasks.queues(db)})


@router.get("/label/{project_id}", include_in_schema=False)
def label_page(
    request: Request, project_id: int, db: Db, user: AnnotatorUser, settings: SettingsDep
) -> Response:
    page = tasks.label_page(db, project_id, user, now=utcnow(), rng=random.Random())
    if page.claim is None:
        return render(request, "label/done.html", {"page": page}, block="content")
    return render(
        request,
        "label/task.html",
        {
            "page": page,
            "claim": page.claim,
            "labels": "ABCDEFGHIJ",
            "client_key": secrets.token_urlsafe(18),
            "time_started": int(time.time() * 1000),
            "heartbeat_s": settings.heartbeat_interval_s,
        },
        block="content",
    )


def _parse_choice(raw: str | None) -> int | str | None:
    """Radio values are completion ids, 'tie' or 'both_bad'."""
    if raw is None or raw == "":
        return None
    return int(raw) if raw.isdigit() else raw


@router.post("/label/{project_id}/submit", include_in_schema=False)
def label_submit(
    project_id: int,
    db: Db,
    user: AnnotatorUser,
    task_id: Annotated[int, Form()],
    choice: Annotated[str | None, Form()] = None,
    rationale: Annotated[str | None, Form()] = None,
    client_key: Annotated[str | None, Form()] = None,
    time_started: Annotated[int | None, Form()] = None,
) -> Response:
    """Store the verdict, then go to the next task; a resent form stores nothing twice."""
    parsed = _parse_choice(choice)
    if parsed is None:
        raise InvalidInput("choose A, B, Tie or Both bad before submitting")
    spent = None
    if time_started is not None:
        spent = max(0, min(int(time.time() * 1000) - time_started, 2**31 - 1))
    judgments.record(
        db,
        task_id,
        user,
        choice=parsed,
        rationale=rationale,
        client_key=client_key or None,
        time_spent_ms=spent,
        now=utcnow(),
    )
    return RedirectResponse(f"/label/{project_id}", status_code=303)


@router.post("/label/{project_id}/skip", include_in_schema=False)
def label_skip(
    project_id: int, db: Db, user: AnnotatorUser, task_id: Annotated[int, Form()]
) -> Response:
    tasks.skip(db, task_id, user)
    return RedirectResponse(f"/label/{project_id}", status_code=303)
