"""Snapshots: immutable, reproducible dataset versions that training reads.

A snapshot is a project's export filters *resolved* at one moment and a judgment-id cut-off:

- judgments are never edited or deleted, so "the selected judgments with id <= M" is the same
  set forever;
- filters that depend on changing state (annotator names, paused accounts, gold accuracy)
  are stored as the explicit list of annotator ids they selected at creation
  (``filter["selection"]``), next to the request as made (``filter["requested"]``);
- every export is in a deterministic row order with no time-dependent values, so exporting
  the same snapshot twice gives byte-identical files.

At creation the canonical pairs JSONL is hashed as it streams (constant memory) into
``row_count`` and ``sha256``; :func:`verify` recomputes both. Uploads never change what
was judged (a prompt upsert that would change a judged prompt's text or metadata is refused,
app.services.prompts), so a mismatch means the database was edited by other means.

On Postgres, creation takes a SHARE lock on ``judgments`` for its transaction: ids come from
a sequence in allocation order, not commit order, so without the lock a judgment with an id
below the cut-off could still commit after the snapshot was taken and appear in a later
export. The lock waits for in-flight labeling transactions and holds new ones back until the
snapshot's request commits (about the time of one export of the data).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.errors import NotFound
from app.models import Judgment, Snapshot
from app.services import export, projects, webhooks


@dataclass(frozen=True)
class Verification:
    ok: bool
    row_count: int
    sha256: str


def create(
    session: Session,
    project_id: int,
    filters: Mapping[str, Any],
    *,
    created_by: int | None,
) -> Snapshot:
    """Freeze the project's judgments selected by `filters` (export filter keys) now."""
    projects.get(session, project_id)
    parsed = export.parse_filters(filters)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("LOCK TABLE judgments IN SHARE MODE"))
    cutoff = int(
        session.scalar(select(func.max(Judgment.id)).where(Judgment.project_id == project_id)) or 0
    )
    selection = export.resolve(session, project_id, parsed, max_judgment_id=cutoff)
    row_count, sha256 = export.digest(session, project_id, selection)
    snapshot = Snapshot(
        project_id=project_id,
        filter={"requested": parsed.to_json(), "selection": selection.to_json()},
        max_judgment_id=cutoff,
        row_count=row_count,
        sha256=sha256,
        created_by=created_by,
    )
    session.add(snapshot)
    session.flush()
    webhooks.emit(
        session,
        project_id,
        "snapshot.created",
        {"snapshot_id": snapshot.id, "row_count": row_count, "sha256": sha256},
    )
    return snapshot


def get(session: Session, snapshot_id: int) -> Snapshot:
    snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None:
        raise NotFound(f"no snapshot {snapshot_id}")
    return snapshot


def list_for_project(session: Session, project_id: int) -> list[Snapshot]:
    """The project's snapshots, newest first."""
    projects.get(session, project_id)
    return list(
        session.scalars(
            select(Snapshot).where(Snapshot.project_id == project_id).order_by(Snapshot.id.desc())
        )
    )


def selection(snapshot: Snapshot) -> export.Selection:
    """The judgments a snapshot reads."""
    return export.Selection.from_json(
        (snapshot.filter or {}).get("selection") or {}, snapshot.max_judgment_id
    )


def filename(snapshot: Snapshot, shape: str, fmt: str) -> str:
    """e.g. ``snapshot-3-pairs.parquet``; hf is ``snapshot-3-pairs.tar.gz``."""
    return export.filename(snapshot.id, shape, fmt, prefix="snapshot")


def stream(
    session_factory: sessionmaker[Session],
    snapshot: Snapshot,
    *,
    shape: str,
    fmt: str,
    ties: bool = False,
) -> Iterator[bytes]:
    """The snapshot as a file in any shape and format (see app.services.export)."""
    name = filename(snapshot, shape, fmt).removesuffix("." + export.EXTENSIONS[fmt])
    return export.stream_selection(
        session_factory,
        snapshot.project_id,
        selection(snapshot),
        shape=shape,
        fmt=fmt,
        name=name,
        ties=ties,
    )


def rows(
    session: Session, snapshot_id: int, *, shape: str = "pairs", ties: bool = False
) -> Iterator[dict[str, Any]]:
    """The snapshot's rows as dicts, read through `session` (e.g. by a training job)."""
    snapshot = get(session, snapshot_id)
    return export.selection_rows(
        session, snapshot.project_id, selection(snapshot), shape=shape, ties=ties
    )


def verify(session: Session, snapshot_id: int) -> Verification:
    """Recompute the canonical pairs JSONL's row count and sha256 and compare."""
    snapshot = get(session, snapshot_id)
    row_count, sha256 = export.digest(session, snapshot.project_id, selection(snapshot))
    ok = row_count == snapshot.row_count and sha256 == snapshot.sha256
    return Verification(ok, row_count, sha256)


def describe(snapshot: Snapshot) -> dict[str, Any]:
    """The API's view of a snapshot (and the page's)."""
    stored = snapshot.filter or {}
    return {
        "id": snapshot.id,
        "project_id": snapshot.project_id,
        "filters": stored.get("requested", {}),
        "selection": stored.get("selection", {}),
        "max_judgment_id": snapshot.max_judgment_id,
        "row_count": snapshot.row_count,
        "sha256": snapshot.sha256,
        "created_by": snapshot.created_by,
        "created_at": export.iso(snapshot.created_at),
        "export_url": f"/api/v1/snapshots/{snapshot.id}/export",
    }
