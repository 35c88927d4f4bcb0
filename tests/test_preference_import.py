"""Importing HH-RLHF style preference data as an external annotator's judgments."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from app.cli import cli
from app.db import transaction
from app.errors import Conflict, InvalidInput, InvalidUpload
from app.models import Completion, Judgment, Project, Prompt, Role, Task, TaskState, User
from app.services import export, preference_import
from app.settings import Settings
from tests.factories import make_project, make_token, make_user

HH = [
    {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: Fish.",
    },
    {  # multi-turn; the answers share a beginning ("Sure") past the last assistant marker
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: Sure, how?",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: Sure not.",
    },
]


def lines(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def run(
    db: Session, project: Project, data: bytes, name: str = "hh.jsonl", who: str = "hh-rlhf"
) -> Any:
    return preference_import.import_file(
        db, project.id, name, data, annotator=who, settings=Settings(env="test")
    )


def test_split_transcript() -> None:
    prompt, chosen, rejected = preference_import.split_transcript(
        HH[1]["chosen"], HH[1]["rejected"]
    )  # type: ignore[misc]
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant:"
    assert (chosen, rejected) == (" Sure, how?", " Sure not.")
    assert preference_import.split_transcript("Human: a", "Human: b") is None


def test_hh_rows_become_done_tasks_judged_by_an_external_annotator(
    db: Session, session_factory: sessionmaker[Session]
) -> None:
    project = make_project(db)
    result = run(db, project, lines(HH))
    assert (result.rows, result.prompts_created, result.completions_created) == (2, 2, 4)
    assert result.annotator_created and result.judgments_created == 2

    user = db.scalar(select(User).where(User.username == "hh-rlhf"))
    assert user is not None and user.role is Role.annotator and user.password_hash is None
    assert project.settings["external_annotators"] == ["hh-rlhf"]
    (record,) = project.settings["preference_imports"]
    assert record["rows"] == 2 and record["filename"] == "hh.jsonl" and len(record["sha256"]) == 64

    tasks = db.scalars(select(Task).where(Task.project_id == project.id).order_by(Task.id)).all()
    assert [(t.state, t.judgment_count, t.required_judgments) for t in tasks] == [
        (TaskState.done, 1, 1)
    ] * 2
    judgments = db.scalars(select(Judgment).where(Judgment.project_id == project.id)).all()
    assert all(j.display_order == [] and j.time_spent_ms is None for j in judgments)
    assert all(j.client_key.startswith("import:") for j in judgments)

    rows = list(export.rows(db, project.id, shape="pairs", filters={}))
    for row, original in zip(rows, HH, strict=True):
        # prompt + chosen is the original transcript, byte for byte.
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]
        assert row["annotator"] == "hh-rlhf" and row["margin"] == 1
    assert rows[0]["chosen"] == " 4." and rows[0]["prompt"].endswith("\n\nAssistant:")


def test_explicit_implicit_and_conversational_prompts(db: Session) -> None:
    project = make_project(db)
    data = lines(
        [
            {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Seven.", "id": "x1"},
            {  # TRL's implicit prompt: both answers repeat it
                "prompt": "Q: sky? A:",
                "chosen": "Q: sky? A: blue",
                "rejected": "Q: sky? A: loud",
                "metadata": {"split": "test"},
            },
            {
                "prompt": [{"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": {"role": "assistant", "content": "Go."},
            },
        ]
    )
    run(db, project, data)
    rows = {r["prompt_id"]: r for r in export.rows(db, project.id, shape="pairs", filters={})}
    assert (rows["x1"]["prompt"], rows["x1"]["chosen"], rows["x1"]["rejected"]) == (
        "Name a color.",
        "Blue.",
        "Seven.",
    )
    implicit = next(r for r in rows.values() if r["prompt"] == "Q: sky? A:")
    assert (implicit["chosen"], implicit["rejected"]) == (" blue", " loud")
    assert implicit["metadata"] == {"imported": "hh.jsonl", "split": "test"}
    chat = next(r for r in rows.values() if r["prompt_messages"])
    assert chat["prompt_messages"] == [{"role": "user", "content": "Hi"}]
    assert (chat["chosen"], chat["rejected"]) == ("Hello!", "Go.")


def test_rows_sharing_a_prompt_share_it(db: Session) -> None:
    project = make_project(db)
    shared = "\n\nHuman: Pick one\n\nAssistant:"
    data = lines(
        [
            {"chosen": shared + " A", "rejected": shared + " B"},
            {"chosen": shared + " A", "rejected": shared + " C"},
        ]
    )
    result = run(db, project, data)
    assert (result.prompts_created, result.completions_created, result.judgments_created) == (
        1,
        3,
        2,
    )
    count = db.scalar(
        select(func.count()).select_from(Prompt).where(Prompt.project_id == project.id)
    )
    assert count == 1


def test_parquet_file(db: Session) -> None:
    project = make_project(db)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(HH), buf)
    result = run(db, project, buf.getvalue(), name="hh.parquet")
    assert result.rows == 2


def test_all_or_nothing_with_line_errors(db: Session) -> None:
    project = make_project(db)
    data = (
        lines(HH)
        + b"not json\n"
        + lines(
            [
                {"chosen": "same", "rejected": "same", "prompt": "p"},
                {"chosen": "Human: a", "rejected": "Human: b"},
                {"chosen": "x"},
                {"prompt": "p", "chosen": "a", "rejected": "b", "extra": 1},
            ]
        )
    )
    users_before = db.scalar(select(func.count()).select_from(User))
    with pytest.raises(InvalidUpload) as caught:
        run(db, project, data)
    errors = caught.value.errors
    assert [e["line"] for e in errors] == [3, 4, 5, 6, 7]
    assert "bad JSON" in errors[0]["error"]
    assert "the same text" in errors[1]["error"]
    assert "Assistant:" in errors[2]["error"]
    assert "missing rejected" in errors[3]["error"]
    assert "unknown field" in errors[4]["error"]
    assert "nothing was imported" in caught.value.message
    assert (
        db.scalar(select(func.count()).select_from(Prompt).where(Prompt.project_id == project.id))
        == 0
    )
    assert db.scalar(select(func.count()).select_from(User)) == users_before
    with pytest.raises(InvalidUpload, match="unsupported file type"):
        run(db, project, b"x", name="hh.csv")


def test_same_file_twice_and_a_persons_account_are_refused(db: Session) -> None:
    project = make_project(db)
    run(db, project, lines(HH))
    with pytest.raises(Conflict, match="already imported"):
        run(db, project, lines(HH), who="someone-else")
    run(db, project, lines(HH[:1]))  # another file, same annotator: fine
    assert (
        db.scalar(
            select(func.count()).select_from(Judgment).where(Judgment.project_id == project.id)
        )
        == 3
    )
    make_user(db, Role.annotator, username="real-person")
    with pytest.raises(InvalidInput, match="person's annotator account"):
        run(db, project, lines(HH[1:]), who="real-person")
    with pytest.raises(InvalidInput, match="username"):
        run(db, project, lines(HH[1:]), who="bad name!")


def judgment_keys(db: Session, project: Project) -> list[str | None]:
    return list(
        db.scalars(
            select(Judgment.client_key)
            .where(Judgment.project_id == project.id)
            .order_by(Judgment.client_key)
        )
    )


def test_same_file_into_two_projects(db: Session) -> None:
    """Client keys are unique across the database: they name the project (was a 500)."""
    first, second = make_project(db), make_project(db)
    run(db, first, lines(HH))
    result = run(db, second, lines(HH))
    assert (result.rows, result.prompts_created, result.judgments_created) == (2, 2, 2)
    sha = hashlib.sha256(lines(HH)).hexdigest()[:24]
    assert judgment_keys(db, first) == [f"import:{first.id}:{sha}:1", f"import:{first.id}:{sha}:2"]
    assert judgment_keys(db, second) == [
        f"import:{second.id}:{sha}:1",
        f"import:{second.id}:{sha}:2",
    ]
    with pytest.raises(Conflict, match=f"already imported into project {second.id}"):
        run(db, second, lines(HH))


def test_files_imported_with_the_old_keys_are_still_recognised(db: Session) -> None:
    """Databases imported into before keys named the project keep `import:<sha>:<line>`."""
    first, second = make_project(db), make_project(db)
    run(db, first, lines(HH))
    sha = hashlib.sha256(lines(HH)).hexdigest()[:24]
    for judgment in db.scalars(select(Judgment).where(Judgment.project_id == first.id)):
        line = judgment.client_key.rsplit(":", 1)[1]  # type: ignore[union-attr]
        judgment.client_key = f"import:{sha}:{line}"
    db.flush()
    assert judgment_keys(db, first) == [f"import:{sha}:1", f"import:{sha}:2"]
    with pytest.raises(Conflict, match="already imported"):
        run(db, first, lines(HH))
    assert run(db, second, lines(HH)).judgments_created == 2
    assert judgment_keys(db, first) == [f"import:{sha}:1", f"import:{sha}:2"]


def test_a_unique_clash_while_writing_is_a_conflict_and_writes_nothing(db: Session) -> None:
    """A client already sent the key the import would give line 1: 409, not a 500."""
    elsewhere, project = make_project(db), make_project(db)
    run(db, elsewhere, lines(HH[:1]), who="other-source")
    sha = hashlib.sha256(lines(HH)).hexdigest()
    db.execute(
        update(Judgment)
        .where(Judgment.project_id == elsewhere.id)
        .values(client_key=preference_import.client_key(project.id, sha, 1))
    )
    with pytest.raises(Conflict, match=f"into project {project.id} clashed"):
        run(db, project, lines(HH))
    # Nothing of the import is left, and the session goes on working.
    assert db.scalar(select(func.count()).where(Prompt.project_id == project.id)) == 0
    assert db.scalar(select(User.id).where(User.username == "hh-rlhf")) is None
    db.refresh(project)
    assert project.settings == {}


def test_api_import(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    project = make_project(db)
    url = f"/api/v1/projects/{project.id}/preferences"
    files = {"file": ("hh.jsonl", lines(HH), "application/x-ndjson")}
    researcher = make_token(db, make_user(db, Role.researcher))
    assert (
        client.post(url, files=files, data={"annotator": "hh"}, headers=researcher).status_code
        == 403
    )
    admin = make_token(db, make_user(db, Role.admin))
    resp = client.post(url, files=files, data={"annotator": "hh"}, headers=admin)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert (
        body["rows"] == 2 and body["annotator"] == "hh" and "2 preferences by hh" in body["summary"]
    )
    bad = {"file": ("bad.jsonl", b'{"chosen": "x"}\n', "application/x-ndjson")}
    resp = client.post(url, files=bad, data={"annotator": "hh"}, headers=admin)
    assert resp.status_code == 422
    assert resp.json()["errors"] == [{"line": 1, "error": "missing rejected"}]
    resp = client.post(url, files=files, data={"annotator": "hh"}, headers=admin)
    assert resp.status_code == 409


def test_api_import_of_one_file_into_two_projects(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    first, second = make_project(db), make_project(db)
    admin = make_token(db, make_user(db, Role.admin))
    files = {"file": ("p2.jsonl", lines(HH), "application/x-ndjson")}
    for project in (first, second):
        url = f"/api/v1/projects/{project.id}/preferences"
        resp = client.post(url, files=files, data={"annotator": "ext"}, headers=admin)
        assert resp.status_code == 201, resp.text
        assert resp.json()["judgments_created"] == 2
    resp = client.post(
        f"/api/v1/projects/{second.id}/preferences",
        files=files,
        data={"annotator": "ext"},
        headers=admin,
    )
    assert resp.status_code == 409
    assert resp.json()["error"] == "conflict"
    assert f"already imported into project {second.id}" in resp.json()["detail"]


def test_cli_import_preferences(
    committed_factory: sessionmaker[Session],
    backend_settings,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", backend_settings.database_url)
    monkeypatch.chdir(tmp_path)
    with transaction(committed_factory) as session:
        make_project(session, name="hh-project")
    path = tmp_path / "harmless.jsonl"
    path.write_bytes(lines(HH))
    runner = CliRunner()
    done = runner.invoke(cli, ["import-preferences", "hh-project", str(path), "--annotator", "hh"])
    assert done.exit_code == 0, done.output
    assert "2 preferences by hh" in done.output
    again = runner.invoke(cli, ["import-preferences", "hh-project", str(path), "--annotator", "hh"])
    assert again.exit_code == 1 and "already imported" in again.output
    with transaction(committed_factory) as session:
        assert session.scalar(select(func.count()).select_from(Completion)) == 4


@pytest.mark.parametrize(
    "command",
    [
        ["import-preferences", "hh-project", "{path}", "--annotator", "hh"],
        ["import", "hh-project", "{path}"],
        ["export", "hh-project", "-o", "{path}"],
    ],
    ids=["import-preferences", "import", "export"],
)
def test_cli_file_that_cannot_be_used_is_a_one_line_error(
    committed_factory: sessionmaker[Session],
    backend_settings,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command: list[str],
) -> None:
    """A missing file or a directory where a file should be was a traceback; now it is one
    line, `error: cannot read|write PATH: why`, exit code 1, and nothing is written."""
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", backend_settings.database_url)
    monkeypatch.chdir(tmp_path)
    with transaction(committed_factory) as session:
        make_project(session, name="hh-project")
    runner = CliRunner()
    writes = command[0] == "export"
    missing = tmp_path / "no such dir [1]" / "missing.jsonl"
    for path, reason in ((missing, "No such file or directory"), (tmp_path, "Is a directory")):
        result = runner.invoke(cli, [str(path) if a == "{path}" else a for a in command])
        assert result.exit_code == 1, result.output
        verb = "write" if writes else "read"
        assert result.output.splitlines() == [f"error: cannot {verb} {path}: {reason}"]
        assert result.exception is None or isinstance(result.exception, SystemExit)
    with transaction(committed_factory) as session:
        assert session.scalar(select(func.count()).select_from(Prompt)) == 0
        assert session.scalar(select(func.count()).select_from(User)) == 0
