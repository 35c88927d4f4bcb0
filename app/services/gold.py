"""Gold tasks: marking a task's known answer, creating gold tasks from uploads, and scoring.

A gold task stays `open` for good and is never filled by `required_judgments`: every
annotator may see it once (app.services.tasks mixes it into their stream at the project's
gold rate), and its judgments carry ``is_gold`` and ``gold_correct`` so they count towards
the annotator's accuracy and never towards a normal task's overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.domain import gold
from app.errors import InvalidInput, NotFound
from app.models import Completion, Judgment, Project, Prompt, Task, TaskState, User, utcnow
from app.services.tasks import lock_task


@dataclass(frozen=True)
class GoldScore:
    """One annotator's record on gold tasks in one project."""

    user_id: int
    username: str
    judged: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.judged if self.judged else None


@dataclass(frozen=True)
class GoldTaskStats:
    task_id: int
    prompt_id: int
    answer: list[list[int]]
    judged: int
    correct: int


def mark(session: Session, task_id: int, answer: Any, *, project_id: int | None = None) -> Task:
    """Make a task gold with a known answer (completion ids; see app.domain.gold), or, with
    ``answer=None``, make it a normal task again.

    A gold task leaves the normal pool at once; judgments it already has stay as they were
    (raw judgments are never rewritten). Turned back to normal, its counter is recounted from
    its non-gold judgments, so overlap is filled by normal judgments only.
    """
    task = lock_task(session, task_id)
    if task is None or (project_id is not None and task.project_id != project_id):
        raise NotFound(f"no task {task_id}" + (f" in project {project_id}" if project_id else ""))
    if answer is None:
        if task.is_gold:
            normal = session.scalar(
                select(func.count())
                .select_from(Judgment)
                .where(Judgment.task_id == task.id, Judgment.is_gold.is_(False))
            )
            task.is_gold = False
            task.gold_answer = None
            task.judgment_count = int(normal or 0)
            if task.state is not TaskState.retired:
                done = task.judgment_count >= task.required_judgments
                task.state = TaskState.done if done else TaskState.open
        session.flush()
        return task
    try:
        known = gold.answer_from_ids(answer, task.completion_ids)
    except gold.GoldError as exc:
        raise InvalidInput(str(exc)) from None
    task.is_gold = True
    task.gold_answer = known
    if task.state is TaskState.done:
        task.state = TaskState.open  # gold is never exhausted
    session.flush()
    return task


def add_tasks(
    session: Session, project: Project, specs: Sequence[tuple[int, list[int], list[list[int]]]]
) -> int:
    """Create gold tasks from (prompt id, completion ids in row order, answer) triples, as an
    upload's ``"gold"`` rows give them; a task over the same completions becomes gold instead
    of being duplicated. Returns how many tasks were created or marked."""
    changed = 0
    for prompt_id, completion_ids, answer in specs:
        existing = next(
            (
                task
                for task in session.scalars(select(Task).where(Task.prompt_id == prompt_id))
                if set(task.completion_ids) == set(completion_ids)
            ),
            None,
        )
        if existing is not None:
            existing.is_gold, existing.gold_answer = True, answer
            if existing.state is TaskState.done:
                existing.state = TaskState.open
        else:
            session.add(
                Task(
                    project_id=project.id,
                    prompt_id=prompt_id,
                    completion_ids=list(completion_ids),
                    required_judgments=project.judgments_per_task,
                    judgment_count=0,
                    is_gold=True,
                    gold_answer=answer,
                    priority=0,
                    state=TaskState.open,
                    created_at=utcnow(),
                )
            )
        changed += 1
    session.flush()
    return changed


def scores(session: Session, project_id: int) -> list[GoldScore]:
    """Gold accuracy per annotator in a project, for everyone who judged a gold task."""
    correct = func.sum(case((Judgment.gold_correct.is_(True), 1), else_=0))
    rows = session.execute(
        select(User.id, User.username, func.count(Judgment.id), correct)
        .join(Judgment, Judgment.user_id == User.id)
        .where(Judgment.project_id == project_id, Judgment.is_gold.is_(True))
        .group_by(User.id, User.username)
        .order_by(User.username)
    )
    return [GoldScore(int(u), name, int(n), int(c or 0)) for u, name, n, c in rows]


def task_stats(session: Session, project_id: int) -> list[GoldTaskStats]:
    """Every gold task of a project with how often annotators got it right: a gold item
    most people miss is more often a wrong answer key than a bad crowd."""
    correct = func.sum(case((Judgment.gold_correct.is_(True), 1), else_=0))
    counts = (
        select(
            Judgment.task_id.label("task_id"),
            func.count(Judgment.id).label("n"),
            correct.label("ok"),
        )
        .where(Judgment.project_id == project_id, Judgment.is_gold.is_(True))
        .group_by(Judgment.task_id)
        .subquery()
    )
    rows = session.execute(
        select(Task.id, Task.prompt_id, Task.gold_answer, counts.c.n, counts.c.ok)
        .outerjoin(counts, counts.c.task_id == Task.id)
        .where(Task.project_id == project_id, Task.is_gold.is_(True))
        .order_by(Task.id)
    )
    return [
        GoldTaskStats(int(t), int(p), list(a or []), int(n or 0), int(ok or 0))
        for t, p, a, n, ok in rows
    ]


@dataclass(frozen=True)
class TaskChoices:
    """A task's candidates as the gold form lists them: the ids a known answer is made of."""

    task_id: int
    prompt_external_id: str
    prompt_text: str | None
    completions: list[tuple[int, str]]
    """(completion id, text) in the task's order."""
    gold_answer: list[list[int]] | None


def choices(session: Session, project_id: int, task_id: int) -> TaskChoices | None:
    """The completions of a task of this project, or None when it has no such task."""
    task = session.get(Task, task_id)
    if task is None or task.project_id != project_id:
        return None
    prompt = session.get(Prompt, task.prompt_id)
    assert prompt is not None
    rows = session.execute(
        select(Completion.id, Completion.text).where(Completion.id.in_(task.completion_ids))
    )
    texts = {int(cid): text for cid, text in rows}
    return TaskChoices(
        task_id=task.id,
        prompt_external_id=prompt.external_id,
        prompt_text=prompt.text,
        completions=[(cid, texts.get(cid, "")) for cid in task.completion_ids],
        gold_answer=task.gold_answer if task.is_gold else None,
    )
