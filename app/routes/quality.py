"""The quality report: agreement, consensus, source strengths and bias audits."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.deps import Db, ExportUser
from app.domain import bias
from app.services import quality
from app.web import render

router = APIRouter(tags=["quality"])

FastMs = Annotated[
    int, Query(ge=100, le=600_000, description="judgments faster than this are 'fast' (ms)")
]


@router.get("/api/v1/projects/{project_id}/quality")
def quality_report(
    project_id: int, db: Db, user: ExportUser, fast_ms: FastMs = bias.FAST_MS
) -> dict[str, Any]:
    """Agreement (pairwise, Krippendorff's alpha), per-annotator audits (agreement with the
    others' consensus, gold accuracy, position and length bias, speed) and Bradley–Terry
    strengths of completion sources with bootstrap intervals."""
    return quality.report(db, project_id, fast_ms=fast_ms).to_json()


@router.get("/projects/{project_id}/quality", include_in_schema=False)
def quality_page(
    request: Request, project_id: int, db: Db, user: ExportUser, fast_ms: FastMs = bias.FAST_MS
) -> Response:
    return render(
        request,
        "quality/page.html",
        {"q": quality.report(db, project_id, fast_ms=fast_ms).to_json()},
    )
