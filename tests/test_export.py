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
    """JSON Lines split on newlines only (str.splitlines would also split at U+2028 and
    other separators that JSON leaves unescaped inside strings)."""
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line]


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
            "margin": 3,
            "tie": False,
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
    # No strength given: the margin is the rank distance.
    assert all(r["margin"] == r["rank_distance"] and r["tie"] is False for r in rows)

    (ranked,) = jsonl(collect(session_factory, project.id, "rankings"))
    assert ranked["completions"] == ["c0", "c1", "c2", "c3"]  # the task's order
    assert ranked["completion_ids"] == [c0, c1, c2, c3]
    assert ranked["ranking"] == [[2], [0, 3], [1]]  # c2, then c0 = c3, then c1
    assert ranked["consensus_method"] == "single"
    assert ranked["agreement"] is None  # one judgment: nothing to agree with
    assert ranked["judgments"] == [
        {
            "judgment_id": ranked["judgments"][0]["judgment_id"],
            "annotator": ann.username,
            "ranking": [[2], [0, 3], [1]],
            "none_acceptable": False,
            "strength": None,
        }
    ]

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
            elif kind == "float":
                row[name] = float(cell)
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
def test_csv_parquet_and_hf_carry_the_same_values_as_jsonl(
    db: Session,
    session_factory: sessionmaker[Session],
    labeled: dict[str, Any],
    shape: str,
    tmp_path: Path,
) -> None:
    project = labeled["project"]
    chat, a, b = pairwise(
        db,
        project,
        ('He said "hi",\nthen left', "line1\r\nline2"),
        text=None,
        messages=[{"role": "user", "content": "Hi"}],
    )
    judge(db, chat, labeled["ann"], [[a], [b]], strength=2)
    second = make_user(db)
    judge(db, chat, second, [[b], [a]])  # a second opinion: the rankings row gets an agreement
    expected = jsonl(collect(session_factory, project.id, shape))
    assert len(expected) == {"pairs": 3, "rankings": 4, "raw": 5}[shape]
    if shape == "rankings":
        (chat_row,) = [r for r in expected if r["task_id"] == chat.id]
        assert chat_row["agreement"] == 0.0 and chat_row["consensus_method"] == "kemeny"
        assert chat_row["ranking"] == [[0, 1]]  # one each way: the consensus is a tie
    from_csv = _csv_rows(collect(session_factory, project.id, shape, "csv"), shape)
    from_parquet = _parquet_rows(collect(session_factory, project.id, shape, "parquet"), shape)
    from_hf = _hf_rows(collect(session_factory, project.id, shape, "hf"), shape, tmp_path)
    if shape == "raw":  # CSV and Parquet carry the choice as text (ids and "tie" share a column)
        expected = _choice_as_text(expected)
    assert from_csv == expected
    assert from_parquet == expected
    assert from_hf == expected


def _hf_rows(data: bytes, shape: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Unpack the hf archive and open it with `datasets.load_from_disk`, as a user would."""
    datasets = pytest.importorskip("datasets")
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "hf", filter="data")
    top = names[0]
    assert all(n == top or n.startswith(top + "/") for n in names)
    ds = datasets.load_from_disk(str(tmp_path / "hf" / top))
    assert ds.column_names == list(export.COLUMNS[shape])
    rows = ds.to_list()
    for row in rows:
        for name, kind in export.COLUMNS[shape].items():
            if kind == "json" and row[name] is not None:
                row[name] = json.loads(row[name])
    return rows


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
        f'datasets.load_dataset("parquet", data_files="project-{project.id}-pairs.parquet", '
        'split="train")' in page.replace("&#34;", '"')
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


def test_export_page_title_and_import_section(client, db: Session, labeled: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """The import help is page content for admins only, never part of the <title>."""
    project = labeled["project"]
    url = f"/projects/{project.id}/export"
    admin_page = client.get(url, headers=make_token(db, make_user(db, Role.admin))).text
    title = admin_page.split("<title>", 1)[1].split("</title>", 1)[0]
    assert title == f"Export · {project.name} · Prefloop"
    body = admin_page.split("</title>", 1)[1]
    assert body.count("Import preference data") == 1
    researcher = make_token(db, make_user(db, Role.researcher))
    assert "Import preference data" not in client.get(url, headers=researcher).text


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


def test_parquet_keeps_types_of_columns_that_are_null_in_the_first_row_groups(
    db: Session,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The documented loader for large exports: Parquet's schema is fixed up front, so a
    `strength`, a chat prompt and a metadata key that first appear in a late row group still
    load (datasets' JSON reader types a column from the file's first 10 MB instead). Row
    groups of 2 rows, converted 1 row at a time, stand in for a large file."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(export, "ROW_GROUP_ROWS", 2)
    monkeypatch.setattr(export, "ARROW_CHUNK_ROWS", 1)
    project = make_project(db)
    ann = make_user(db, Role.annotator)
    for i in range(4):
        task, a, b = pairwise(db, project, (f"good {i}", f"bad {i}"), external_id=f"t{i}")
        judge(db, task, ann, [[a], [b]])
    chat, a, b = pairwise(
        db,
        project,
        ("Sure!", "No."),
        text=None,
        external_id="chat",
        messages=[{"role": "user", "content": "Help?"}],
        metadata_={"topic": "late"},
    )
    judge(db, chat, ann, [[a], [b]], strength=2)
    path = tmp_path / "pairs.parquet"
    path.write_bytes(collect(session_factory, project.id, "pairs", "parquet"))
    assert pq.ParquetFile(path).num_row_groups == 3

    ds = datasets.load_dataset(
        "parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.num_rows == 5
    assert ds["strength"] == [None, None, None, None, 2]
    assert ds["prompt_messages"] == [None] * 4 + [[{"role": "user", "content": "Help?"}]]
    assert [json.loads(m) for m in ds["metadata"]] == [{}] * 4 + [{"topic": "late"}]
    assert ds["chosen"] == ["good 0", "good 1", "good 2", "good 3", "Sure!"]


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


# --- issue 4: margin and ties, consensus rankings, new filters, hf, determinism -------------


def test_ties_keep_adds_flagged_tied_pairs(
    db: Session, session_factory: sessionmaker[Session], labeled: dict[str, Any]
) -> None:
    project = labeled["project"]
    rows = jsonl(collect(session_factory, project.id, "pairs"))
    assert [(r["prompt_id"], r["tie"]) for r in rows] == [("win", False)]
    kept = jsonl(
        b"".join(
            export.stream(
                session_factory, project.id, shape="pairs", fmt="jsonl", filters={}, ties=True
            )
        )
    )
    _, ta, tb, j_tie = labeled["tie"]
    # The win, then the tie as a flagged pair with margin 0; "both bad" still gives nothing.
    assert [(r["prompt_id"], r["tie"], r["margin"]) for r in kept] == [
        ("win", False, 3),
        ("tie", True, 0),
    ]
    tie_row = kept[1]
    assert (tie_row["chosen_id"], tie_row["rejected_id"]) == (min(ta, tb), max(ta, tb))
    assert (tie_row["chosen"], tie_row["rejected"], tie_row["rank_distance"]) == ("x", "y", 0)
    assert tie_row["judgment_id"] == j_tie.id


def test_ranking_tie_pairs_with_keep(db: Session, session_factory: sessionmaker[Session]) -> None:
    project = make_project(db, mode=ProjectMode.ranking, candidates_per_task=4)
    p = make_prompt(db, project, ["c0", "c1", "c2", "c3"])
    task = make_task(db, project, p)
    c0, c1, c2, c3 = task.completion_ids
    judge(db, task, make_user(db), [[c2], [c0, c3], [c1]], strength=2)
    rows = list(export.rows(db, project.id, shape="pairs", filters={}, ties=True))
    assert len(rows) == 6  # C(4, 2): five strict pairs and the one tie
    assert [
        (r["chosen_id"], r["rejected_id"], r["tie"], r["margin"]) for r in rows if r["tie"]
    ] == [(c0, c3, True, 0)]
    assert {r["margin"] for r in rows if not r["tie"]} == {2}  # the strength, when given


def test_rankings_row_has_the_consensus_of_all_annotators(
    db: Session, session_factory: sessionmaker[Session]
) -> None:
    project = make_project(
        db, mode=ProjectMode.ranking, candidates_per_task=3, judgments_per_task=3
    )
    p = make_prompt(db, project, ["x", "y", "z"], external_id="r1")
    task = make_task(db, project, p)
    x, y, z = task.completion_ids
    ann = [make_user(db, username=f"rk-{i}") for i in range(3)]
    judge(db, task, ann[0], [[x], [y], [z]], created_at=T0)
    judge(db, task, ann[1], [[x], [y], [z]], created_at=datetime(2024, 5, 2, tzinfo=UTC))
    judge(db, task, ann[2], [[z], [y], [x]], strength=1, created_at=T0)
    (row,) = jsonl(collect(session_factory, project.id, "rankings"))
    assert row["completions"] == ["x", "y", "z"]
    assert row["ranking"] == [[0], [1], [2]]  # the majority order
    assert row["consensus_method"] == "kemeny"
    # 3 annotator pairs x 3 candidate pairs: the first two agree on all 3, the third on none.
    assert row["agreement"] == pytest.approx(3 / 9)
    assert [j["annotator"] for j in row["judgments"]] == ["rk-0", "rk-1", "rk-2"]
    assert row["judgments"][2]["ranking"] == [[2], [1], [0]]
    assert row["judgments"][2]["strength"] == 1
    assert row["created_at"] == "2024-05-02T00:00:00Z"  # the newest judgment


def _two_annotator_project(db: Session) -> dict[str, Any]:
    """Four tasks judged by alice and bob: they agree on t1 and t2, disagree on t3 and t4;
    carol judged t1 alone and is paused. Prompt metadata: lang en/de."""
    project = make_project(db, judgments_per_task=2)
    alice = make_user(db, username="alice-f")
    bob = make_user(db, username="bob-f")
    carol = make_user(db, username="carol-f")
    tasks = {}
    for key, lang in (("t1", "en"), ("t2", "en"), ("t3", "de"), ("t4", "de")):
        task, a, b = pairwise(
            db,
            project,
            (f"{key}a", f"{key}b"),
            external_id=key,
            metadata_={"lang": lang, "n": int(key[1])},
        )
        tasks[key] = (task, a, b)
        judge(db, task, alice, [[a], [b]])
        judge(db, task, bob, [[a], [b]] if key in ("t1", "t2") else [[b], [a]])
    extra, ea, eb = pairwise(
        db, project, ("sa", "sb"), external_id="solo", metadata_={"lang": "en"}
    )
    judge(db, extra, carol, [[ea], [eb]])
    carol.active = False
    db.flush()
    return {"project": project, "alice": alice, "bob": bob, "carol": carol, "tasks": tasks}


def _ids(db: Session, project_id: int, **filters: Any) -> list[tuple[str, str]]:
    rows = export.rows(db, project_id, shape="raw", filters=filters)
    return [(r["prompt_id"], r["annotator"]) for r in rows]


def test_filter_exclude_annotator_and_paused(db: Session) -> None:
    data = _two_annotator_project(db)
    pid = data["project"].id
    assert len(_ids(db, pid)) == 9
    assert {a for _, a in _ids(db, pid, exclude_annotator="bob-f")} == {"alice-f", "carol-f"}
    assert {a for _, a in _ids(db, pid, exclude_annotator=["bob-f", "alice-f"])} == {"carol-f"}
    assert {a for _, a in _ids(db, pid, exclude_paused=True)} == {"alice-f", "bob-f"}
    assert {a for _, a in _ids(db, pid, exclude_paused="false")} == {"alice-f", "bob-f", "carol-f"}
    both = _ids(db, pid, annotator=["alice-f", "carol-f"], exclude_paused="true")
    assert {a for _, a in both} == {"alice-f"}
    with pytest.raises(InvalidInput, match="nobody-x"):
        _ids(db, pid, exclude_annotator="nobody-x")


def test_filter_min_agreement(db: Session) -> None:
    data = _two_annotator_project(db)
    pid = data["project"].id
    # t1, t2: both annotators agree (1.0); t3, t4: they disagree (0.0); solo: one judgment,
    # so no agreement to measure: left out by any minimum.
    assert sorted({p for p, _ in _ids(db, pid, min_agreement=0.5)}) == ["t1", "t2"]
    assert sorted({p for p, _ in _ids(db, pid, min_agreement="1")}) == ["t1", "t2"]
    assert sorted({p for p, _ in _ids(db, pid, min_agreement=0)}) == ["t1", "t2", "t3", "t4"]
    # Agreement among the *selected* judgments: with bob left out nobody overlaps.
    assert _ids(db, pid, min_agreement=0, exclude_annotator="bob-f") == []
    for bad in ("1.5", "-0.1", "lots", True):
        with pytest.raises(InvalidInput, match="min_agreement"):
            _ids(db, pid, min_agreement=bad)


def test_filter_min_gold_accuracy(db: Session) -> None:
    data = _two_annotator_project(db)
    project, alice, bob = data["project"], data["alice"], data["bob"]
    # Gold judgments as the gold feature records them: alice 2/2 right, bob 1/3.
    for user, answers in ((alice, [True, True]), (bob, [True, False, False])):
        for i, correct in enumerate(answers):
            gold, ga, gb = pairwise(db, project, ("ga", "gb"), external_id=f"g-{user.id}-{i}")
            j = judge(db, gold, user, [[ga], [gb]])
            j.is_gold, j.gold_correct = True, correct
    db.flush()
    assert export.gold_accuracy(db, project.id) == {alice.id: (2, 2), bob.id: (1, 3)}
    assert {a for _, a in _ids(db, project.id, min_gold_accuracy=0.5)} == {"alice-f"}
    assert {a for _, a in _ids(db, project.id, min_gold_accuracy=0.3)} == {"alice-f", "bob-f"}
    # carol judged no gold item: her accuracy is unknown, so any minimum leaves her out.
    assert "carol-f" not in {a for _, a in _ids(db, project.id, min_gold_accuracy=0.0)}


def test_filter_prompt_metadata(db: Session) -> None:
    data = _two_annotator_project(db)
    pid = data["project"].id
    assert sorted({p for p, _ in _ids(db, pid, **{"meta.lang": "de"})}) == ["t3", "t4"]
    assert sorted({p for p, _ in _ids(db, pid, meta={"lang": "en", "n": 2})}) == ["t2"]
    assert sorted({p for p, _ in _ids(db, pid, meta="n=1")}) == ["t1"]  # numbers match as JSON
    assert sorted({p for p, _ in _ids(db, pid, **{"meta.n": ["1", "4"]})}) == ["t1", "t4"]
    assert _ids(db, pid, **{"meta.missing": "x"}) == []
    assert len(_ids(db, pid, meta="")) == 9  # a blank form field is no filter
    with pytest.raises(InvalidInput, match="key=value"):
        _ids(db, pid, meta="lang")
    with pytest.raises(InvalidInput, match="unknown export filter"):
        _ids(db, pid, metadata="x")


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_the_same_export_twice_is_byte_identical(
    session_factory: sessionmaker[Session], labeled: dict[str, Any], fmt: str
) -> None:
    project = labeled["project"]
    for shape in export.SHAPES:
        first = collect(session_factory, project.id, shape, fmt)
        assert first
        assert collect(session_factory, project.id, shape, fmt) == first


def test_hf_save_to_disk_writes_a_loadable_directory(
    session_factory: sessionmaker[Session], labeled: dict[str, Any], tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    project = labeled["project"]
    target = tmp_path / "out"
    assert export.save_to_disk(session_factory, project.id, target, shape="raw") == 3
    ds = datasets.load_from_disk(str(target))
    assert sorted(ds["prompt_id"]) == ["bad", "tie", "win"]
    assert sorted(ds["choice"]) == sorted([str(labeled["win"][2]), "tie", "both_bad"])
    with pytest.raises(InvalidInput, match="not empty"):
        export.save_to_disk(session_factory, project.id, target, shape="raw")


def test_api_hf_download_and_ties_parameter(
    client, db: Session, labeled: dict[str, Any], tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    project = labeled["project"]
    headers = make_token(db, make_user(db, Role.researcher))
    url = f"/api/v1/projects/{project.id}/export"
    resp = client.get(url, params={"shape": "pairs", "format": "hf"}, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/gzip"
    assert f'filename="project-{project.id}-pairs.tar.gz"' in resp.headers["content-disposition"]
    assert [r["prompt_id"] for r in _hf_rows(resp.content, "pairs", tmp_path)] == ["win"]
    kept = jsonl(client.get(url, params={"ties": "keep"}, headers=headers).content)
    assert [r["tie"] for r in kept] == [False, True]
    resp = client.get(url, params={"ties": "maybe"}, headers=headers)
    assert resp.status_code == 422 and "ties" in resp.json()["detail"]
    resp = client.get(url, params={"shape": "raw", "meta.source": "unit"}, headers=headers)
    assert [r["prompt_id"] for r in jsonl(resp.content)] == ["win"]
    resp = client.get(url, params={"shape": "raw", "min_agreement": "2"}, headers=headers)
    assert resp.status_code == 422


@pytest.mark.parametrize("ties", [False, True])
def test_pairs_jsonl_fast_path_equals_encoding_the_rows(
    db: Session, session_factory: sessionmaker[Session], labeled: dict[str, Any], ties: bool
) -> None:
    """The pairs JSONL is built from pre-escaped fragments; it must be byte for byte the
    compact JSON of `rows()`, whatever the texts hold."""
    project, ann = labeled["project"], labeled["ann"]
    nasty = ('quote " backslash \\ tab \t nl \n', "ctrl \x01 \x1f del \x7f \u2028 \U0001f600 é")
    task, a, b = pairwise(
        db,
        project,
        nasty,
        text=None,
        messages=[{"role": "user", "content": 'say "hi" \\ \n'}],
        metadata_={"nested": [1, 2.5, None, {"k": "ü"}], "flag": True, "s": "x"},
    )
    judge(db, task, ann, [[b], [a]])
    other = make_user(db, username="odd.name_1")
    judge(db, task, other, [[a, b]], strength=2)
    streamed = b"".join(
        export.stream(
            session_factory, project.id, shape="pairs", fmt="jsonl", filters={}, ties=ties
        )
    )
    encoded = "".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
        for r in export.rows(db, project.id, shape="pairs", filters={}, ties=ties)
    ).encode()
    assert streamed == encoded
    assert len(jsonl(streamed)) == (4 if ties else 2)


def test_streaming_errors_in_the_reader_thread_reach_the_consumer(
    session_factory: sessionmaker[Session],
    labeled: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches are read ahead in a worker thread; its failure must surface, not hang."""
    real = export._batches

    def failing(*args: Any, **kwargs: Any) -> Any:
        yield from real(*args, **kwargs)
        raise RuntimeError("database went away")

    monkeypatch.setattr(export, "_batches", failing)
    for fmt in ("jsonl", "parquet"):
        chunks = export.stream(
            session_factory, labeled["project"].id, shape="pairs", fmt=fmt, filters={}
        )
        with pytest.raises(RuntimeError, match="database went away"):
            b"".join(chunks)


def test_closing_a_stream_early_stops_the_reader_thread(
    db: Session, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    monkeypatch.setattr(export, "BATCH_ROWS", 2)
    monkeypatch.setattr(export, "CHUNK_BYTES", 10)
    project = make_project(db)
    ann = make_user(db)
    for i in range(12):
        task, a, b = pairwise(db, project, (f"a{i}", f"b{i}"), external_id=f"e{i}")
        judge(db, task, ann, [[a], [b]])
    chunks = export.stream(session_factory, project.id, shape="pairs", fmt="jsonl", filters={})
    first = next(chunks)
    assert first.startswith(b'{"prompt":')
    chunks.close()  # a client that went away
    assert not [t for t in threading.enumerate() if t.name == "export-prefetch"]
    # The session is free again: a full export still works.
    assert len(jsonl(collect(session_factory, project.id, "pairs"))) == 12


def test_timestamps_with_and_without_a_fraction(
    db: Session, session_factory: sessionmaker[Session]
) -> None:
    """Postgres formats the time in the database on the fast path; it must read exactly as
    Python's isoformat (which leaves out a zero fraction) on every shape and backend."""
    project = make_project(db)
    ann = make_user(db)
    moments = [
        datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        datetime(2024, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
    ]
    for i, moment in enumerate(moments):
        task, a, b = pairwise(db, project, (f"a{i}", f"b{i}"), external_id=f"m{i}")
        judge(db, task, ann, [[a], [b]], created_at=moment)
    expected = [
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:00:00.123456Z",
        "2024-12-31T23:59:59.000001Z",
    ]
    for shape in export.SHAPES:
        got = [r["created_at"] for r in jsonl(collect(session_factory, project.id, shape))]
        assert got == expected, shape
    assert [export.iso(m) for m in moments] == expected
