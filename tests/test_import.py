"""Prompt import (app.services.prompts): formats, all-or-nothing validation, upsert, tasks."""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime, timedelta
from itertools import combinations
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidUpload, NoTaskLeft, NotFound, UploadTooLarge
from app.models import Completion, Project, Prompt, Role, Snapshot, Task, TaskState, User
from app.services import judgments, projects, prompts, snapshots, tasks
from app.settings import Settings
from tests.factories import login, make_token, make_user


def jsonl(*rows: Any) -> bytes:
    """Rows as JSON Lines; a str row is written as-is (to make bad lines)."""
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


def parquet(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def run_import(
    db: Session,
    project: Project,
    settings: Settings,
    filename: str,
    data: bytes,
    *,
    upsert: bool = False,
    seed: int = 0,
) -> prompts.ImportResult:
    return prompts.import_upload(
        db, project.id, filename, data, upsert=upsert, rng=random.Random(seed), settings=settings
    )


def count(db: Session, model: type[Any], project: Project) -> int:
    if model is Completion:
        stmt = (
            select(func.count())
            .select_from(Completion)
            .join(Prompt)
            .where(Prompt.project_id == project.id)
        )
    else:
        stmt = select(func.count()).select_from(model).where(model.project_id == project.id)
    return int(db.scalar(stmt) or 0)


def prompt_by_id(db: Session, project: Project, external_id: str) -> Prompt:
    db.expire_all()
    return db.scalars(
        select(Prompt).where(Prompt.project_id == project.id, Prompt.external_id == external_id)
    ).one()


def task_sets(db: Session, prompt: Prompt) -> list[frozenset[int]]:
    return [
        frozenset(t.completion_ids)
        for t in db.scalars(select(Task).where(Task.prompt_id == prompt.id))
    ]


def expect_invalid(
    db: Session, project: Project, settings: Settings, filename: str, data: bytes, **kwargs: Any
) -> list[dict[str, Any]]:
    """Import must fail, write nothing, and return the error list."""
    before = (count(db, Prompt, project), count(db, Completion, project), count(db, Task, project))
    with pytest.raises(InvalidUpload) as info:
        run_import(db, project, settings, filename, data, **kwargs)
    after = (count(db, Prompt, project), count(db, Completion, project), count(db, Task, project))
    assert after == before, "a bad file must import nothing"
    assert info.value.errors == info.value.details["errors"]
    return info.value.errors


@pytest.fixture
def project(db: Session) -> Project:
    return projects.create(
        db, name="import-test", mode="pairwise", instructions="Pick one.", judgments_per_task=2
    )


# --- formats ----------------------------------------------------------------------------------


def test_jsonl_import_creates_prompts_completions_and_every_pair(
    db: Session, project: Project, settings: Settings
) -> None:
    data = jsonl(
        {
            "id": "a",
            "prompt": "Explain TCP.",
            "completions": ["one", "two", "three"],
            "metadata": {"source": "forum", "n": 3},
        },
        {
            "id": "b",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi <b>there</b>"},
            ],
            "completions": ["x", "y"],
        },
        "",
        {"id": "c", "prompt": "Waits for generated completions."},
    )
    result = run_import(db, project, settings, "set.jsonl", data)

    assert result == prompts.ImportResult(
        prompts_created=3, prompts_updated=0, completions_created=5, tasks_created=4, rows=3
    )
    assert result.summary() == (
        "3 rows: 3 prompts created, 0 updated, 5 completions added, 4 tasks created"
    )
    a = prompt_by_id(db, project, "a")
    assert (a.text, a.messages, a.metadata_) == ("Explain TCP.", None, {"source": "forum", "n": 3})
    assert [c.text for c in a.completions] == ["one", "two", "three"]
    assert all(c.source == "upload" for c in a.completions)
    ids = [c.id for c in a.completions]
    assert sorted(task_sets(db, a), key=sorted) == sorted(
        (frozenset(p) for p in combinations(ids, 2)), key=sorted
    )
    tasks = db.scalars(select(Task).where(Task.prompt_id == a.id)).all()
    assert {(t.state, t.required_judgments, t.judgment_count, t.project_id) for t in tasks} == {
        (TaskState.open, 2, 0, project.id)
    }
    b = prompt_by_id(db, project, "b")
    assert b.text is None
    assert b.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <b>there</b>"},
    ]
    c = prompt_by_id(db, project, "c")
    assert c.completions == [] and task_sets(db, c) == []
    assert projects.progress(db, project.id)["prompts_waiting"] == 1


def test_messages_prompt_text_is_sql_null(
    db: Session, project: Project, settings: Settings
) -> None:
    run_import(
        db,
        project,
        settings,
        "m.jsonl",
        jsonl(
            {"id": "m", "messages": [{"role": "user", "content": "Hi"}]},
            {"id": "t", "prompt": "Plain"},
        ),
    )
    assert (
        db.scalar(
            select(Prompt.external_id).where(
                Prompt.project_id == project.id, Prompt.messages.is_(None)
            )
        )
        == "t"
    )
    assert (
        db.scalar(
            select(Prompt.external_id).where(Prompt.project_id == project.id, Prompt.text.is_(None))
        )
        == "m"
    )


def test_csv_with_a_json_completions_column(
    db: Session, project: Project, settings: Settings
) -> None:
    data = (
        "\ufeffid,prompt,completions,metadata\r\n"  # Excel's byte order mark and CRLF
        'q1,"Write a poem\nabout ""rain""","[""Rain falls."", ""Drops, <i>drops</i>.""]","{""lang"": ""en""}"\r\n'
        "q2,No completions yet,,\r\n"
    ).encode()
    result = run_import(db, project, settings, "set.CSV", data)
    assert (result.prompts_created, result.completions_created, result.tasks_created) == (2, 2, 1)
    q1 = prompt_by_id(db, project, "q1")
    assert q1.text == 'Write a poem\nabout "rain"'
    assert q1.metadata_ == {"lang": "en"}
    assert [c.text for c in q1.completions] == ["Rain falls.", "Drops, <i>drops</i>."]
    assert prompt_by_id(db, project, "q2").completions == []


def test_csv_with_numbered_completion_columns_and_messages(
    db: Session, project: Project, settings: Settings
) -> None:
    messages = json.dumps([{"role": "user", "content": "Hello"}]).replace('"', '""')
    data = (
        "id,prompt,messages,completion_1,completion_2,completion_3\n"
        "p1,Say hi,,hi,hello,hey\n"
        f'p2,,"{messages}",yo,sup,\n'
    ).encode()
    result = run_import(db, project, settings, "set.csv", data)
    assert (result.prompts_created, result.completions_created, result.tasks_created) == (2, 5, 4)
    assert [c.text for c in prompt_by_id(db, project, "p1").completions] == ["hi", "hello", "hey"]
    p2 = prompt_by_id(db, project, "p2")
    assert p2.messages == [{"role": "user", "content": "Hello"}] and p2.text is None
    assert [c.text for c in p2.completions] == ["yo", "sup"]


def test_csv_accepts_cells_longer_than_the_csv_module_default(
    db: Session, project: Project, settings: Settings
) -> None:
    long = "x" * 200_000
    data = f"id,prompt,completion_1,completion_2\nl,{long},a,b\n".encode()
    run_import(db, project, settings, "long.csv", data)
    assert prompt_by_id(db, project, "l").text == long


def test_parquet_with_list_and_struct_columns(
    db: Session, project: Project, settings: Settings
) -> None:
    data = parquet(
        [
            {"id": 1, "prompt": "First", "completions": ["a", "b", "c"], "metadata": {"k": "v"}},
            {"id": 2, "prompt": "Second", "completions": [], "metadata": {"k": "w"}},
        ]
    )
    result = run_import(db, project, settings, "set.parquet", data)
    assert (result.prompts_created, result.completions_created, result.tasks_created) == (2, 3, 3)
    first = prompt_by_id(db, project, "1")
    assert first.text == "First" and first.metadata_ == {"k": "v"}
    assert [c.text for c in first.completions] == ["a", "b", "c"]


def test_parquet_with_json_string_columns(
    db: Session, project: Project, settings: Settings
) -> None:
    data = parquet(
        [
            {
                "id": "c1",
                "messages": json.dumps([{"role": "user", "content": "Hi"}]),
                "completions": json.dumps(["u", "v"]),
                "metadata": None,
            }
        ]
    )
    run_import(db, project, settings, "set.parquet", data)
    c1 = prompt_by_id(db, project, "c1")
    assert c1.messages == [{"role": "user", "content": "Hi"}] and c1.metadata_ == {}


def test_ranking_project_gets_one_task_per_prompt(db: Session, settings: Settings) -> None:
    project = projects.create(
        db, name="rank", mode="ranking", instructions="", candidates_per_task=3
    )
    result = run_import(
        db,
        project,
        settings,
        "r.jsonl",
        jsonl(
            {"id": "r1", "prompt": "P", "completions": ["a", "b", "c", "d", "e"]},
            {"id": "r2", "prompt": "Q", "completions": ["a", "b"]},
        ),
    )
    assert result.tasks_created == 2
    r1 = prompt_by_id(db, project, "r1")
    (task_set,) = task_sets(db, r1)
    assert len(task_set) == 3 and task_set <= {c.id for c in r1.completions}
    # r1's 5 completions fill one task of 3: the upload says 2 are left out
    assert result.notes == (
        "2 completions are in no task: a ranking task shows 3 of a prompt's completions",
    )
    (pair,) = task_sets(db, prompt_by_id(db, project, "r2"))
    assert len(pair) == 2


def test_many_completions_are_capped_by_max_pairs_per_prompt(
    db: Session, project: Project, settings: Settings
) -> None:
    capped = settings.model_copy(update={"max_pairs_per_prompt": 5})
    result = run_import(
        db,
        project,
        capped,
        "big.jsonl",
        jsonl({"id": "big", "prompt": "P", "completions": [f"c{i}" for i in range(8)]}),
    )
    assert result.tasks_created == 5
    big = prompt_by_id(db, project, "big")
    covered = {c for s in task_sets(db, big) for c in s}
    assert covered == {c.id for c in big.completions}  # 5 pairs can cover 8 completions


def test_the_same_seed_makes_the_same_tasks(db: Session, settings: Settings) -> None:
    capped = settings.model_copy(update={"max_pairs_per_prompt": 6})
    row = {"id": "s", "prompt": "P", "completions": [f"c{i}" for i in range(12)]}
    chosen = []
    for name in ("seed-a", "seed-b"):
        project = projects.create(db, name=name, mode="pairwise", instructions="")
        run_import(db, project, capped, "s.jsonl", jsonl(row), seed=7)
        prompt = prompt_by_id(db, project, "s")
        position = {c.id: i for i, c in enumerate(prompt.completions)}
        chosen.append(sorted(tuple(sorted(position[c] for c in s)) for s in task_sets(db, prompt)))
    assert chosen[0] == chosen[1]


# --- validation: every error, with its line, and nothing written ------------------------------


def test_every_bad_line_is_reported_and_nothing_is_written(
    db: Session, project: Project, settings: Settings
) -> None:
    data = jsonl(
        {"id": "ok1", "prompt": "fine", "completions": ["a", "b"]},  # 1
        '{"id": "broken", "prompt": ',  # 2 bad JSON
        '["not", "an", "object"]',  # 3
        {"prompt": "no id"},  # 4
        {"id": "np", "completions": ["a", "b"]},  # 5
        {"id": "both", "prompt": "p", "messages": [{"role": "user", "content": "m"}]},  # 6
        {"id": "role", "messages": [{"role": "robot", "content": "m"}]},  # 7
        {"id": "content", "messages": [{"role": "user", "content": 5}]},  # 8
        {"id": "one", "prompt": "p", "completions": ["only one"]},  # 9
        {"id": "notlist", "prompt": "p", "completions": "a, b"},  # 10
        {"id": "emptyc", "prompt": "p", "completions": ["a", "  "]},  # 11
        {"id": "dupc", "prompt": "p", "completions": ["same", "same"]},  # 12
        {"id": "ok1", "prompt": "again"},  # 13 duplicate id
        {"id": "meta", "prompt": "p", "metadata": ["not", "object"]},  # 14
        {"id": "extra", "prompt": "p", "completion": ["typo"]},  # 15
        {"id": "", "prompt": "p"},  # 16
        {"id": "nul", "prompt": "a\u0000b"},  # 17
        {"id": "msgs", "messages": []},  # 18
    )
    errors = expect_invalid(db, project, settings, "bad.jsonl", data)
    by_line: dict[int, list[str]] = {}
    for e in errors:
        by_line.setdefault(e["line"], []).append(e["error"])
    expected = {
        2: "bad JSON",
        3: "not an object",
        4: "missing id",
        5: "missing prompt",
        6: "both prompt and messages",
        7: "role must be one of system, user, assistant",
        8: "content must be a string",
        9: "fewer than 2 completions",
        10: "completions must be a list",
        11: "completion 2 is empty",
        12: "completion 2 duplicates completion 1",
        13: "duplicate id 'ok1' (first on line 1)",
        14: "metadata must be an object",
        15: "unknown field(s) 'completion'",
        16: "missing id",
        17: "NUL",
        18: "messages must be a non-empty list",
    }
    assert sorted(by_line) == sorted(expected)
    for line, fragment in expected.items():
        assert any(fragment in error for error in by_line[line]), (line, by_line[line])
    assert [e["line"] for e in errors] == sorted(e["line"] for e in errors)


def test_the_message_is_capped_but_errors_are_all_returned(
    db: Session, project: Project, settings: Settings
) -> None:
    data = jsonl(*[{"id": f"x{i}", "prompt": "p", "completions": ["lonely"]} for i in range(40)])
    with pytest.raises(InvalidUpload) as info:
        run_import(db, project, settings, "many.jsonl", data)
    assert len(info.value.errors) == 40
    assert "40 problem(s), nothing was imported" in info.value.message
    assert "and 35 more" in info.value.message
    assert info.value.message.count("line ") == 5


def test_more_than_a_thousand_errors_keeps_the_first_thousand(
    db: Session, project: Project, settings: Settings
) -> None:
    data = b"not json\n" * 1500
    errors = expect_invalid(db, project, settings, "junk.jsonl", data)
    assert len(errors) == 1000 and errors[0]["line"] == 1 and errors[-1]["line"] == 1000


def test_invalid_utf8_is_reported_as_wrong_encoding_by_line(
    db: Session, project: Project, settings: Settings
) -> None:
    data = jsonl({"id": "a", "prompt": "fine"}) + b'{"id": "b", "prompt": "caf\xe9"}\n'
    errors = expect_invalid(db, project, settings, "latin1.jsonl", data)
    assert len(errors) == 1 and errors[0]["line"] == 2
    assert "wrong encoding" in errors[0]["error"] and "UTF-8" in errors[0]["error"]


def test_invalid_utf8_in_csv(db: Session, project: Project, settings: Settings) -> None:
    data = b"id,prompt\na,fine\nb,caf\xe9\n"
    errors = expect_invalid(db, project, settings, "latin1.csv", data)
    assert [(e["line"], "wrong encoding" in e["error"]) for e in errors] == [(3, True)]


def test_utf16_file_is_refused_with_a_clear_reason(
    db: Session, project: Project, settings: Settings
) -> None:
    data = json.dumps({"id": "a", "prompt": "p"}).encode("utf-16")
    (error,) = expect_invalid(db, project, settings, "u16.jsonl", data)
    assert "UTF-16" in error["error"] and "UTF-8" in error["error"]


@pytest.mark.parametrize(
    ("filename", "data"),
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n \n\n"),
        ("empty.csv", b""),
        ("header-only.csv", b"id,prompt\n"),
        ("empty.parquet", b""),
    ],
)
def test_empty_files_are_refused(
    db: Session, project: Project, settings: Settings, filename: str, data: bytes
) -> None:
    (error,) = expect_invalid(db, project, settings, filename, data)
    assert error["line"] == 0
    assert "empty" in error["error"] or "no rows" in error["error"]


def test_a_json_array_file_gets_one_clear_error(
    db: Session, project: Project, settings: Settings
) -> None:
    data = json.dumps([{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "q"}], indent=2).encode()
    assert expect_invalid(db, project, settings, "set.json", data) == [
        {"line": 0, "error": "the file is one JSON array; upload JSON Lines: one object per line"}
    ]


def test_unknown_extension(db: Session, project: Project, settings: Settings) -> None:
    (error,) = expect_invalid(db, project, settings, "set.xlsx", b"whatever")
    assert error["line"] == 0 and "unsupported file type" in error["error"]


def test_unreadable_parquet(db: Session, project: Project, settings: Settings) -> None:
    (error,) = expect_invalid(db, project, settings, "set.parquet", b"PAR1 not really")
    assert "not a readable Parquet file" in error["error"]


def test_oversize_file_raises_upload_too_large(
    db: Session, project: Project, settings: Settings
) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 64})
    data = jsonl({"id": "a", "prompt": "x" * 100})
    with pytest.raises(UploadTooLarge, match="larger than the limit of 64 bytes"):
        run_import(db, project, small, "big.jsonl", data)
    assert count(db, Prompt, project) == 0


def test_csv_header_problems_are_reported_on_line_one(
    db: Session, project: Project, settings: Settings
) -> None:
    data = b"ident,prompt,completions,completion_1,colour\nx,p,,,\n"
    errors = expect_invalid(db, project, settings, "bad.csv", data)
    assert {e["line"] for e in errors} == {1}
    text = " | ".join(e["error"] for e in errors)
    assert "missing column 'id'" in text
    assert "'ident', 'colour'" in text
    assert "not both" in text


def test_csv_row_errors_use_the_physical_line_a_record_starts_on(
    db: Session, project: Project, settings: Settings
) -> None:
    data = (
        b"id,prompt,completions\n"
        b'a,"two\nlines",\n'  # lines 2-3
        b'b,p,"[not json"\n'  # line 4
        b'c,p,"[""one""]"\n'  # line 5
        b"d,p,,extra\n"  # line 6
    )
    errors = expect_invalid(db, project, settings, "bad.csv", data)
    assert [(e["line"], e["error"].split(":")[0]) for e in errors] == [
        (4, "completions"),
        (5, "fewer than 2 completions"),
        (6, "4 fields but the header has 3 columns"),
    ]


def test_parquet_row_errors_use_the_row_number(
    db: Session, project: Project, settings: Settings
) -> None:
    data = parquet(
        [
            {"id": "a", "prompt": "fine", "completions": ["x", "y"]},
            {"id": "b", "prompt": "bad", "completions": ["only"]},
        ]
    )
    (error,) = expect_invalid(db, project, settings, "bad.parquet", data)
    assert error["line"] == 2 and "fewer than 2" in error["error"]


# --- re-upload and upsert ---------------------------------------------------------------------


def test_reupload_without_upsert_is_refused_and_changes_nothing(
    db: Session, project: Project, settings: Settings
) -> None:
    run_import(
        db,
        project,
        settings,
        "v1.jsonl",
        jsonl({"id": "a", "prompt": "old", "completions": ["x", "y"]}, {"id": "b", "prompt": "b"}),
    )
    errors = expect_invalid(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl(
            {"id": "new", "prompt": "fresh"},
            {"id": "a", "prompt": "changed", "completions": ["x", "z"]},
        ),
    )
    assert errors == [
        {
            "line": 2,
            "error": "id 'a' already exists in this project (upload with upsert to update it)",
        }
    ]
    assert prompt_by_id(db, project, "a").text == "old"
    assert count(db, Prompt, project) == 2


def test_the_same_ids_in_another_project_are_fine(
    db: Session, project: Project, settings: Settings
) -> None:
    other = projects.create(db, name="other", mode="pairwise", instructions="")
    data = jsonl({"id": "a", "prompt": "p", "completions": ["x", "y"]})
    run_import(db, project, settings, "a.jsonl", data)
    assert run_import(db, other, settings, "a.jsonl", data).prompts_created == 1


def test_upsert_replaces_text_and_adds_only_new_completions_and_pairs(
    db: Session, project: Project, settings: Settings
) -> None:
    run_import(
        db,
        project,
        settings,
        "v1.jsonl",
        jsonl({"id": "a", "prompt": "old", "completions": ["x", "y"], "metadata": {"v": 1}}),
    )
    a = prompt_by_id(db, project, "a")
    (old_task,) = db.scalars(select(Task).where(Task.prompt_id == a.id)).all()
    old_task.judgment_count, old_task.state = 2, TaskState.done  # counters an upsert keeps
    db.flush()

    result = run_import(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl(
            {
                "id": "a",
                "messages": [{"role": "user", "content": "new"}],
                "completions": ["y", "z", "x"],
                "metadata": {"v": 2},
            },
            {"id": "b", "prompt": "brand new", "completions": ["p", "q"]},
        ),
        upsert=True,
    )

    assert result == prompts.ImportResult(
        prompts_created=1, prompts_updated=1, completions_created=3, tasks_created=3, rows=2
    )
    a = prompt_by_id(db, project, "a")
    assert (a.text, a.messages, a.metadata_) == (
        None,
        [{"role": "user", "content": "new"}],
        {"v": 2},
    )
    assert [c.text for c in a.completions] == ["x", "y", "z"]
    x, y, z = (c.id for c in a.completions)
    assert sorted(task_sets(db, a), key=sorted) == sorted(
        [frozenset((x, y)), frozenset((x, z)), frozenset((y, z))], key=sorted
    )
    db.refresh(old_task)
    assert (old_task.state, old_task.judgment_count) == (TaskState.done, 2)

    again = run_import(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl({"id": "a", "prompt": "text again", "completions": ["z", "x"]}),
        upsert=True,
    )
    assert (again.prompts_updated, again.completions_created, again.tasks_created) == (1, 0, 0)
    a = prompt_by_id(db, project, "a")
    assert (a.text, a.messages, a.metadata_) == ("text again", None, {"v": 2})  # none given
    assert db.scalar(select(Prompt.id).where(Prompt.id == a.id, Prompt.messages.is_(None))) == a.id
    assert count(db, Completion, project) == 5 and count(db, Task, project) == 4


def test_a_waiting_prompt_gets_tasks_when_completions_arrive_by_upsert(
    db: Session, project: Project, settings: Settings
) -> None:
    first = run_import(db, project, settings, "v1.jsonl", jsonl({"id": "w", "prompt": "p"}))
    assert (first.prompts_created, first.tasks_created) == (1, 0)
    second = run_import(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl({"id": "w", "prompt": "p", "completions": ["a", "b"]}),
        upsert=True,
    )
    assert (second.prompts_updated, second.completions_created, second.tasks_created) == (1, 2, 1)


def test_upsert_past_the_cap_still_pairs_every_new_completion(
    db: Session, project: Project, settings: Settings
) -> None:
    capped = settings.model_copy(update={"max_pairs_per_prompt": 3})
    run_import(
        db,
        project,
        capped,
        "v1.jsonl",
        jsonl({"id": "a", "prompt": "p", "completions": ["1", "2", "3"]}),
    )
    result = run_import(
        db,
        project,
        capped,
        "v2.jsonl",
        jsonl({"id": "a", "prompt": "p", "completions": ["1", "2", "3", "4"]}),
        upsert=True,
    )
    assert result.tasks_created == 1
    a = prompt_by_id(db, project, "a")
    assert any(a.completions[3].id in s for s in task_sets(db, a))


JUDGED_TEXT = (
    "id 'q0' differs from the stored prompt, which has judgments: a judged prompt's text "
    "cannot change, or its judgments, exports and snapshots would show text the annotators "
    "never saw (upload it under a new id)"
)
JUDGED_METADATA = (
    "id 'q0' has metadata that differs from the stored prompt's, which has judgments: a judged "
    "prompt's metadata cannot change, since exports and snapshots of its judgments carry it "
    "(leave metadata out to keep it as stored, or upload the prompt under a new id)"
)
LEASED_TEXT = (
    "id 'q0' differs from the stored prompt, which is handed to an annotator whose judgment "
    "is pending: its text cannot change, or that judgment would be about text they never saw "
    "(upload it under a new id)"
)


@pytest.fixture
def judged(db: Session, project: Project, settings: Settings) -> dict[str, Any]:
    """q0 judged by one annotator and frozen in a snapshot; q1 never judged."""
    run_import(
        db,
        project,
        settings,
        "v1.jsonl",
        jsonl(
            {
                "id": "q0",
                "prompt": "Explain TCP.",
                "completions": ["x", "y"],
                "metadata": {"topic": "bio", "n": 1},
            },
            {"id": "q1", "prompt": "Explain UDP.", "completions": ["u", "v"]},
        ),
    )
    q0 = prompt_by_id(db, project, "q0")
    (task,) = db.scalars(select(Task).where(Task.prompt_id == q0.id)).all()
    judgments.record(db, task.id, make_user(db), choice=q0.completions[0].id, now=datetime.now(UTC))
    snap = snapshots.create(db, project.id, {}, created_by=None)
    assert snap.row_count == 1
    return {"snapshot": snap, "q0": q0.id}


def snapshot_bytes(factory: sessionmaker[Session], snap: Snapshot) -> bytes:
    return b"".join(snapshots.stream(factory, snap, shape="pairs", fmt="jsonl"))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"prompt": "COMPLETELY DIFFERENT PROMPT"}, JUDGED_TEXT),
        ({"messages": [{"role": "user", "content": "Explain TCP."}]}, JUDGED_TEXT),
        ({"prompt": "Explain TCP.", "metadata": {"topic": "chem", "n": 1}}, JUDGED_METADATA),
        ({"prompt": "Explain TCP.", "metadata": {"topic": "bio", "n": 1.0}}, JUDGED_METADATA),
        ({"prompt": "Explain TCP.", "metadata": {}}, JUDGED_METADATA),
    ],
    ids=["text", "text-as-messages", "metadata", "metadata-1-to-1.0", "metadata-cleared"],
)
def test_upsert_refuses_to_change_a_judged_prompt_and_imports_nothing(
    db: Session,
    session_factory: sessionmaker[Session],
    project: Project,
    settings: Settings,
    judged: dict[str, Any],
    change: dict[str, Any],
    error: str,
) -> None:
    snap = judged["snapshot"]
    before = snapshot_bytes(session_factory, snap)
    errors = expect_invalid(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl(
            {"id": "new", "prompt": "fresh", "completions": ["m", "n"]},
            {"id": "q0", "completions": ["x", "y", "z"], **change},
            {"id": "q1", "prompt": "Explain UDP, changed.", "completions": ["u", "w"]},
        ),
        upsert=True,
    )
    assert errors == [{"line": 2, "error": error}]
    q0, q1 = prompt_by_id(db, project, "q0"), prompt_by_id(db, project, "q1")
    assert (q0.text, q0.messages, q0.metadata_) == ("Explain TCP.", None, {"topic": "bio", "n": 1})
    assert q1.text == "Explain UDP."  # an allowed row of a refused file is not written either
    assert count(db, Prompt, project) == 2
    assert snapshots.verify(db, snap.id).ok
    assert snapshot_bytes(session_factory, snap) == before


def test_a_refused_text_and_metadata_change_lists_both_and_other_bad_lines(
    db: Session, project: Project, settings: Settings, judged: dict[str, Any]
) -> None:
    errors = expect_invalid(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl(
            {"id": "q0", "prompt": "COMPLETELY DIFFERENT PROMPT", "metadata": {"topic": "x"}},
            {"id": "bad"},
        ),
        upsert=True,
    )
    assert errors == [
        {"line": 1, "error": JUDGED_TEXT},
        {"line": 1, "error": JUDGED_METADATA},
        {"line": 2, "error": "missing prompt (or messages)"},
    ]


def test_upsert_of_a_judged_prompt_adds_completions_and_its_snapshot_still_verifies(
    db: Session,
    session_factory: sessionmaker[Session],
    project: Project,
    settings: Settings,
    judged: dict[str, Any],
) -> None:
    snap = judged["snapshot"]
    before = snapshot_bytes(session_factory, snap)
    result = run_import(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl(
            # Same text; metadata left out (kept), then the same metadata in another key order.
            {"id": "q0", "prompt": "Explain TCP.", "completions": ["z", "x"]},
            {"id": "q1", "prompt": "Explain UDP, changed.", "metadata": {"topic": "net"}},
        ),
        upsert=True,
    )
    assert result == prompts.ImportResult(
        prompts_created=0, prompts_updated=2, completions_created=1, tasks_created=2, rows=2
    )
    again = run_import(
        db,
        project,
        settings,
        "v3.jsonl",
        jsonl({"id": "q0", "prompt": "Explain TCP.", "metadata": {"n": 1, "topic": "bio"}}),
        upsert=True,
    )
    assert (again.prompts_updated, again.completions_created) == (1, 0)
    q0, q1 = prompt_by_id(db, project, "q0"), prompt_by_id(db, project, "q1")
    assert (q0.text, q0.metadata_) == ("Explain TCP.", {"topic": "bio", "n": 1})
    assert [c.text for c in q0.completions] == ["x", "y", "z"]
    x, y, z = (c.id for c in q0.completions)
    assert sorted(task_sets(db, q0), key=sorted) == sorted(
        [frozenset((x, y)), frozenset((x, z)), frozenset((y, z))], key=sorted
    )
    # The unjudged prompt is updated as documented: new text, metadata replaced.
    assert (q1.text, q1.metadata_) == ("Explain UDP, changed.", {"topic": "net"})
    verified = snapshots.verify(db, snap.id)
    assert (verified.ok, verified.row_count, verified.sha256) == (True, 1, snap.sha256)
    assert snapshot_bytes(session_factory, snap) == before


def test_upsert_refuses_new_text_for_a_prompt_an_annotator_holds_even_after_the_lease_expired(
    db: Session, project: Project, settings: Settings
) -> None:
    run_import(
        db,
        project,
        settings,
        "v1.jsonl",
        jsonl({"id": "q0", "prompt": "Explain TCP.", "completions": ["x", "y"]}),
    )
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    claim = tasks.claim_next(
        db, project.id, make_user(db), now=hour_ago, rng=random.Random(0), lease_seconds=60
    )
    assert claim.prompt.text == "Explain TCP." and claim.lease_expires_at < datetime.now(UTC)

    errors = expect_invalid(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl({"id": "q0", "prompt": "COMPLETELY DIFFERENT PROMPT"}),
        upsert=True,
    )
    assert errors == [{"line": 1, "error": LEASED_TEXT}]
    # Metadata is not shown to annotators, and nothing exports it before a judgment exists.
    run_import(
        db,
        project,
        settings,
        "v3.jsonl",
        jsonl({"id": "q0", "prompt": "Explain TCP.", "metadata": {"topic": "net"}}),
        upsert=True,
    )
    q0 = prompt_by_id(db, project, "q0")
    assert (q0.text, q0.metadata_) == ("Explain TCP.", {"topic": "net"})


def test_upsert_keeps_metadata_a_row_leaves_out_and_clears_it_with_an_empty_object(
    db: Session, project: Project, settings: Settings
) -> None:
    run_import(
        db,
        project,
        settings,
        "v1.jsonl",
        jsonl(
            {"id": "q0", "prompt": "p0", "metadata": {"topic": "bio"}},
            {"id": "q1", "prompt": "p1", "metadata": {"topic": "chem"}},
            {"id": "q2", "prompt": "p2", "metadata": {"topic": "math"}},
        ),
    )
    run_import(
        db,
        project,
        settings,
        "v2.jsonl",
        jsonl(
            {"id": "q0", "prompt": "p0 edited"},
            {"id": "q1", "prompt": "p1", "metadata": None},
            {"id": "q2", "prompt": "p2", "metadata": {}},
        ),
        upsert=True,
    )
    assert [
        (p.text, p.metadata_) for p in (prompt_by_id(db, project, f"q{i}") for i in range(3))
    ] == [("p0 edited", {"topic": "bio"}), ("p1", {"topic": "chem"}), ("p2", {})]
    # A blank CSV cell is a value left out too.
    data = b'id,prompt,metadata\nq0,p0 again,\nq1,p1,"{""topic"": ""geo""}"\n'
    run_import(db, project, settings, "v3.csv", data, upsert=True)
    q0, q1 = prompt_by_id(db, project, "q0"), prompt_by_id(db, project, "q1")
    assert (q0.text, q0.metadata_, q1.metadata_) == ("p0 again", {"topic": "bio"}, {"topic": "geo"})


def test_no_task_of_a_prompt_is_claimed_while_an_upsert_changes_its_text(
    committed_factory: sessionmaker[Session], settings: Settings, backend: str
) -> None:
    """Otherwise a claim between the upsert's check and its commit would show the old text,
    and that annotator's judgment would be about text no longer stored."""
    if backend != "postgres":
        pytest.skip(
            "SQLite serializes writers with BEGIN IMMEDIATE; concurrency is a Postgres test"
        )
    with committed_factory() as s, s.begin():
        project = projects.create(s, name="race", mode="pairwise", instructions="")
        run_import(
            s,
            project,
            settings,
            "v1.jsonl",
            jsonl({"id": "q0", "prompt": "old", "completions": ["x", "y"]}),
        )
        annotator_id = make_user(s).id
    with committed_factory() as uploading, committed_factory() as claiming:
        uploading.begin()
        run_import(
            uploading,
            project,
            settings,
            "v2.jsonl",
            jsonl({"id": "q0", "prompt": "new"}),
            upsert=True,
        )
        annotator = claiming.get_one(User, annotator_id)
        with pytest.raises(NoTaskLeft):
            tasks.claim_next(
                claiming, project.id, annotator, now=datetime.now(UTC), rng=random.Random(0)
            )
        claiming.rollback()
        uploading.commit()
        claim = tasks.claim_next(
            claiming, project.id, annotator, now=datetime.now(UTC), rng=random.Random(0)
        )
        assert claim.prompt.text == "new"
        claiming.rollback()


def test_upsert_into_a_missing_project(db: Session, settings: Settings) -> None:
    with pytest.raises(NotFound):
        prompts.import_upload(
            db, 999_999, "a.jsonl", b"{}", upsert=True, rng=random.Random(0), settings=settings
        )


def test_ten_thousand_rows_import_with_every_row_written(
    db: Session, project: Project, settings: Settings
) -> None:
    data = jsonl(
        *[
            {
                "id": f"r{i}",
                "prompt": f"Prompt {i}",
                "completions": [f"a{i}", f"b{i}", f"c{i}"],
                "metadata": {"i": i},
            }
            for i in range(10_000)
        ]
    )
    result = run_import(db, project, settings, "big.jsonl", data)
    assert (result.prompts_created, result.completions_created, result.tasks_created) == (
        10_000,
        30_000,
        30_000,
    )
    assert count(db, Task, project) == 30_000


# --- over HTTP --------------------------------------------------------------------------------


def upload(
    client: TestClient,
    project_id: int,
    headers: dict[str, str],
    filename: str,
    data: bytes,
    **form: str,
) -> Any:
    return client.post(
        f"/api/v1/projects/{project_id}/prompts",
        headers=headers,
        files={"file": (filename, data)},
        data=form,
    )


def test_api_upload_returns_counts(client: TestClient, db: Session, project: Project) -> None:
    headers = make_token(db, make_user(db, Role.admin))
    resp = upload(
        client,
        project.id,
        headers,
        "set.jsonl",
        jsonl({"id": "a", "prompt": "p", "completions": ["x", "y", "z"]}),
    )
    assert resp.status_code == 201, resp.text
    assert resp.json() == {
        "rows": 1,
        "prompts_created": 1,
        "prompts_updated": 0,
        "completions_created": 3,
        "tasks_created": 3,
        "notes": [],
        "summary": "1 rows: 1 prompts created, 0 updated, 3 completions added, 3 tasks created",
    }
    again = upload(
        client,
        project.id,
        headers,
        "set.jsonl",
        jsonl({"id": "a", "prompt": "p2", "completions": ["x", "w"]}),
        upsert="true",
    )
    assert again.status_code == 201
    assert again.json()["prompts_updated"] == 1 and again.json()["completions_created"] == 1


def test_api_upsert_of_a_judged_prompt_is_422_and_the_snapshot_still_verifies(
    client: TestClient,
    db: Session,
    project: Project,
    settings: Settings,
    judged: dict[str, Any],
) -> None:
    headers = make_token(db, make_user(db, Role.admin))
    sid = judged["snapshot"].id
    resp = upload(
        client,
        project.id,
        headers,
        "prompts.jsonl",
        jsonl({"id": "q0", "prompt": "COMPLETELY DIFFERENT PROMPT", "completions": ["x", "y"]}),
        upsert="true",
    )
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"] == "invalid_upload"
    assert body["errors"] == [{"line": 1, "error": JUDGED_TEXT}]
    assert "nothing was imported" in body["detail"] and "line 1: id 'q0'" in body["detail"]
    verified = client.get(f"/api/v1/snapshots/{sid}/verify", headers=headers).json()
    assert verified["ok"] is True
    assert prompt_by_id(db, project, "q0").text == "Explain TCP."


def test_api_upload_lists_line_errors(client: TestClient, db: Session, project: Project) -> None:
    headers = make_token(db, make_user(db, Role.admin))
    resp = upload(
        client,
        project.id,
        headers,
        "bad.jsonl",
        jsonl({"id": "a", "prompt": "p"}, "{oops", {"id": "a", "prompt": "q"}),
    )
    assert resp.status_code == 422
    body = resp.json()
    assert body["error"] == "invalid_upload"
    assert "nothing was imported" in body["detail"]
    assert [e["line"] for e in body["errors"]] == [2, 3]
    assert count(db, Prompt, project) == 0


def test_api_upload_too_large_is_413(
    client: TestClient, db: Session, project: Project, settings: Settings
) -> None:
    headers = make_token(db, make_user(db, Role.admin))
    data = b" " * (settings.max_upload_bytes + 1)
    resp = upload(client, project.id, headers, "huge.jsonl", data)
    assert resp.status_code == 413 and resp.json()["error"] == "upload_too_large"


@pytest.mark.parametrize("role", [Role.annotator, Role.researcher])
def test_api_upload_needs_admin(
    client: TestClient, db: Session, project: Project, role: Role
) -> None:
    headers = make_token(db, make_user(db, role))
    resp = upload(client, project.id, headers, "a.jsonl", jsonl({"id": "a", "prompt": "p"}))
    assert resp.status_code == 403 and resp.json()["error"] == "forbidden"
    assert count(db, Prompt, project) == 0


def test_api_upload_needs_login(client: TestClient, project: Project) -> None:
    resp = upload(client, project.id, {}, "a.jsonl", jsonl({"id": "a", "prompt": "p"}))
    assert resp.status_code == 401 and resp.json()["error"] == "not_authenticated"


def test_api_upload_needs_a_valid_token(client: TestClient, project: Project) -> None:
    headers = {"Authorization": "Bearer pfl_not-a-real-token"}
    resp = upload(client, project.id, headers, "a.jsonl", jsonl({"id": "a", "prompt": "p"}))
    assert resp.status_code == 401 and resp.json()["error"] == "not_authenticated"


def test_api_upload_to_a_missing_project_is_404(client: TestClient, db: Session) -> None:
    headers = make_token(db, make_user(db, Role.admin))
    resp = upload(client, 999_999, headers, "a.jsonl", jsonl({"id": "a", "prompt": "p"}))
    assert resp.status_code == 404


def test_upload_form_shows_every_line_error_in_a_table(
    client: TestClient, db: Session, project: Project
) -> None:
    admin = make_user(db, Role.admin)
    csrf = login(client, admin.username)
    bad = jsonl(
        {"id": "a", "prompt": "<script>alert(1)</script>", "completions": ["solo"]},
        "{nope",
        {"id": "ok", "prompt": "fine"},
    )
    resp = client.post(
        f"/projects/{project.id}/prompts/upload",
        files={"file": ("bad.jsonl", bad)},
        data={"csrf_token": csrf},
    )
    assert resp.status_code == 422
    assert 'id="upload-errors"' in resp.text
    assert "Nothing was imported from bad.jsonl" in resp.text
    assert "<tr><td>1</td><td>fewer than 2 completions" in resp.text
    assert "<tr><td>2</td><td>bad JSON" in resp.text
    assert "<script>alert(1)</script>" not in resp.text
    assert count(db, Prompt, project) == 0


def test_upload_form_success_redirects_and_shows_counts_once(
    client: TestClient, db: Session, project: Project
) -> None:
    admin = make_user(db, Role.admin)
    csrf = login(client, admin.username)
    good = jsonl({"id": "a", "prompt": "p", "completions": ["x", "y"]})
    resp = client.post(
        f"/projects/{project.id}/prompts/upload",
        files={"file": ("good.jsonl", good)},
        data={"csrf_token": csrf},
        follow_redirects=False,
    )
    assert resp.status_code == 303 and resp.headers["location"] == f"/projects/{project.id}"
    page = client.get(f"/projects/{project.id}")
    assert (
        "Imported good.jsonl: 1 rows: 1 prompts created, 0 updated, 2 completions added, "
        "1 tasks created."
    ) in page.text
    assert "Imported good.jsonl" not in client.get(f"/projects/{project.id}").text
    upserted = client.post(
        f"/projects/{project.id}/prompts/upload",
        files={"file": ("good.jsonl", good)},
        data={"csrf_token": csrf, "upsert": "true"},
    )
    assert upserted.status_code == 200 and "0 prompts created, 1 updated" in upserted.text


def test_upload_form_too_large_shows_the_reason(
    client: TestClient, db: Session, project: Project, settings: Settings
) -> None:
    csrf = login(client, make_user(db, Role.admin).username)
    resp = client.post(
        f"/projects/{project.id}/prompts/upload",
        files={"file": ("huge.jsonl", b" " * (settings.max_upload_bytes + 1))},
        data={"csrf_token": csrf},
    )
    assert resp.status_code == 413 and "larger than the limit of" in resp.text


def test_upload_form_without_csrf_token_is_403(
    client: TestClient, db: Session, project: Project
) -> None:
    login(client, make_user(db, Role.admin).username)
    resp = client.post(
        f"/projects/{project.id}/prompts/upload",
        files={"file": ("a.jsonl", jsonl({"id": "a", "prompt": "p"}))},
        data={"csrf_token": "forged"},
    )
    assert resp.status_code == 403 and "CSRF" in resp.text
    assert count(db, Prompt, project) == 0
