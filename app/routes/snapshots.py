"""Snapshots: freeze a filtered view of a project's judgments, list them, export them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.deps import Db, ExportUser
from app.errors import InvalidInput
from app.routes.export import FileChoice, FileRequest, attachment
from app.services import export, projects, snapshots
from app.web import render

router = APIRouter(tags=["snapshots"])


class SnapshotIn(BaseModel):
    """Export filters (see ``GET /api/v1/projects/{id}/export``): since, until, annotator,
    exclude_annotator, min_agreement, min_gold_accuracy, exclude_paused, meta."""

    model_config = ConfigDict(extra="forbid")

    filters: dict[str, Any] = Field(default_factory=dict)


@router.post("/api/v1/projects/{project_id}/snapshots", status_code=201)
def create_snapshot(
    project_id: int, db: Db, user: ExportUser, body: SnapshotIn | None = None
) -> dict[str, Any]:
    """Freeze the judgments the filters select now: row count and sha256 of the pairs JSONL."""
    filters = body.filters if body is not None else {}
    return snapshots.describe(snapshots.create(db, project_id, filters, created_by=user.id))


@router.get("/api/v1/projects/{project_id}/snapshots")
def list_snapshots(project_id: int, db: Db, user: ExportUser) -> list[dict[str, Any]]:
    return [snapshots.describe(s) for s in snapshots.list_for_project(db, project_id)]


@router.get("/api/v1/snapshots/{snapshot_id}")
def get_snapshot(snapshot_id: int, db: Db, user: ExportUser) -> dict[str, Any]:
    return snapshots.describe(snapshots.get(db, snapshot_id))


@router.get("/api/v1/snapshots/{snapshot_id}/verify")
def verify_snapshot(snapshot_id: int, db: Db, user: ExportUser) -> dict[str, Any]:
    """Recompute the row count and sha256 and say whether they still match."""
    result = snapshots.verify(db, snapshot_id)
    return {"ok": result.ok, "row_count": result.row_count, "sha256": result.sha256}


@router.get(
    "/api/v1/snapshots/{snapshot_id}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {t: {} for t in export.MEDIA_TYPES.values()}}},
)
def export_snapshot(
    request: Request,
    snapshot_id: int,
    db: Db,
    user: ExportUser,
    file: FileChoice,
) -> Response:
    """The snapshot as a file; the same request always returns the same bytes."""
    unknown = sorted(set(request.query_params) - FileRequest.PARAMS)
    if unknown:
        raise InvalidInput(
            f"unknown parameter(s) {', '.join(unknown)}: a snapshot's filters are fixed",
            unknown=unknown,
        )
    snapshot = snapshots.get(db, snapshot_id)
    chunks = snapshots.stream(
        request.app.state.sessionmaker,
        snapshot,
        shape=file.shape,
        fmt=file.fmt,
        ties=file.keep_ties,
    )
    return attachment(chunks, file.fmt, snapshots.filename(snapshot, file.shape, file.fmt))


# --- pages ------------------------------------------------------------------------------


def _render(
    request: Request, db: Db, project_id: int, *, error: str | None = None, status_code: int = 200
) -> Response:
    context = {
        "project": projects.get(db, project_id),
        "snapshots": [snapshots.describe(s) for s in snapshots.list_for_project(db, project_id)],
        "shapes": export.SHAPES,
        "formats": export.FORMATS,
        "error": error,
    }
    return render(request, "snapshots/index.html", context, status_code=status_code)


@router.get("/projects/{project_id}/snapshots", include_in_schema=False)
def snapshots_page(request: Request, project_id: int, db: Db, user: ExportUser) -> Response:
    return _render(request, db, project_id)


@router.post("/projects/{project_id}/snapshots", include_in_schema=False)
def create_snapshot_form(
    request: Request,
    project_id: int,
    db: Db,
    user: ExportUser,
    since: Annotated[str, Form()] = "",
    until: Annotated[str, Form()] = "",
    annotator: Annotated[str, Form()] = "",
    exclude_annotator: Annotated[str, Form()] = "",
    min_agreement: Annotated[str, Form()] = "",
    min_gold_accuracy: Annotated[str, Form()] = "",
    exclude_paused: Annotated[str, Form()] = "",
    meta: Annotated[str, Form()] = "",
) -> Response:
    """Create from the page's form (names comma-separated); a bad value re-renders it."""
    filters = {
        "since": since,
        "until": until,
        "annotator": [n for n in annotator.split(",") if n.strip()],
        "exclude_annotator": [n for n in exclude_annotator.split(",") if n.strip()],
        "min_agreement": min_agreement,
        "min_gold_accuracy": min_gold_accuracy,
        "exclude_paused": exclude_paused,
        "meta": [m for m in meta.split(",") if m.strip()],
    }
    try:
        snapshots.create(db, project_id, filters, created_by=user.id)
    except InvalidInput as exc:
        return _render(request, db, project_id, error=exc.message, status_code=exc.status)
    return RedirectResponse(f"/projects/{project_id}/snapshots", status_code=303)
