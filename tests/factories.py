"""Plain factory functions for tests: each makes rows and flushes, nothing more."""

from __future__ import annotations

import functools
import itertools
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Completion, Project, ProjectMode, Prompt, Role, Task, User
from app.services import users

PASSWORD = "correct-horse-battery"
_seq = itertools.count(1)


@functools.cache
def _password_hash() -> str:
    """argon2 is slow by design; hash the shared test password once per run."""
    return users.hash_password(PASSWORD)


def make_user(session: Session, role: Role = Role.annotator, username: str | None = None) -> User:
    user = users.create(session, username or f"{role.value}{next(_seq)}", role, None)
    user.password_hash = _password_hash()
    session.flush()
    return user


def make_token(session: Session, user: User) -> dict[str, str]:
    """Authorization headers for `user`."""
    return {"Authorization": f"Bearer {users.create_token(session, user, 'test')}"}


def make_project(session: Session, **fields: Any) -> Project:
    fields.setdefault("name", f"project-{next(_seq)}")
    fields.setdefault("mode", ProjectMode.pairwise)
    fields.setdefault("instructions", "Pick the more helpful answer.")
    project = Project(**fields)
    session.add(project)
    session.flush()
    return project


def make_prompt(
    session: Session,
    project: Project,
    completions: list[str],
    external_id: str | None = None,
    text: str = "Say hello.",
    **fields: Any,
) -> Prompt:
    prompt = Prompt(
        project_id=project.id, external_id=external_id or f"p{next(_seq)}", text=text, **fields
    )
    session.add(prompt)
    session.flush()
    for body in completions:
        session.add(Completion(prompt_id=prompt.id, text=body))
    session.flush()
    session.refresh(prompt)
    return prompt


def make_task(session: Session, project: Project, prompt: Prompt, **fields: Any) -> Task:
    """A task over all of the prompt's completions (a pair when it has two)."""
    fields.setdefault("required_judgments", project.judgments_per_task)
    fields.setdefault("completion_ids", [c.id for c in prompt.completions])
    task = Task(project_id=project.id, prompt_id=prompt.id, **fields)
    session.add(task)
    session.flush()
    return task


def login(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Log `client` in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    resp = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token},
        follow_redirects=False,
    )
    assert resp.status_code == 303, resp.text
    return token
