"""Project monitoring for admins (page and JSON) and gold answers.

`/projects/{id}/admin` shows tasks by state, judgments per annotator per day, annotators with
gold accuracy and speed (and a pause button), open leases and gold tasks. The same data is
under `/api/v1/projects/{id}/...`; `POST /api/v1/tasks/{id}/gold` sets a task's known answer.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict

from app.deps import AdminUser, Db
from app.errors import InvalidInput, NotFound
from app.models import utcnow
from app.services import gold, monitoring, retire, users
from app.web import render

router = APIRouter(tags=["admin"])
Days = Annotated[int, Query(ge=1, le=monitoring.MAX_DAYS)]


class GoldIn(BaseModel):
    """`answer`: a completion id (the winner), "tie" (pairs), a ranking of completion ids
    best first (`[id, [id, id], ...]`, only its top group is scored), or null to make the
    task normal again."""

    answer: int | str | list[int | list[int]] | None


class GoldTaskOut(BaseModel):
    task_id: int
    is_gold: bool
    gold_answer: list[list[int]] | None
    state: str


class GoldStatsOut(BaseModel):
    task_id: int
    prompt_id: int
    answer: list[list[int]]
    judged: int
    correct: int


class TaskStatesOut(BaseModel):
    open: int
    in_progress: int
    done: int
    retired: int
    leased: int
    gold: int
    total: int


class AnnotatorOut(BaseModel):
    user_id: int
    username: str
    active: bool
    judgments: int
    gold_judged: int
    gold_correct: int
    gold_accuracy: float | None
    median_seconds: float | None
    last_judgment_at: datetime | None


class ActivityOut(BaseModel):
    """`counts[username]` has one number per entry of `days` (UTC dates, oldest first)."""

    days: list[date]
    counts: dict[str, list[int]]
    totals: list[int]


class LeaseOut(BaseModel):
    task_id: int
    prompt_external_id: str
    user_id: int
    username: str
    created_at: datetime
    expires_at: datetime
    expires_in_s: float


class LeasesOut(BaseModel):
    count: int
    leases: list[LeaseOut]


class MonitorOut(BaseModel):
    project_id: int
    tasks: TaskStatesOut
    annotators: list[AnnotatorOut]
    activity: ActivityOut
    leases: LeasesOut
    gold_tasks: list[GoldStatsOut]


def _tasks_out(states: monitoring.TaskStates) -> TaskStatesOut:
    return TaskStatesOut(**vars(states), total=states.total)


def _annotators_out(rows: list[monitoring.AnnotatorStats]) -> list[AnnotatorOut]:
    return [AnnotatorOut(**vars(a), gold_accuracy=a.gold_accuracy) for a in rows]


def _activity_out(act: monitoring.Activity) -> ActivityOut:
    names = dict(act.users)
    return ActivityOut(
        days=act.days,
        counts={names[u]: counts for u, counts in act.counts.items()},
        totals=act.totals,
    )


def _leases_out(table: monitoring.LeaseTable) -> LeasesOut:
    rows = [
        LeaseOut(**{k: v for k, v in vars(row).items() if k != "is_gold"}) for row in table.rows
    ]
    return LeasesOut(count=table.count, leases=rows)


def _gold_out(rows: list[gold.GoldTaskStats]) -> list[GoldStatsOut]:
    return [GoldStatsOut(**vars(r)) for r in rows]


# --- JSON API ----------------------------------------------------------------------------


@router.get("/api/v1/projects/{project_id}/monitor")
def monitor(project_id: int, db: Db, _admin: AdminUser, days: Days = 14) -> MonitorOut:
    """Everything the admin page shows, in one response."""
    o = monitoring.overview(db, project_id, now=utcnow(), days=days)
    return MonitorOut(
        project_id=project_id,
        tasks=_tasks_out(o.tasks),
        annotators=_annotators_out(o.annotators),
        activity=_activity_out(o.activity),
        leases=_leases_out(o.leases),
        gold_tasks=_gold_out(o.gold_tasks),
    )


@router.get("/api/v1/projects/{project_id}/annotators")
def annotators(project_id: int, db: Db, _admin: AdminUser) -> list[AnnotatorOut]:
    """Annotators who judged here: counts (gold apart), gold accuracy, median seconds."""
    return _annotators_out(monitoring.annotators(db, project_id))


@router.get("/api/v1/projects/{project_id}/activity")
def activity(project_id: int, db: Db, _admin: AdminUser, days: Days = 14) -> ActivityOut:
    """Judgments per annotator per UTC day."""
    return _activity_out(monitoring.activity(db, project_id, now=utcnow(), days=days))


@router.get("/api/v1/projects/{project_id}/leases")
def leases(project_id: int, db: Db, _admin: AdminUser) -> LeasesOut:
    """Leases alive now, soonest to expire first (at most 500 listed; `count` is exact)."""
    return _leases_out(monitoring.open_leases(db, project_id, now=utcnow()))


@router.get("/api/v1/projects/{project_id}/gold")
def gold_tasks(project_id: int, db: Db, _admin: AdminUser) -> list[GoldStatsOut]:
    """Gold tasks with how many annotators judged them and how many got them right."""
    return _gold_out(monitoring.gold_tasks(db, project_id))


@router.post("/api/v1/tasks/{task_id}/gold")
def set_gold(task_id: int, body: GoldIn, db: Db, _admin: AdminUser) -> GoldTaskOut:
    """Mark a task gold with its known answer (`null` makes it a normal task again)."""
    task = gold.mark(db, task_id, body.answer)
    return GoldTaskOut(
        task_id=task.id, is_gold=task.is_gold, gold_answer=task.gold_answer, state=task.state.value
    )


class RetireIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retired: bool = True


class RetiredTaskOut(BaseModel):
    task_id: int
    prompt_id: int
    state: str


@router.post("/api/v1/tasks/{task_id}/retire")
def retire_task(
    task_id: int, db: Db, _admin: AdminUser, body: RetireIn | None = None
) -> RetiredTaskOut:
    """Take a task out of the labeling pool (`{"retired": false}` puts it back). Its
    judgments stay in exports and training; its leases are dropped."""
    task = retire.set_retired(db, task_id, body.retired if body else True)
    return RetiredTaskOut(task_id=task.id, prompt_id=task.prompt_id, state=task.state.value)


@router.post("/api/v1/prompts/{prompt_id}/retire")
def retire_prompt(
    prompt_id: int, db: Db, _admin: AdminUser, body: RetireIn | None = None
) -> list[RetiredTaskOut]:
    """The same for every task of a prompt."""
    tasks = retire.set_prompt_retired(db, prompt_id, body.retired if body else True)
    return [RetiredTaskOut(task_id=t.id, prompt_id=t.prompt_id, state=t.state.value) for t in tasks]


# --- pages ----------------------------------------------------------------------------------


@router.get("/projects/{project_id}/admin", include_in_schema=False)
def admin_page(
    request: Request, project_id: int, db: Db, _admin: AdminUser, days: Days = 14
) -> Response:
    overview = monitoring.overview(db, project_id, now=utcnow(), days=days)
    return render(request, "admin/project.html", {"o": overview, "days": days}, block="live")


@router.post("/projects/{project_id}/admin/users/{user_id}/active", include_in_schema=False)
def admin_set_active(
    project_id: int, user_id: int, db: Db, _admin: AdminUser, active: Annotated[bool, Form()]
) -> Response:
    """Pause or resume an annotator from the project's admin page."""
    users.set_active(db, user_id, active, by=_admin)
    return RedirectResponse(f"/projects/{project_id}/admin#annotators", status_code=303)


def _parse_answer(raw: str) -> Any:
    """The form's answer box: JSON (`12`, `"tie"`, `[3, [1, 2]]`), or a bare `tie`; empty
    means "not gold any more"."""
    raw = raw.strip()
    if not raw:
        return None
    if raw.lower() == "tie":
        return "tie"
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise InvalidInput(
            "the answer must be a completion id, tie, or a JSON ranking like [12, [13, 14]]"
        ) from None


MAX_ID = 2**63 - 1


def _parse_task_id(raw: str) -> int:
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= MAX_ID:
        raise InvalidInput(f"the task id must be a whole number like 42, not {raw!r}")
    return int(raw)


@router.post("/projects/{project_id}/admin/gold", include_in_schema=False)
def admin_set_gold(
    request: Request,
    project_id: int,
    db: Db,
    _admin: AdminUser,
    task_id: Annotated[str, Form()] = "",
    answer: Annotated[str, Form()] = "",
    show: Annotated[str, Form()] = "",
) -> Response:
    """Set a task's known answer from the monitor page. "Show completions" (`show`) saves
    nothing and lists the task's completions with their ids, which the answer is written
    with; a bad task id or answer re-renders the page with the message by the form, the
    values as typed and the task's completions (nothing was changed)."""
    form = {"task_id": task_id, "answer": answer}
    task: int | None = None
    try:
        task = _parse_task_id(task_id)
        if show:
            listed = gold.choices(db, project_id, task)
            if listed is None:
                raise NotFound(f"no task {task} in project {project_id}")
            return _gold_page(request, db, project_id, form, choices=listed)
        gold.mark(db, task, _parse_answer(answer), project_id=project_id)
    except (InvalidInput, NotFound) as exc:
        listed = gold.choices(db, project_id, task) if task is not None else None
        return _gold_page(
            request,
            db,
            project_id,
            form,
            choices=listed,
            error=exc.message,
            status_code=exc.status,
        )
    return RedirectResponse(f"/projects/{project_id}/admin#gold", status_code=303)


def _gold_page(
    request: Request,
    db: Db,
    project_id: int,
    form: dict[str, str],
    *,
    choices: gold.TaskChoices | None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    """The monitor page with the gold form's state: what was typed, a message, a listing."""
    days = 14
    overview = monitoring.overview(db, project_id, now=utcnow(), days=days)
    context = {
        "o": overview,
        "days": days,
        "gold_form": form,
        "gold_error": error,
        "gold_choices": choices,
    }
    return render(request, "admin/project.html", context, status_code=status_code)
