"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import text

from app.deps import Db
from app.services import stats

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz(db: Db) -> dict[str, str]:
    db.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/metrics")
def metrics(request: Request, db: Db) -> Response:
    """Counts read from the database, so every web worker reports the same numbers."""
    registry = CollectorRegistry()
    totals = stats.totals(db)
    gauge = Gauge("prefloop_rows", "Rows per table", ["table"], registry=registry)
    for table, count in totals.items():
        gauge.labels(table=table).set(count)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
