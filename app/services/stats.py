"""Read-only counts for dashboards and /metrics."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Judgment, Project, Prompt, Task, User


def totals(session: Session) -> dict[str, int]:
    return {
        model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
        for model in (User, Project, Prompt, Task, Judgment)
    }
