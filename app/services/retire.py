"""Taking tasks out of the labeling pool and putting them back (admins).

A retired task is never handed out again; its judgments stay, and exports, snapshots and
training keep reading them (retiring is about the queue, not the data). Its leases are
dropped, so an annotator who holds it gets "an admin retired it" on submit instead of a
stored judgment. Putting a task back makes it open again, or done when it already has the
judgments it needs; gold tasks go back to open, as gold tasks always are.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import Lease, Prompt, Task, TaskState
from app.services.tasks import lock_task


def set_retired(session: Session, task_id: int, retired: bool) -> Task:
    """Retire the task (`retired=True`) or put it back; idempotent."""
    task = lock_task(session, task_id)
    if task is None:
        raise NotFound(f"no task {task_id}")
    if retired:
        task.state = TaskState.retired
        session.execute(delete(Lease).where(Lease.task_id == task_id))
    elif task.state is TaskState.retired:
        full = not task.is_gold and task.judgment_count >= task.required_judgments
        task.state = TaskState.done if full else TaskState.open
    session.flush()
    return task


def set_prompt_retired(session: Session, prompt_id: int, retired: bool) -> list[Task]:
    """The same for every task of a prompt (e.g. a prompt found to be broken), in id order."""
    if session.get(Prompt, prompt_id) is None:
        raise NotFound(f"no prompt {prompt_id}")
    task_ids = session.scalars(
        select(Task.id).where(Task.prompt_id == prompt_id).order_by(Task.id)
    ).all()
    return [set_retired(session, task_id, retired) for task_id in task_ids]
