"""Preference groups for reward training, read straight from judgments.

One judgment becomes one group: the task's completions plus the annotator's ranking as tie
groups of *indices* into those completions, best first. Keeping a ranked task as one group
(rather than expanding it into pairs here) is what lets the trainer apply the InstructGPT
listwise loss, where a task's C(K, 2) pairs share one forward pass per completion and are
weighted as one comparison, not K·(K-1)/2 of them.

The rows are plain dicts with the fields of ``worker.reward.PreferenceGroup`` (the web
process never imports the worker), so the runner builds the dataclass with ``**row``.

A reward job trains on a snapshot (app.services.snapshots; one is taken when the job starts
unless it names one): `snapshot_judgments` gives its cut-off and the judgment ids its filters
select. Judgments are never edited or deleted, so "these judgments, all with id ≤ M" is a
reproducible dataset.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import Completion, Judgment, Project, Prompt, Task, User
from app.services import export, snapshots

_CHUNK = 1000


def prompt_text(prompt: Prompt) -> str:
    """The prompt as one string: its text, or chat messages as a `role: content` transcript."""
    if prompt.text is not None:
        return prompt.text
    lines = []
    for message in prompt.messages or []:
        if isinstance(message, dict):
            lines.append(f"{message.get('role', 'user')}: {message.get('content', '')}")
        else:
            lines.append(str(message))
    return "\n".join(lines)


def max_judgment_id(session: Session, project_id: int) -> int:
    """The newest judgment id of the project (0 when it has none): the data cut-off of a run."""
    if session.get(Project, project_id) is None:
        raise NotFound(f"no project {project_id}")
    stmt = select(func.max(Judgment.id)).where(Judgment.project_id == project_id)
    return int(session.scalar(stmt) or 0)


def _completions(session: Session, ids: Sequence[int]) -> dict[int, Completion]:
    found: dict[int, Completion] = {}
    unique = sorted(set(ids))
    for start in range(0, len(unique), _CHUNK):
        chunk = unique[start : start + _CHUNK]
        found.update(
            (c.id, c) for c in session.scalars(select(Completion).where(Completion.id.in_(chunk)))
        )
    return found


def _group(
    judgment: Judgment,
    task: Task,
    prompt: Prompt,
    username: str,
    completions: dict[int, Completion],
) -> dict[str, Any] | None:
    """One judgment as a preference group, or None when it names a completion that is gone."""
    ids = [int(c) for c in task.completion_ids]
    if any(c not in completions for c in ids):
        return None
    index = {cid: i for i, cid in enumerate(ids)}
    ranking: list[list[int]] = []
    for tie_group in judgment.ranking:
        members = tie_group if isinstance(tie_group, list) else [tie_group]
        if any(int(m) not in index for m in members):
            return None
        ranking.append(sorted(index[int(m)] for m in members))
    return {
        "prompt_id": prompt.id,
        "prompt": prompt_text(prompt),
        "completions": [completions[c].text for c in ids],
        "ranking": ranking,
        "strength": judgment.strength,
        "annotator": username,
        "sources": [completions[c].source for c in ids],
    }


def snapshot_judgments(
    session: Session, snapshot_id: int
) -> tuple[int, int, frozenset[int] | None]:
    """(project id, cut-off, judgment ids) of a snapshot: exactly the judgments its exports
    read (its filters applied), so a model trained on it saw what a researcher downloads.

    The ids are None for a snapshot without filters (what a reward job takes by default):
    it is every judgment up to the cut-off, and reading its export only to list them would
    read every judgment's texts twice.
    """
    snapshot = snapshots.get(session, snapshot_id)
    selection = snapshots.selection(snapshot)
    if selection == export.Selection(max_judgment_id=selection.max_judgment_id):
        return snapshot.project_id, snapshot.max_judgment_id, None
    rows = snapshots.rows(session, snapshot_id, shape="raw")
    ids = frozenset(int(row["judgment_id"]) for row in rows)
    return snapshot.project_id, snapshot.max_judgment_id, ids


def preference_groups(
    session: Session,
    project_id: int,
    *,
    max_judgment_id: int | None = None,
    judgment_ids: Collection[int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Every judgment of the project up to `max_judgment_id` (and among `judgment_ids`, when
    given: a snapshot's), oldest first, as group rows.

    Read in chunks of judgments so a large project does not load every completion at once.
    Judgments whose ranking puts all candidates in one tie group are kept (a tie is
    information the trainer may use); judgments that are only "both bad" are kept the same way.
    """
    if session.get(Project, project_id) is None:
        raise NotFound(f"no project {project_id}")
    last_id = 0
    while True:
        stmt = (
            select(Judgment, Task, Prompt, User.username)
            .join(Task, Task.id == Judgment.task_id)
            .join(Prompt, Prompt.id == Task.prompt_id)
            .join(User, User.id == Judgment.user_id)
            .where(Judgment.project_id == project_id, Judgment.id > last_id)
            .order_by(Judgment.id)
            .limit(_CHUNK)
        )
        if max_judgment_id is not None:
            stmt = stmt.where(Judgment.id <= max_judgment_id)
        rows = list(session.execute(stmt).all())
        if not rows:
            return
        wanted = [int(c) for _, task, _, _ in rows for c in task.completion_ids]
        completions = _completions(session, wanted)
        for judgment, task, prompt, username in rows:
            if judgment_ids is not None and judgment.id not in judgment_ids:
                continue
            group = _group(judgment, task, prompt, username, completions)
            if group is not None:
                yield group
        last_id = rows[-1][0].id


def judged_prompt_ids(
    session: Session, project_id: int, *, max_judgment_id: int | None = None
) -> set[int]:
    """Prompts with at least one judgment (up to `max_judgment_id`): what a reward model
    trained with that cut-off can have seen."""
    stmt = (
        select(Task.prompt_id)
        .join(Judgment, Judgment.task_id == Task.id)
        .where(Judgment.project_id == project_id)
        .distinct()
    )
    if max_judgment_id is not None:
        stmt = stmt.where(Judgment.id <= max_judgment_id)
    return {int(pid) for pid in session.scalars(stmt)}
