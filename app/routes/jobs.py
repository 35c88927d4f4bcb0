"""Jobs over the JSON API and in the browser: start training, watch it run, cancel it.

The job page polls its own "status" block with htmx every two seconds while the job is
queued or running, and stops polling once it reaches a final state.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import RedirectResponse

from app.deps import AdminUser, Db, ExportUser
from app.errors import Conflict, InvalidInput
from app.models import utcnow
from app.schemas import JobCreate, JobOut
from app.services import jobs
from app.web import render

router = APIRouter(tags=["jobs"])


# --- JSON API ----------------------------------------------------------------------------


@router.post("/api/v1/projects/{project_id}/jobs", response_model=JobOut, status_code=201)
def create_job(project_id: int, body: JobCreate, db: Db, user: AdminUser) -> JobOut:
    """Queue a job; 409 when the project already has a reward job queued or running."""
    job = jobs.enqueue(db, project_id, body.kind, body.params, user.id)
    return JobOut.model_validate(job)


@router.get("/api/v1/projects/{project_id}/jobs", response_model=list[JobOut])
def project_jobs(
    project_id: int, db: Db, user: ExportUser, kind: str | None = None
) -> list[JobOut]:
    """The project's training jobs, newest first; `?kind=` one kind (`webhook`: deliveries)."""
    if kind is not None and kind not in jobs.KINDS:
        raise InvalidInput(f"unknown job kind {kind!r}; expected one of {', '.join(jobs.KINDS)}")
    kinds = jobs.TRAINING_KINDS if kind is None else (kind,)
    return [JobOut.model_validate(j) for j in jobs.list_for_project(db, project_id, kinds=kinds)]


@router.get("/api/v1/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: int, db: Db, user: ExportUser) -> JobOut:
    """State, progress (step, loss, ETA), final metrics, error, attempts and timestamps."""
    return JobOut.model_validate(jobs.get(db, job_id))


@router.post("/api/v1/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: int, db: Db, user: AdminUser) -> JobOut:
    """A queued job never runs; a running one stops at its worker's next heartbeat."""
    return JobOut.model_validate(jobs.cancel(db, job_id, now=utcnow()))


# --- browser pages -----------------------------------------------------------------------


def _form_params(
    epochs: str | None,
    lr: str | None,
    batch_size: str | None,
    backbone: str | None,
    extra: str | None,
) -> dict[str, Any]:
    """The start-training form as trainer params; blank fields keep the trainer's defaults."""
    params: dict[str, Any] = {}
    if extra and extra.strip():
        try:
            parsed = json.loads(extra)
        except ValueError as exc:
            raise InvalidInput(f"extra parameters are not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidInput("extra parameters must be a JSON object")
        params.update(parsed)
    numbers: list[tuple[str, str | None, type, str]] = [
        ("epochs", epochs, int, "a whole number"),
        ("lr", lr, float, "a number"),
        ("batch_size", batch_size, int, "a whole number"),
    ]
    for name, raw, cast, what in numbers:
        if raw is not None and raw.strip():
            try:
                params[name] = cast(raw.strip())
            except ValueError:
                raise InvalidInput(f"{name} must be {what}, not {raw.strip()!r}") from None
    if backbone and backbone.strip():
        params["backbone"] = backbone.strip()
    return params


def _render_jobs(
    request: Request,
    db: Db,
    project_id: int,
    *,
    form: dict[str, str] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    project, rows = jobs.overview(db, project_id)
    context = {
        "project": project,
        "jobs": rows,
        "kinds": jobs.USER_KINDS,
        "eta_text": jobs.eta_text,
        "form": form or {},
        "error": error,
    }
    # A failed start re-renders the whole page (its form); the poll asks for the jobs block.
    block = "jobs" if error is None else None
    return render(request, "jobs/project.html", context, block=block, status_code=status_code)


@router.get("/projects/{project_id}/jobs", include_in_schema=False)
def jobs_page(request: Request, project_id: int, db: Db, user: ExportUser) -> Response:
    return _render_jobs(request, db, project_id)


@router.post("/projects/{project_id}/jobs", include_in_schema=False)
def start_job(
    request: Request,
    project_id: int,
    db: Db,
    user: AdminUser,
    kind: Annotated[str, Form()] = jobs.REWARD,
    epochs: Annotated[str | None, Form()] = None,
    lr: Annotated[str | None, Form()] = None,
    batch_size: Annotated[str | None, Form()] = None,
    backbone: Annotated[str | None, Form()] = None,
    extra: Annotated[str | None, Form()] = None,
) -> Response:
    """Start a job from the form; a bad value or a running reward job re-renders the form
    with the message and what was typed."""
    form = {
        "kind": kind,
        "epochs": epochs or "",
        "lr": lr or "",
        "batch_size": batch_size or "",
        "backbone": backbone or "",
        "extra": extra or "",
    }
    try:
        params = _form_params(epochs, lr, batch_size, backbone, extra)
        job = jobs.enqueue(db, project_id, kind, params, user.id)
    except (InvalidInput, Conflict) as exc:
        return _render_jobs(
            request, db, project_id, form=form, error=exc.message, status_code=exc.status
        )
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.get("/jobs/{job_id}", include_in_schema=False)
def job_page(request: Request, job_id: int, db: Db, user: ExportUser) -> Response:
    job = jobs.get(db, job_id)
    context = {
        "job": job,
        "eta_text": jobs.eta_text,
        "active": job.state in jobs.ACTIVE_STATES,
        "json_text": _json_text,
    }
    return render(request, "jobs/job.html", context, block="status")


def _json_text(value: Any) -> str:
    """A param as the JSON it was sent as (true, not True); autoescaped by the template."""
    return json.dumps(value, ensure_ascii=False)


@router.post("/jobs/{job_id}/cancel", include_in_schema=False)
def cancel_job_form(job_id: int, db: Db, user: AdminUser) -> Response:
    jobs.cancel(db, job_id, now=utcnow())
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
