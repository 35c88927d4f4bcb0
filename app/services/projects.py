"""Projects: creating them, finding them by id or name, and counting their progress."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, exists, func, select
from sqlalchemy import update as update_
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.models import Completion, Judgment, Project, ProjectMode, Prompt, Task, TaskState, User

NAME_MAX = 200
INSTRUCTIONS_MAX = 20_000
JUDGMENTS_PER_TASK_MAX = 50
RANKING_K_RANGE = (3, 9)
DEFAULT_RANKING_K = 4
LEASE_SECONDS_RANGE = (10, 24 * 3600)


def get(session: Session, project_id: int) -> Project:
    """The project with this id, or NotFound (the API's 404)."""
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project with id {project_id}")
    return project


def resolve(session: Session, id_or_name: str) -> Project:
    """A project named by the CLI user: an all-digit string is an id first, then a name."""
    key = id_or_name.strip()
    if key.isdigit():
        project = session.get(Project, int(key))
        if project is not None:
            return project
    project = session.scalar(select(Project).where(Project.name == key))
    if project is None:
        raise NotFound(f"no project with id or name {key!r}")
    return project


def create(
    session: Session,
    *,
    name: str,
    mode: ProjectMode | str = ProjectMode.pairwise,
    instructions: str = "",
    judgments_per_task: int = 1,
    candidates_per_task: int | None = None,
    lease_seconds: int = 300,
    gold_rate: float = 0.0,
    created_by: User | int | None = None,
) -> Project:
    """Create a project after checking every value (InvalidInput) and the name (Conflict).

    `candidates_per_task` left out means 2 for pairwise and 4 for ranking; pairwise accepts
    only 2, ranking 3 to 9 (more does not fit on a screen or in an annotator's head).
    """
    name = name.strip()
    try:
        mode = ProjectMode(mode)
    except ValueError:
        modes = ", ".join(m.value for m in ProjectMode)
        raise InvalidInput(f"mode must be one of {modes}, not {mode!r}") from None
    if candidates_per_task is None:
        candidates_per_task = 2 if mode is ProjectMode.pairwise else DEFAULT_RANKING_K
    _check_name(name)
    _check_instructions(instructions)
    _check_judgments_per_task(judgments_per_task)
    if mode is ProjectMode.pairwise:
        _check(candidates_per_task == 2, "a pairwise project shows exactly 2 candidates per task")
    else:
        low, high = RANKING_K_RANGE
        _check(
            _is_int(candidates_per_task) and low <= candidates_per_task <= high,
            f"a ranking project shows {low} to {high} candidates per task",
        )
    _check_lease_seconds(lease_seconds)
    _check_gold_rate(gold_rate)
    _check_name_free(session, name)

    project = Project(
        name=name,
        mode=mode,
        instructions=instructions,
        judgments_per_task=judgments_per_task,
        candidates_per_task=candidates_per_task,
        lease_seconds=lease_seconds,
        gold_rate=float(gold_rate),
        settings={},
        created_by=created_by.id if isinstance(created_by, User) else created_by,
    )
    session.add(project)
    session.flush()
    return project


EDITABLE = ("name", "instructions", "judgments_per_task", "lease_seconds", "gold_rate")
"""What can change after creation. Not the mode or candidates per task: every task was built
with that many candidates."""


def update(session: Session, project_id: int, changes: dict[str, Any]) -> Project:
    """Change a project's settings (the keys of EDITABLE), all checked before any is applied.

    A new `judgments_per_task` applies to the existing non-gold tasks too, as Label Studio's
    overlap does: each needs that many judgments, so raising it reopens done tasks with fewer
    and lowering it closes open tasks that already have enough. Retired tasks stay retired,
    and judgments are never removed. A new `lease_seconds` applies to leases taken from now on.
    """
    project = get(session, project_id)
    unknown = sorted(set(changes) - set(EDITABLE))
    _check(not unknown, f"cannot change {', '.join(unknown)}; editable: {', '.join(EDITABLE)}")
    if "name" in changes:
        changes = {**changes, "name": str(changes["name"]).strip()}
        _check_name(changes["name"])
        if changes["name"] != project.name:
            _check_name_free(session, changes["name"])
    if "instructions" in changes:
        _check_instructions(changes["instructions"])
    if "judgments_per_task" in changes:
        _check_judgments_per_task(changes["judgments_per_task"])
    if "lease_seconds" in changes:
        _check_lease_seconds(changes["lease_seconds"])
    if "gold_rate" in changes:
        _check_gold_rate(changes["gold_rate"])
        changes = {**changes, "gold_rate": float(changes["gold_rate"])}

    for key, value in changes.items():
        setattr(project, key, value)
    session.flush()
    if "judgments_per_task" in changes:
        _apply_overlap(session, project_id, changes["judgments_per_task"])
    session.flush()
    return project


def _apply_overlap(session: Session, project_id: int, required: int) -> None:
    """Every non-gold, non-retired task of the project needs `required` judgments."""
    real = (Task.project_id == project_id, Task.is_gold.is_(False))
    session.execute(
        update_(Task)
        .where(*real, Task.state != TaskState.retired)
        .values(
            required_judgments=required,
            state=case((Task.judgment_count >= required, TaskState.done), else_=TaskState.open),
        )
        .execution_options(synchronize_session=False)
    )
    session.expire_all()


def list_all(session: Session) -> list[Project]:
    """Every project, newest first."""
    return list(session.scalars(select(Project).order_by(Project.id.desc())))


def progress(session: Session, project_id: int) -> dict[str, Any]:
    """Counts for the project page and ``GET /api/v1/projects/{id}``.

    ``prompts_waiting`` are prompts with no completions yet (they wait for generated ones);
    ``tasks`` has a count for every state, zeros included, so clients need no defaults, of
    the real tasks only: gold tasks stay open for every annotator forever, so counting them
    would leave a finished project looking unfinished (the admin view counts them apart);
    ``annotators`` lists who judged how much, gold included (it is work done), busiest first.
    """
    get(session, project_id)
    prompt_count = session.scalar(
        select(func.count()).select_from(Prompt).where(Prompt.project_id == project_id)
    )
    has_completion = exists().where(Completion.prompt_id == Prompt.id)
    waiting = session.scalar(
        select(func.count())
        .select_from(Prompt)
        .where(Prompt.project_id == project_id, ~has_completion)
    )
    completion_count = session.scalar(
        select(func.count())
        .select_from(Completion)
        .join(Prompt, Completion.prompt_id == Prompt.id)
        .where(Prompt.project_id == project_id)
    )
    tasks = {state.value: 0 for state in TaskState}
    for state, count in session.execute(
        select(Task.state, func.count())
        .where(Task.project_id == project_id, Task.is_gold.is_(False))
        .group_by(Task.state)
    ):
        tasks[TaskState(state).value] = int(count)
    per_user = session.execute(
        select(User.id, User.username, func.count(Judgment.id))
        .join(Judgment, Judgment.user_id == User.id)
        .where(Judgment.project_id == project_id)
        .group_by(User.id, User.username)
        .order_by(func.count(Judgment.id).desc(), User.username)
    ).all()
    annotators = [
        {"user_id": int(uid), "username": username, "judgments": int(count)}
        for uid, username, count in per_user
    ]
    return {
        "prompts": int(prompt_count or 0),
        "prompts_waiting": int(waiting or 0),
        "completions": int(completion_count or 0),
        "tasks": tasks,
        "judgments": sum(a["judgments"] for a in annotators),
        "annotators": annotators,
    }


def detail(session: Session, project_id: int) -> tuple[Project, dict[str, Any]]:
    """The project and its progress counts (NotFound if there is no such project)."""
    return get(session, project_id), progress(session, project_id)


def list_with_progress(session: Session) -> list[tuple[Project, dict[str, Any]]]:
    """Every project with its counts, for the projects page."""
    return [(project, progress(session, project.id)) for project in list_all(session)]


def _check_name(name: str) -> None:
    _check(
        isinstance(name, str) and 0 < len(name) <= NAME_MAX,
        f"name must be 1 to {NAME_MAX} characters",
    )


def _check_name_free(session: Session, name: str) -> None:
    if session.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise Conflict(f"a project named {name!r} already exists")


def _check_instructions(instructions: str) -> None:
    _check(
        isinstance(instructions, str) and len(instructions) <= INSTRUCTIONS_MAX,
        f"instructions must be at most {INSTRUCTIONS_MAX} characters",
    )


def _check_judgments_per_task(judgments_per_task: int) -> None:
    _check(
        _is_int(judgments_per_task) and 1 <= judgments_per_task <= JUDGMENTS_PER_TASK_MAX,
        f"judgments_per_task must be a whole number from 1 to {JUDGMENTS_PER_TASK_MAX}",
    )


def _check_lease_seconds(lease_seconds: int) -> None:
    low, high = LEASE_SECONDS_RANGE
    _check(
        _is_int(lease_seconds) and low <= lease_seconds <= high,
        f"lease_seconds must be from {low} to {high}",
    )


def _check_gold_rate(gold_rate: float) -> None:
    _check(
        isinstance(gold_rate, int | float)
        and not isinstance(gold_rate, bool)
        and 0.0 <= gold_rate <= 1.0,
        "gold_rate must be between 0 and 1",
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidInput(message)
