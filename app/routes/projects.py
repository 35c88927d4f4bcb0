"""Projects and prompt uploads: the JSON API and the admin / researcher pages."""

from __future__ import annotations

import random
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import RedirectResponse, Response

from app.deps import AdminUser, CurrentUser, Db, ExportUser, SettingsDep
from app.errors import Conflict, InvalidInput, InvalidUpload, UploadTooLarge
from app.models import Role
from app.schemas import (
    ImportOut,
    ProjectBrief,
    ProjectDetail,
    ProjectIn,
    ProjectOut,
    ProjectUpdate,
)
from app.services import projects, prompts, winrate
from app.web import render

router = APIRouter()
FLASH_KEY = "projects_flash"
SETTINGS_FLASH_KEY = "project_settings_saved"


# --- JSON API ---------------------------------------------------------------------------------


@router.post("/api/v1/projects", status_code=201, tags=["projects"])
def create_project(body: ProjectIn, user: AdminUser, db: Db) -> ProjectOut:
    project = projects.create(db, **body.model_dump(), created_by=user.id)
    return ProjectOut.model_validate(project)


@router.get("/api/v1/projects", tags=["projects"])
def list_projects(user: CurrentUser, db: Db) -> list[ProjectOut] | list[ProjectBrief]:
    """Admins and researchers get the full settings; annotators only what they label by."""
    found = projects.list_all(db)
    if user.role is Role.annotator:
        return [ProjectBrief.model_validate(p) for p in found]
    return [ProjectOut.model_validate(p) for p in found]


@router.get("/api/v1/projects/{project_id}", tags=["projects"])
def get_project(project_id: int, user: CurrentUser, db: Db) -> ProjectDetail | ProjectBrief:
    """Settings and progress counts; annotators get the brief view (name, instructions)."""
    project, counts = projects.detail(db, project_id)
    if user.role is Role.annotator:
        return ProjectBrief.model_validate(project)
    return ProjectDetail.model_validate(
        {**ProjectOut.model_validate(project).model_dump(), "progress": counts}
    )


@router.patch("/api/v1/projects/{project_id}", tags=["projects"])
def update_project(project_id: int, body: ProjectUpdate, user: AdminUser, db: Db) -> ProjectOut:
    """Change name, instructions, judgments per task (applies to existing tasks: raising it
    reopens done ones), lease length or gold rate; fields left out stay as they are."""
    project = projects.update(db, project_id, body.model_dump(exclude_unset=True))
    return ProjectOut.model_validate(project)


@router.post("/api/v1/projects/{project_id}/prompts", status_code=201, tags=["projects"])
def upload_prompts(
    project_id: int,
    user: AdminUser,
    db: Db,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL, CSV or Parquet; all or nothing")],
    upsert: Annotated[
        bool,
        Form(
            description="update prompts whose ids exist: add new completions, replace text "
            "and metadata (a row without metadata keeps it); refused for a judged prompt's "
            "text or metadata and a leased prompt's text"
        ),
    ] = False,
) -> ImportOut:
    data = file.file.read(settings.max_upload_bytes + 1)
    result = prompts.import_upload(
        db,
        project_id,
        file.filename or "",
        data,
        upsert=upsert,
        rng=random.Random(),
        settings=settings,
    )
    return ImportOut(**_counts(result), notes=list(result.notes), summary=result.summary())


# --- pages ------------------------------------------------------------------------------------


@router.get("/projects", include_in_schema=False)
def projects_page(request: Request, user: ExportUser, db: Db) -> Response:
    return _render_list(request, db)


@router.post("/projects", include_in_schema=False)
def create_project_form(
    request: Request,
    user: AdminUser,
    db: Db,
    name: Annotated[str, Form()] = "",
    mode: Annotated[str, Form()] = "pairwise",
    instructions: Annotated[str, Form()] = "",
    judgments_per_task: Annotated[str, Form()] = "1",
    candidates_per_task: Annotated[str, Form()] = "",
    lease_seconds: Annotated[str, Form()] = "300",
    gold_rate: Annotated[str, Form()] = "0",
) -> Response:
    """Create from the plain form; a bad value re-renders the form with the message."""
    form = {
        "name": name,
        "mode": mode,
        "instructions": instructions,
        "judgments_per_task": judgments_per_task,
        "candidates_per_task": candidates_per_task,
        "lease_seconds": lease_seconds,
        "gold_rate": gold_rate,
    }
    try:
        project = projects.create(
            db,
            name=name,
            mode=mode,
            instructions=instructions,
            judgments_per_task=_form_int(judgments_per_task, "judgments per task", default=1),
            candidates_per_task=_form_int(candidates_per_task, "candidates per task"),
            lease_seconds=_form_int(lease_seconds, "lease seconds", default=300),
            gold_rate=_form_float(gold_rate, "gold rate", default=0.0),
            created_by=user.id,
        )
    except (InvalidInput, Conflict) as exc:
        return _render_list(
            request, db, form=form, error=_in_words(exc.message), status_code=exc.status
        )
    return RedirectResponse(f"/projects/{project.id}", status_code=303)


@router.get("/projects/{project_id}", include_in_schema=False)
def project_page(request: Request, project_id: int, user: ExportUser, db: Db) -> Response:
    result = request.session.pop(FLASH_KEY, None)
    if result is not None and result.get("project_id") != project_id:
        result = None
    saved = request.session.pop(SETTINGS_FLASH_KEY, None) == project_id
    return _render_detail(request, db, project_id, result=result, settings_saved=saved)


@router.post("/projects/{project_id}/settings", include_in_schema=False)
def settings_form(
    request: Request,
    project_id: int,
    user: AdminUser,
    db: Db,
    name: Annotated[str, Form()] = "",
    instructions: Annotated[str, Form()] = "",
    judgments_per_task: Annotated[str, Form()] = "",
    lease_seconds: Annotated[str, Form()] = "",
    gold_rate: Annotated[str, Form()] = "",
) -> Response:
    """Save the settings form; a bad value re-renders the page with the message and the
    values as typed, and changes nothing."""
    form = {
        "name": name,
        "instructions": instructions,
        "judgments_per_task": judgments_per_task,
        "lease_seconds": lease_seconds,
        "gold_rate": gold_rate,
    }
    project = projects.get(db, project_id)
    try:
        projects.update(
            db,
            project_id,
            {
                "name": name,
                "instructions": instructions,
                "judgments_per_task": _form_int(
                    judgments_per_task, "judgments per task", project.judgments_per_task
                ),
                "lease_seconds": _form_int(lease_seconds, "lease seconds", project.lease_seconds),
                "gold_rate": _form_float(gold_rate, "gold rate", project.gold_rate),
            },
        )
    except (InvalidInput, Conflict) as exc:  # checked before anything changed
        return _render_detail(
            request,
            db,
            project_id,
            settings_form=form,
            settings_error=_in_words(exc.message),
            status_code=exc.status,
        )
    request.session[SETTINGS_FLASH_KEY] = project_id
    return RedirectResponse(f"/projects/{project_id}#settings", status_code=303)


@router.post("/projects/{project_id}/prompts/upload", include_in_schema=False)
def upload_form(
    request: Request,
    project_id: int,
    user: AdminUser,
    db: Db,
    settings: SettingsDep,
    file: Annotated[UploadFile, File()],
    upsert: Annotated[bool, Form()] = False,
) -> Response:
    """Upload from the page: success redirects (counts shown once), a bad file re-renders
    the page with a table of every bad line."""
    data = file.file.read(settings.max_upload_bytes + 1)
    filename = file.filename or ""
    try:
        result = prompts.import_upload(
            db, project_id, filename, data, upsert=upsert, rng=random.Random(), settings=settings
        )
    except (InvalidUpload, UploadTooLarge) as exc:
        failure = {
            "filename": filename,
            "message": exc.message,
            "errors": getattr(exc, "errors", []),
        }
        return _render_detail(request, db, project_id, failure=failure, status_code=exc.status)
    request.session[FLASH_KEY] = {
        "project_id": project_id,
        "filename": filename,
        "summary": result.summary(),
        **_counts(result),
    }
    return RedirectResponse(f"/projects/{project_id}", status_code=303)


# --- helpers ----------------------------------------------------------------------------------


def _counts(result: prompts.ImportResult) -> dict[str, int]:
    return {
        "rows": result.rows,
        "prompts_created": result.prompts_created,
        "prompts_updated": result.prompts_updated,
        "completions_created": result.completions_created,
        "tasks_created": result.tasks_created,
    }


def _form_int(value: str, label: str, default: int | None = None) -> Any:
    """A number typed into a form; blank means `default`."""
    value = value.strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"{label} must be a whole number, not {value!r}") from None


_FIELD_WORDS = {
    "judgments_per_task": "Judgments per task",
    "candidates_per_task": "Candidates per task",
    "lease_seconds": "Lease (seconds)",
    "gold_rate": "Gold rate",
    "name": "Name",
    "instructions": "Instructions",
}


def _in_words(message: str) -> str:
    """A service message for a form: the field's label instead of its API name."""
    for field, label in _FIELD_WORDS.items():
        if message.startswith(field + " "):
            return label + message[len(field) :]
    return message


def _form_float(value: str, label: str, default: float) -> Any:
    """A decimal number typed into a form; blank means `default`."""
    value = value.strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise InvalidInput(f"{label} must be a number, not {value!r}") from None


def _render_list(
    request: Request,
    db: Db,
    *,
    form: dict[str, str] | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    context: dict[str, Any] = {
        "items": projects.list_with_progress(db),
        "form": form or {"mode": "pairwise", "judgments_per_task": "1"},
        "error": error,
    }
    return render(request, "projects/list.html", context, status_code=status_code)


def _render_detail(
    request: Request,
    db: Db,
    project_id: int,
    *,
    result: dict[str, Any] | None = None,
    failure: dict[str, Any] | None = None,
    settings_form: dict[str, str] | None = None,
    settings_error: str | None = None,
    settings_saved: bool = False,
    status_code: int = 200,
) -> Response:
    project, counts = projects.detail(db, project_id)
    context = {
        "project": project,
        "progress": counts,
        "result": result,
        "failure": failure,
        "settings_form": settings_form,
        "settings_error": settings_error,
        "settings_saved": settings_saved,
    }
    viewer = getattr(request.state, "user", None)
    if viewer is not None and viewer.role in (Role.admin, Role.researcher):
        # The loop's three curves (people's win rate, the reward model's, KL) per policy.
        context["report"] = [e.to_json() for e in winrate.policy_report(db, project_id)]
    return render(request, "projects/detail.html", context, status_code=status_code)
