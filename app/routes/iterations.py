"""The loop's iterations: per-policy win rates (people and reward model), KL, and the lineage.

Serving the report also refreshes the policies' "rejected" marks (app.services.winrate), so
what the page shows as rejected is what the verdicts say now.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.deps import Db, ExportUser
from app.domain import winrate as stats
from app.services import lineage, projects, winrate
from app.web import render

router = APIRouter(tags=["iterations"])


@router.get("/api/v1/projects/{project_id}/iterations")
def iterations(project_id: int, db: Db, user: ExportUser) -> dict[str, Any]:
    """One entry per policy version, oldest first: people's win rate against its parent and
    against the first policy (Wilson 95% interval, verdict), the reward model's predicted win
    rate on the judged pairs and on every generated pair, PPO's reward and KL at the best
    step, and whether people judged it worse than its parent (then it is marked rejected and
    the next PPO run starts from an earlier policy)."""
    report = winrate.refresh_marks(db, project_id)
    return {
        "project_id": project_id,
        "min_judgments": stats.MIN_JUDGMENTS,
        "iterations": [e.to_json() for e in report],
    }


@router.get("/api/v1/projects/{project_id}/lineage")
def lineage_graph(project_id: int, db: Db, user: ExportUser) -> dict[str, Any]:
    """Nodes (snapshots and data cut-offs, reward models, policies, generate jobs, judgments;
    oldest first) and the edges between them, each node with its links."""
    return lineage.graph(db, project_id).to_json()


@router.get("/projects/{project_id}/iterations", include_in_schema=False)
def iterations_page(request: Request, project_id: int, db: Db, user: ExportUser) -> Response:
    project = projects.get(db, project_id)
    report = winrate.refresh_marks(db, project_id)
    return render(
        request,
        "iterations/page.html",
        {
            "project": project,
            "report": [e.to_json() for e in report],
            "lineage": lineage.graph(db, project_id).to_json(),
            "min_judgments": stats.MIN_JUDGMENTS,
        },
    )
