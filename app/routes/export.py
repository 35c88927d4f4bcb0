"""Dataset export: the streaming API download and the researcher's export page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from app.deps import Db, ExportUser
from app.services import export
from app.web import render

router = APIRouter(tags=["export"])

_KNOWN_PARAMS = {"shape", "format", "since", "until", "annotator"}


@router.get(
    "/api/v1/projects/{project_id}/export",
    response_class=StreamingResponse,
    responses={200: {"content": {t: {} for t in export.MEDIA_TYPES.values()}}},
)
def download(
    request: Request,
    project_id: int,
    user: ExportUser,
    db: Db,
    shape: Annotated[str, Query(description="pairs, rankings or raw")] = "pairs",
    fmt: Annotated[str, Query(alias="format", description="jsonl, csv or parquet")] = "jsonl",
    since: Annotated[str | None, Query(description="ISO date/datetime, inclusive")] = None,
    until: Annotated[
        str | None, Query(description="ISO datetime exclusive; a bare date includes that day")
    ] = None,
    annotator: Annotated[
        list[str] | None, Query(description="username; repeat for several")
    ] = None,
) -> Response:
    """Stream the project's judgments as a dataset file (admins and researchers).

    Unknown query parameters are passed on as filters so that a typo (``anotator=``) is a 422,
    not a silently unfiltered export. The body is read in its own session: the request's is
    closed before streaming starts.
    """
    filters: dict[str, object] = {"since": since, "until": until, "annotator": annotator or []}
    filters |= {k: v for k, v in request.query_params.items() if k not in _KNOWN_PARAMS}
    chunks = export.stream(
        request.app.state.sessionmaker,
        project_id,
        shape=shape,
        fmt=fmt,
        filters=filters,
        session=db,
    )
    name = export.filename(project_id, shape, fmt)
    return StreamingResponse(
        chunks,
        media_type=export.media_type(fmt),
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.get("/projects/{project_id}/export", include_in_schema=False)
def page(request: Request, project_id: int, user: ExportUser, db: Db) -> Response:
    """Download links for every shape and format, and how to load them into datasets / TRL."""
    return render(
        request,
        "export/page.html",
        {
            "overview": export.overview(db, project_id),
            "shapes": export.SHAPES,
            "formats": export.FORMATS,
            "columns": export.COLUMNS,
        },
    )
