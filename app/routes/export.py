"""Preference datasets: the streaming export download, the researcher's export page, and
importing existing preference data."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse

from app.deps import AdminUser, Db, ExportUser, SettingsDep
from app.errors import InvalidInput
from app.services import export, preference_import
from app.web import render

router = APIRouter(tags=["export"])

_LIST_PARAMS = ("annotator", "exclude_annotator", "meta")


def filters_from_query(request: Request, *, skip: set[str]) -> dict[str, Any]:
    """Every query parameter but `skip` is a filter, so a typo (``anotator=``) is a 422, not a
    silently unfiltered export. Repeatable ones (annotator, exclude_annotator, meta,
    meta.<key>) become lists."""
    filters: dict[str, Any] = {}
    for key in request.query_params:
        if key in skip or key in filters:
            continue
        values = request.query_params.getlist(key)
        repeatable = key in _LIST_PARAMS or key.startswith(export.META_PREFIX)
        filters[key] = values if repeatable else values[-1]
    return filters


def parse_ties(ties: str) -> bool:
    if ties not in ("drop", "keep"):
        raise InvalidInput(f"ties must be drop or keep, not {ties!r}")
    return ties == "keep"


@dataclasses.dataclass(frozen=True)
class FileRequest:
    """What a dataset download asks for: its shape, its file format, and tied pairs or not."""

    shape: str
    fmt: str
    keep_ties: bool

    PARAMS = frozenset({"shape", "format", "ties"})


def file_request(
    shape: Annotated[str, Query(description="pairs, rankings or raw")] = "pairs",
    fmt: Annotated[
        str, Query(alias="format", description="jsonl, csv, parquet or hf (a .tar.gz)")
    ] = "jsonl",
    ties: Annotated[str, Query(description="pairs: drop (default) or keep tied pairs")] = "drop",
) -> FileRequest:
    return FileRequest(shape, fmt, parse_ties(ties))


FileChoice = Annotated[FileRequest, Depends(file_request)]


def attachment(chunks: Iterator[bytes], fmt: str, filename: str) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type=export.media_type(fmt),
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


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
    file: FileChoice,
    since: Annotated[str | None, Query(description="ISO date/datetime, inclusive")] = None,
    until: Annotated[
        str | None, Query(description="ISO datetime exclusive; a bare date includes that day")
    ] = None,
    annotator: Annotated[
        list[str] | None, Query(description="username; repeat for several")
    ] = None,
    exclude_annotator: Annotated[
        list[str] | None, Query(description="username to leave out; repeat for several")
    ] = None,
    min_agreement: Annotated[
        str | None, Query(description="0-1: tasks whose judgments agree at least this much")
    ] = None,
    min_gold_accuracy: Annotated[
        str | None, Query(description="0-1: annotators at least this accurate on gold items")
    ] = None,
    exclude_paused: Annotated[
        str | None, Query(description="true: leave out paused annotators")
    ] = None,
) -> Response:
    """Stream the project's judgments as a dataset file (admins and researchers).

    Prompt metadata filters are ``meta.<key>=<value>`` (repeat for any of several values).
    The body is read in its own session: the request's is closed before streaming starts.
    """
    del annotator, exclude_annotator, since, until, min_agreement, min_gold_accuracy
    del exclude_paused  # declared for the OpenAPI page; read generically below
    chunks = export.stream(
        request.app.state.sessionmaker,
        project_id,
        shape=file.shape,
        fmt=file.fmt,
        filters=filters_from_query(request, skip=set(FileRequest.PARAMS)),
        session=db,
        ties=file.keep_ties,
    )
    return attachment(chunks, file.fmt, export.filename(project_id, file.shape, file.fmt))


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
            "filenames": {
                (shape, fmt): export.filename(project_id, shape, fmt)
                for shape in export.SHAPES
                for fmt in export.FORMATS
            },
        },
    )


# --- importing preference data ------------------------------------------------------------


@router.post("/api/v1/projects/{project_id}/preferences", status_code=201, tags=["export"])
def import_preferences(
    project_id: int,
    user: AdminUser,
    db: Db,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL or Parquet of prompt/chosen/rejected")],
    annotator: Annotated[str, Form(description="the external annotator's username")],
) -> dict[str, Any]:
    """Import public preference data (e.g. HH-RLHF) as judgments of a named external
    annotator, all or nothing; a bad file is a 422 listing every bad line."""
    data = file.file.read(settings.max_upload_bytes + 1)
    result = preference_import.import_file(
        db, project_id, file.filename or "", data, annotator=annotator, settings=settings
    )
    return {**dataclasses.asdict(result), "summary": result.summary()}
