"""The model registry over the JSON API and in the browser: list, download, score.

Scoring runs in a worker subprocess (the web process never imports torch), so the score
route is a plain ``def``: FastAPI runs it in its thread pool and the event loop stays free.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from app.deps import Db, ExportUser
from app.models import ModelKind
from app.schemas import ModelOut, ScoreIn, ScoreOut
from app.services import model_registry, projects
from app.web import render

router = APIRouter(tags=["models"])


@router.get("/api/v1/models", response_model=list[ModelOut])
def list_models(
    db: Db, user: ExportUser, project_id: int | None = None, kind: ModelKind | None = None
) -> list[ModelOut]:
    """Every model version, newest first, with its lineage and metrics (404 for an unknown
    `project_id`, as every project-scoped list)."""
    if project_id is not None:
        projects.get(db, project_id)
    rows = model_registry.list_models(db, project_id=project_id, kind=kind)
    return [ModelOut.model_validate(m) for m in rows]


@router.get("/api/v1/models/{model_id}", response_model=ModelOut)
def get_model(model_id: int, db: Db, user: ExportUser) -> ModelOut:
    return ModelOut.model_validate(model_registry.get(db, model_id))


@router.get(
    "/api/v1/models/{model_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}}}},
)
def download_model(model_id: int, db: Db, user: ExportUser) -> StreamingResponse:
    """The `save_pretrained` directory as a .tar.gz, built while it is sent."""
    filename, chunks = model_registry.archive(db, model_id)
    return StreamingResponse(
        chunks,
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post(
    "/api/v1/models/{model_id}/score",
    response_model=ScoreOut,
    responses={
        503: {"description": "the worker extra (torch) is not installed, or scoring failed"}
    },
)
def score(model_id: int, body: ScoreIn, db: Db, user: ExportUser) -> ScoreOut:
    """One reward per completion, in the order sent (reward models only)."""
    directory = model_registry.scorable_dir(db, model_id)
    # End the transaction before the model runs (its first load takes seconds): on SQLite an
    # open transaction holds the write lock and labeling would wait for it.
    db.commit()
    prompt = body.prompt_text()
    return ScoreOut(scores=model_registry.score_dir(directory, prompt, body.completions))


@router.get("/models", include_in_schema=False)
def models_page(request: Request, db: Db, user: ExportUser) -> Response:
    return render(
        request,
        "models/index.html",
        {
            "models": model_registry.list_models(db),
            "curve": model_registry.curve,
            "svg_polyline": model_registry.svg_polyline,
        },
    )
