"""Export: row values per shape, the three formats agree, filters, roles, and datasets loading."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidInput, NotFound
from app.models import Judgment, Project, ProjectMode, Role, Task, TaskState, User
from app.services import export
from tests.factories import make_project, make_prompt, make_task, make_token, make_user

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def judge(
    db: Session,
    task: Task,
    user: User,
    ranking: list[list[int]],
    *,
    none_acceptable: bool = False,
    created_at: datetime = T0,
    strength: int | None = None,
    rationale: str | None = None,
) -> Judgment:
    """Insert a judgment as the labeling service would, and count it on the task."""
    judgment = Judgment(
        project_id=task.project_id,
        task_id=task.id,
        user_id=user.id,
        ranking=ranking,
        none_acceptable=none_acceptable,
        strength=strength,
        rationale=rationale,
        display_order=list(reversed(task.completion_ids)),
        time_spent_ms=1234,
        created_at=created_at,
    )
    db.add(judgment)
    task.judgment_count += 1
    if task.judgment_count >= task.required_judgments:
        task.state = TaskState.done
    db.flush()
    return judgment


def pairwise(
    db: Session, project: Project, texts: tuple[str, str], **prompt: Any
) -> tuple[Task, int, int]:
    p = make_prompt(db, project, list(texts), **prompt)
    task = make_task(db, project, p)
    a, b = task.completion_ids
    return task, a, b


def collect(
    factory: sessionmaker[Session], project_id: int, shape: str, fmt: str = "jsonl", **filters: Any
) -> bytes:
    return b"".join(export.stream(factory, project_id, shape=shape, fmt=fmt, filters=filters))


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


@pytest.fixture
def labeled(db: Session) -> dict[str, Any]:
    """A pairwise project with a win, a tie and a both-bad verdict by one annotator."""
    project = make_project(db)
    ann = make_user(db, Role.annotator)
    win, wa, wb = pairwise(
        db,
        project,
        ("Hello <b>there</b>", "héllo — ünïcode"),
        external_id="win",
        metadata_={"source": "unit", "n": 1},
    )
    tie, ta, tb = pairwise(db, project, ("x", "y"), external_id="tie")
    bad, ba, bb = pairwise(db, project, ("p", "q"), external_id="bad")
    j_win = judge(db, win, ann, [[wb], [wa]], strength=3, rationale="kinder")
    j_tie = judge(db, tie, ann, [[ta, tb]])
    j_bad = judge(db, bad, ann, [[ba, bb]], none_acceptable=True)
    return {
        "project": project,
        "ann": ann,
        "win": (win, wa, wb, j_win),
        "tie": (tie, ta, tb, j_tie),
        "bad": (bad, ba, bb, j_bad),
    }


def test_pairs_row_for_a_win(
    session_factory: sessionmaker[Session], labeled: dict[str, Any]
) -> None:
    project, ann = labeled["project"], labeled["ann"]
    task, a, b, j = labeled["win"]
    rows = jsonl(collect(session_factory, project.id, "pairs"))
    assert rows == [
        {
            "prompt": "Say hello.",
            "prompt_messages": None,
            "chosen": "héllo — ünïcode",
            "rejected": "Hello <b>there</b>",
            "prompt_id": "win",
            "chosen_id": b,
            "rejected_id": a,
            "task_id": task.id,
            "judgment_id": j.id,
            "annotator": ann.username,
            "strength": 3,
            "rank_distance": 1,
            "created_at": "2024-05-01T12:00:00Z",
            "metadata": {"source": "unit", "n": 1},
        }
    ]
    assert list(rows[0]) == list(export.COLUMNS["pairs"])


def test_jsonl_is_utf8_not_ascii_escaped(
    session_factory: sessionmaker[Session], labeled: dict[str, Any]
) -> None:
    data = collect(session_factory, labeled["project"].id, "pairs")
    assert "héllo — ünïcode".encode() in data
    assert b"\\u00e9" not in data


def test_ranking_with_a_tie_group_gives_all_strict_pairs(
    db: Session, session_factory: sessionmaker[Session]
) -> None:
    project = make_project(db, mode=ProjectMode.ranking, candidates_per_task=4)
    ann = make_user(db)
    p = make_prompt(db, project, ["c0", "c1", "c2", "c3"])
    task = make_task(db, project, p)
    c0, c1, c2, c3 = task.completion_ids
    # c2 best, then c0 and c3 tied, then c1: C(4,2) = 6 pairs minus the one tied pair.
    judge(db, task, ann, [[c2], [c0, c3], [c1]])
    rows = jsonl(collect(session_factory, project.id, "pairs"))
    got = {(r["chosen_id"], r["rejected_id"], r["rank_distance"]) for r in rows}
    assert got == {(c2, c0, 1), (c2, c3, 1), (c2, c1, 2), (c0, c1, 1), (c3, c1, 1)}
    assert len(rows) == 5
    assert {
        (r["chosen"], r["rejected"])
        for r in rows
        if r["chosen_id"] == c2 and r["rejected_id"] == c1
    } == {("c2", "c1")}

    (ranked,) = jsonl(collect(session_factory, project.id, "rankings"))
    assert ranked["completions"] == ["c2", "c0", "c3", "c1"]
    assert ranked["completion_ids"] == [c2, c0, c3, c1]
    assert ranked["ranking"] == [[0], [1, 2], [3]]
    assert ranked["annotator"] == ann.username

    (raw,) = jsonl(collect(session_factory, project.id, "raw"))
    assert raw["choice"] is None  # not pairwise
    assert raw["ranking"] == [[c2], [c0, c3], [c1]]


def test_ties_and_both_bad_are_left_out_of_pairs_but_kept_in_raw(
    session_factory: sessionmaker[Session], labeled: dict[str, Any]
) -> None:
    project = labeled["project"]
    pairs = jsonl(collect(session_factory, project.id, "pairs"))
    assert [r["prompt_id"] for r in pairs] == ["win"]

    raw = {r["prompt_id"]: r for r in jsonl(collect(session_factory, project.id, "raw"))}
    assert set(raw) == {"win", "tie", "bad"}
    _, wa, wb, j_win = labeled["win"]
    _, ta, tb, _ = labeled["tie"]
    _, ba, bb, _ = labeled["bad"]
    assert raw["win"]["choice"] == wb
    assert raw["tie"]["choice"] == "tie"
    assert raw["bad"]["choice"] == "both_bad"
    assert raw["bad"]["none_acceptable"] is True and raw["tie"]["none_acceptable"] is False
    assert raw["tie"]["ranking"] == [[ta, tb]]
    assert raw["win"] == {
        "judgment_id": j_win.id,
        "task_id": labeled["win"][0].id,
        "prompt_id": "win",
        "prompt": "Say hello.",
        "prompt_messages": None,
        "annotator": labeled["ann"].username,
        "ranking": [[wb], [wa]],
        "completions": {str(wa): "Hello <b>there</b>", str(wb): "héllo — ünïcode"},
        "display_order": [wb, wa],
        "choice": wb,
        "none_acceptable": False,
        "strength": 3,
        "rationale": "kinder",
        "time_spent_ms": 1234,
        "is_gold": False,
        "created_at": "2024-05-01T12:00:00Z",
        "metadata": {"source": "unit", "n": 1},
    }
    rankings = jsonl(collect(session_factory, project.id, "rankings"))
    assert len(rankings) == 3


def test_chat_prompt_exports_messages(db: Session, session_factory: sessionmaker[Session]) -> None:
    project = make_project(db)
    ann = make_user(db)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <there>"},
    ]
    task, a, b = pairwise(db, project, ("Hello!", "Go away."), text=None, messages=messages)
    judge(db, task, ann, [[a], [b]])
    (row,) = jsonl(collect(session_factory, project.id, "pairs"))
    assert row["prompt"] == "system: Be brief.\n\nuser: Hi <there>"
    assert row["prompt_messages"] == messages
    assert (row["chosen"], row["rejected"]) == ("Hello!", "Go away.")
    # TRL's is_conversational() looks at an arbitrary one of these keys; a list of messages
    # under any of them would make it treat our plain-text prompt as a chat.
    assert not {"messages", "completion"} & set(row)
    assert all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected"))


def _csv_rows(data: bytes, shape: str) -> list[dict[str, Any]]:
    """Decode a CSV export back into JSONL-equal values using the documented column kinds."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    assert reader.fieldnames == list(export.COLUMNS[shape])
    out = []
    for rec in reader:
        row: dict[str, Any] = {}
        for name, kind in export.COLUMNS[shape].items():
            cell = rec[name]
            if cell == "":
                row[name] = None
            elif kind == "str":
                row[name] = cell
            elif kind == "int":
                row[name] = int(cell)
            elif kind == "choice":
                row[name] = cell
            else:
                row[name] = json.loads(cell)
        out.append(row)
    return out


def _parquet_rows(data: bytes, shape: str) -> list[dict[str, Any]]:
    table = pq.read_table(pa.BufferReader(data))
    assert table.schema == export.parquet_schema(shape)
    rows = table.to_pylist()
    for row in rows:
        for name, kind in export.COLUMNS[shape].items():
            if kind == "json" and row[name] is not None:
                row[name] = json.loads(row[name])
    return rows


def _choice_as_text(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "choice": None if r["choice"] is None else str(r["choice"])} for r in rows]


@pytest.mark.parametrize("shape", export.SHAPES)
def test_csv_and_parquet_carry_the_same_values_as_jsonl(
    db: Session, session_factory: sessionmaker[Session], labeled: dict[str, Any], shape: str
) -> None:
    project = labeled["project"]
    chat, a, b = pairwise(
        db,
        project,
        ('He said "hi",\nthen left', "line1\r\nline2"),
        text=None,
        messages=[{"role": "user", "content": "Hi"}],
    )
    judge(db, chat, labeled["ann"], [[a], [b]])
    expected = jsonl(collect(session_factory, project.id, shape))
    assert len(expected) == (2 if shape == "pairs" else 4)
    from_csv = _csv_rows(collect(session_factory, project.id, shape, "csv"), shape)
    from_parquet = _parquet_rows(collect(session_factory, project.id, shape, "parquet"), shape)
    if shape == "raw":  # CSV and Parquet carry the choice as text (ids and "tie" share a column)
        expected = _choice_as_text(expected)
    assert from_csv == expected
    assert from_parquet == expected


def test_parquet_of_many_rows_is_written_in_row_groups(
    db: Session, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "ROW_GROUP_ROWS", 3)
    monkeypatch.setattr(export, "BATCH_ROWS", 2)
    project = make_project(db)
    ann = make_user(db)
    for i in range(7):
        task, a, b = pairwise(db, project, (f"a{i}", f"b{i}"), external_id=f"x{i}")
        judge(db, task, ann, [[a], [b]])
    chunks = list(
        export.stream(session_factory, project.id, shape="pairs", fmt="parquet", filters={})
    )
    assert len(chunks) == 3  # two full row groups sent as written, then the last one + footer
    data = b"".join(chunks)
    parquet = pq.ParquetFile(pa.BufferReader(data))
    assert parquet.metadata.num_row_groups == 3
    assert [r["prompt_id"] for r in parquet.read().to_pylist()] == [f"x{i}" for i in range(7)]


def test_empty_export_is_a_valid_file(db: Session, session_factory: sessionmaker[Session]) -> None:
    project = make_project(db)
    assert collect(session_factory, project.id, "pairs") == b""
    assert (
        collect(session_factory, project.id, "pairs", "csv").decode()
        == ",".join(export.COLUMNS["pairs"]) + "\n"
    )
    table = pq.read_table(pa.BufferReader(collect(session_factory, project.id, "pairs", "parquet")))
    assert table.num_rows == 0 and table.schema == export.parquet_schema("pairs")


def test_filters_since_until_and_annotator(
    db: Session, session_factory: sessionmaker[Session]
) -> None:
    project = make_project(db, judgments_per_task=2)
    alice = make_user(db, username="alice-export")
    bob = make_user(db, username="bob-export")
    days = {
        "d1": datetime(2024, 5, 1, 9, tzinfo=UTC),
        "d2": datetime(2024, 5, 2, 23, 59, tzinfo=UTC),
        "d3": datetime(2024, 5, 3, 0, 0, tzinfo=UTC),
    }
    for key, when in days.items():
        task, a, b = pairwise(db, project, ("a", "b"), external_id=key)
        judge(db, task, alice, [[a], [b]], created_at=when)
        judge(db, task, bob, [[b], [a]], created_at=when)

    def ids(**filters: Any) -> list[tuple[str, str]]:
        rows = jsonl(collect(session_factory, project.id, "raw", **filters))
        return [(r["prompt_id"], r["annotator"]) for r in rows]

    assert len(ids()) == 6
    assert {p for p, _ in ids(since="2024-05-02")} == {"d2", "d3"}
    assert {p for p, _ in ids(until="2024-05-02")} == {"d1", "d2"}  # a bare date: that whole day
    assert {p for p, _ in ids(until="2024-05-02T23:59:00Z")} == {"d1"}  # a datetime: exclusive
    assert {p for p, _ in ids(since="2024-05-02T23:59:00+00:00", until="2024-05-02")} == {"d2"}
    assert {p for p, _ in ids(since="2024-05-02T18:00:00-05:00")} == {"d2", "d3"}  # 23:00Z
    assert ids(annotator="alice-export") == [
        ("d1", "alice-export"),
        ("d2", "alice-export"),
        ("d3", "alice-export"),
    ]
    assert len(ids(annotator=["alice-export", "bob-export"])) == 6
    assert ids(annotator=["bob-export"], since="2024-05-03") == [("d3", "bob-export")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": "triples", "fmt": "jsonl", "filters": {}}, "unknown shape"),
        ({"shape": "pairs", "fmt": "xlsx", "filters": {}}, "unknown format"),
        ({"shape": "pairs", "fmt": "jsonl", "filters": {"labeler": "x"}}, "unknown export filter"),
        ({"shape": "pairs", "fmt": "jsonl", "filters": {"since": "yesterday"}}, "ISO 8601"),
        (
            {
                "shape": "pairs",
                "fmt": "jsonl",
                "filters": {"since": "2024-05-02", "until": "2024-05-01"},
            },
            "later",
        ),
        (
            {"shape": "pairs", "fmt": "jsonl", "filters": {"annotator": "nobody-here"}},
            "nobody-here",
        ),
    ],
)
def test_bad_requests_fail_before_any_byte(
    db: Session, session_factory: sessionmaker[Session], kwargs: dict[str, Any], message: str
) -> None:
    project = make_project(db)
    with pytest.raises(InvalidInput, match=message):
        export.stream(session_factory, project.id, **kwargs)  # no iteration: it raises on call
    if kwargs["fmt"] == "jsonl":  # rows() validates up front too (it has no format)
        with pytest.raises(InvalidInput, match=message):
            export.rows(db, project.id, shape=kwargs["shape"], filters=kwargs["filters"])


def test_missing_project_is_not_found(session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(NotFound):
        export.stream(session_factory, 987654, shape="pairs", fmt="jsonl", filters={})


def test_rows_reuses_a_session(db: Session, labeled: dict[str, Any]) -> None:
    rows = list(
        export.rows(
            db, labeled["project"].id, shape="pairs", filters={"annotator": labeled["ann"].username}
        )
    )
    assert [r["prompt_id"] for r in rows] == ["win"]


# --- HTTP -------------------------------------------------------------------------------


def test_api_streams_jsonl_with_a_filename(client, db: Session, labeled: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    project = labeled["project"]
    headers = make_token(db, make_user(db, Role.researcher))
    resp = client.get(
        f"/api/v1/projects/{project.id}/export?shape=pairs&format=jsonl", headers=headers
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    assert (
        resp.headers["content-disposition"]
        == f'attachment; filename="project-{project.id}-pairs.jsonl"'
    )
    assert [r["prompt_id"] for r in jsonl(resp.content)] == ["win"]


@pytest.mark.parametrize(
    ("fmt", "media"), [("csv", "text/csv"), ("parquet", "application/vnd.apache.parquet")]
)
def test_api_other_formats(
    client, db: Session, labeled: dict[str, Any], fmt: str, media: str
) -> None:  # type: ignore[no-untyped-def]
    project = labeled["project"]
    headers = make_token(db, make_user(db, Role.admin))
    resp = client.get(
        f"/api/v1/projects/{project.id}/export",
        params={"shape": "raw", "format": fmt},
        headers=headers,
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith(media)
    assert f'filename="project-{project.id}-raw.{fmt}"' in resp.headers["content-disposition"]
    rows = _csv_rows(resp.content, "raw") if fmt == "csv" else _parquet_rows(resp.content, "raw")
    assert sorted(r["choice"] for r in rows) == sorted([str(labeled["win"][2]), "tie", "both_bad"])


def test_api_filters(client, db: Session, labeled: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    project = labeled["project"]
    other = make_user(db, username="carol-export")
    task, a, b = pairwise(db, project, ("m", "n"), external_id="late")
    judge(db, task, other, [[a], [b]], created_at=datetime(2024, 6, 1, tzinfo=UTC))
    headers = make_token(db, make_user(db, Role.researcher))
    url = f"/api/v1/projects/{project.id}/export"
    rows = jsonl(
        client.get(
            url, params={"shape": "raw", "annotator": ["carol-export"]}, headers=headers
        ).content
    )
    assert [r["prompt_id"] for r in rows] == ["late"]
    blank_form = {"shape": "raw", "format": "jsonl", "since": "", "until": "", "annotator": ""}
    assert len(jsonl(client.get(url, params=blank_form, headers=headers).content)) == 4
    rows = jsonl(
        client.get(url, params={"shape": "raw", "until": "2024-05-31"}, headers=headers).content
    )
    assert sorted(r["prompt_id"] for r in rows) == ["bad", "tie", "win"]
    rows = jsonl(
        client.get(
            url, params={"shape": "raw", "since": "2024-05-02", "until": ""}, headers=headers
        ).content
    )
    assert [r["prompt_id"] for r in rows] == ["late"]


def test_api_roles(client, db: Session, labeled: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    url = f"/api/v1/projects/{labeled['project'].id}/export"
    assert client.get(url).status_code == 401
    assert client.get(url).json()["error"] == "not_authenticated"
    resp = client.get(url, headers=make_token(db, make_user(db, Role.annotator)))
    assert resp.status_code == 403 and resp.json()["error"] == "forbidden"
    assert (
        client.get(url, headers=make_token(db, make_user(db, Role.researcher))).status_code == 200
    )
    assert client.get(url, headers=make_token(db, make_user(db, Role.admin))).status_code == 200


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("shape=triples", "shape"),
        ("format=xlsx", "format"),
        ("since=soon", "since"),
        ("anotator=x", "anotator"),
    ],
)
def test_api_bad_parameters_are_422_json(
    client, db: Session, labeled: dict[str, Any], query: str, field: str
) -> None:  # type: ignore[no-untyped-def]
    headers = make_token(db, make_user(db, Role.researcher))
    resp = client.get(f"/api/v1/projects/{labeled['project'].id}/export?{query}", headers=headers)
    assert resp.status_code == 422
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error"] == "invalid_input" and field in body["detail"]


def test_api_unknown_project_is_404(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    headers = make_token(db, make_user(db, Role.researcher))
    resp = client.get("/api/v1/projects/987654/export", headers=headers)
    assert resp.status_code == 404 and resp.json()["error"] == "not_found"


def test_export_page_lists_every_shape_and_format(
    client, db: Session, labeled: dict[str, Any]
) -> None:  # type: ignore[no-untyped-def]
    project = labeled["project"]
    resp = client.get(
        f"/projects/{project.id}/export", headers=make_token(db, make_user(db, Role.researcher))
    )
    assert resp.status_code == 200, resp.text
    page = resp.text
    for shape in export.SHAPES:
        for fmt in export.FORMATS:
            assert f"/api/v1/projects/{project.id}/export?shape={shape}&amp;format={fmt}" in page
    assert (
        f'datasets.load_dataset("json", data_files="project-{project.id}-pairs.jsonl", split="train")'
        in page.replace("&#34;", '"')
    )
    assert "RewardTrainer" in page and "DPOTrainer" in page
    assert "<b>3</b>judgments" in page


def test_export_page_roles(client, db: Session, labeled: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    url = f"/projects/{labeled['project'].id}/export"
    resp = client.get(url, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/login")
    as_json = {"Accept": "application/json"}
    annotator = make_token(db, make_user(db, Role.annotator))
    resp = client.get(url, headers=annotator | as_json)
    assert resp.status_code == 403 and resp.json()["error"] == "forbidden"
    admin = make_token(db, make_user(db, Role.admin))
    assert client.get(url, headers=admin).status_code == 200
    assert client.get("/projects/987654/export", headers=admin | as_json).status_code == 404


def test_export_page_forbidden_as_html(client, db: Session, labeled: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    url = f"/projects/{labeled['project'].id}/export"
    resp = client.get(url, headers=make_token(db, make_user(db, Role.annotator)))
    assert resp.status_code == 403 and "needs the admin, researcher role" in resp.text


# --- the acceptance test ----------------------------------------------------------------


def test_pairs_export_loads_into_datasets(
    db: Session, session_factory: sessionmaker[Session], labeled: dict[str, Any], tmp_path: Path
) -> None:
    """Done-when of issue 2: an export from a labeled project loads into `datasets`."""
    datasets = pytest.importorskip("datasets")
    project, ann = labeled["project"], labeled["ann"]
    chat, a, b = pairwise(
        db,
        project,
        ("Sure!", "No."),
        text=None,
        external_id="chat",
        messages=[{"role": "user", "content": "Help?"}],
    )
    judge(db, chat, ann, [[a], [b]], strength=1)
    path = tmp_path / f"project-{project.id}-pairs.jsonl"
    path.write_bytes(collect(session_factory, project.id, "pairs"))

    ds = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.column_names == list(export.COLUMNS["pairs"])
    assert ds.num_rows == 2
    assert ds["prompt"] == ["Say hello.", "user: Help?"]
    assert ds["chosen"] == ["héllo — ünïcode", "Sure!"]
    assert ds["rejected"] == ["Hello <b>there</b>", "No."]
    assert ds["prompt_id"] == ["win", "chat"]
    assert ds["strength"] == [3, 1]
    assert ds["annotator"] == [ann.username, ann.username]
    assert ds["prompt_messages"] == [None, [{"role": "user", "content": "Help?"}]]
    assert ds[0]["metadata"] == {"source": "unit", "n": 1}
    assert ds[1]["metadata"] == {}

    pq_path = tmp_path / f"project-{project.id}-pairs.parquet"
    pq_path.write_bytes(collect(session_factory, project.id, "pairs", "parquet"))
    ds_pq = datasets.load_dataset(
        "parquet", data_files=str(pq_path), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds_pq.column_names == ds.column_names
    assert ds_pq["chosen"] == ds["chosen"] and ds_pq["rejected"] == ds["rejected"]


def test_streaming_body_reads_in_its_own_session_after_the_request_commits(
    backend_settings,
    committed_factory: sessionmaker[Session],  # type: ignore[no-untyped-def]
) -> None:
    """With the real engine (SQLite takes a write lock per transaction), the body's session
    must start only after the request's has committed, or the download would block or fail."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with committed_factory() as s, s.begin():
        project = make_project(s)
        task, a, b = pairwise(s, project, ("yes", "no"), external_id="real")
        judge(s, task, make_user(s), [[a], [b]])
        headers = make_token(s, make_user(s, Role.researcher))
        project_id = project.id
    app = create_app(backend_settings)
    try:
        with TestClient(app) as client:
            resp = client.get(f"/api/v1/projects/{project_id}/export", headers=headers)
            assert resp.status_code == 200, resp.text
            assert [(r["chosen"], r["rejected"]) for r in jsonl(resp.content)] == [("yes", "no")]
            resp = client.get(
                f"/api/v1/projects/{project_id}/export?format=parquet&shape=raw", headers=headers
            )
            assert pq.read_table(pa.BufferReader(resp.content)).column("prompt_id").to_pylist() == [
                "real"
            ]
    finally:
        app.state.engine.dispose()
