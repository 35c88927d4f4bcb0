"""Snapshots: frozen selections whose exports never change, over the API, page and CLI."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from app.cli import cli
from app.db import transaction
from app.errors import InvalidInput, NotFound
from app.models import Role, Snapshot
from app.services import export, snapshots
from tests.factories import login, make_project, make_token, make_user
from tests.test_export import jsonl, judge, pairwise


def _bytes(factory: sessionmaker[Session], snap: Snapshot, shape: str, fmt: str) -> bytes:
    return b"".join(snapshots.stream(factory, snap, shape=shape, fmt=fmt))


@pytest.fixture
def project_data(db: Session) -> dict[str, Any]:
    """Two annotators on three pairwise tasks (agreeing on two); alice is also gold-scored."""
    project = make_project(db, judgments_per_task=2)
    alice = make_user(db, username="alice-snap")
    bob = make_user(db, username="bob-snap")
    tasks = []
    for i in range(3):
        task, a, b = pairwise(db, project, (f"good {i}", f"bad {i}"), external_id=f"s{i}")
        tasks.append((task, a, b))
        judge(db, task, alice, [[a], [b]], strength=2)
        judge(db, task, bob, [[a], [b]] if i < 2 else [[b], [a]])
    gold, ga, gb = pairwise(db, project, ("g1", "g2"), external_id="gold")
    j = judge(db, gold, alice, [[ga], [gb]])
    j.is_gold, j.gold_correct = True, True
    db.flush()
    return {"project": project, "alice": alice, "bob": bob, "tasks": tasks}


def test_snapshot_records_rows_and_the_sha_of_its_pairs_jsonl(
    db: Session, session_factory: sessionmaker[Session], project_data: dict[str, Any]
) -> None:
    project = project_data["project"]
    snap = snapshots.create(db, project.id, {}, created_by=project_data["alice"].id)
    data = _bytes(session_factory, snap, "pairs", "jsonl")
    assert snap.row_count == len(jsonl(data)) == 7  # 3 tasks x 2 annotators + the gold item
    assert snap.sha256 == hashlib.sha256(data).hexdigest()
    assert snap.max_judgment_id == max(r["judgment_id"] for r in jsonl(data))
    # Same bytes as the live export of the same data right now.
    live = b"".join(
        export.stream(session_factory, project.id, shape="pairs", fmt="jsonl", filters={})
    )
    assert live == data
    described = snapshots.describe(snap)
    assert described["filters"] == {} and described["selection"]["user_ids"] is None
    assert described["row_count"] == 7 and described["sha256"] == snap.sha256


def test_snapshot_is_unchanged_after_new_judgments_pausing_and_gold_changes(
    db: Session, session_factory: sessionmaker[Session], project_data: dict[str, Any]
) -> None:
    project, alice, bob = project_data["project"], project_data["alice"], project_data["bob"]
    frozen = {
        "all": snapshots.create(db, project.id, {}, created_by=None),
        "active": snapshots.create(db, project.id, {"exclude_paused": True}, created_by=None),
        "gold": snapshots.create(db, project.id, {"min_gold_accuracy": 0.9}, created_by=None),
        "agree": snapshots.create(db, project.id, {"min_agreement": 1.0}, created_by=None),
    }
    assert frozen["gold"].filter["selection"]["user_ids"] == [alice.id]
    assert frozen["agree"].row_count == 4  # s0 and s1, two annotators each
    before = {
        (name, shape, fmt): _bytes(session_factory, snap, shape, fmt)
        for name, snap in frozen.items()
        for shape in export.SHAPES
        for fmt in export.FORMATS
    }
    # Exporting twice: byte-identical, every shape and format (hf is a .tar.gz).
    for (name, shape, fmt), data in before.items():
        assert _bytes(session_factory, frozen[name], shape, fmt) == data, (name, shape, fmt)

    # The world moves on: new judgments (a new task, and a third opinion on s2 that would
    # change its agreement), alice is paused, and her gold accuracy drops to 1/2.
    carol = make_user(db, username="carol-snap")
    task, a, b = pairwise(db, project, ("new a", "new b"), external_id="later")
    judge(db, task, alice, [[a], [b]])
    s2, a2, b2 = project_data["tasks"][2]
    judge(db, s2, carol, [[a2], [b2]])
    gold, ga, gb = pairwise(db, project, ("g3", "g4"), external_id="gold2")
    j = judge(db, gold, alice, [[gb], [ga]])
    j.is_gold, j.gold_correct = True, False
    alice.active = False
    db.flush()

    for (name, shape, fmt), data in before.items():
        assert _bytes(session_factory, frozen[name], shape, fmt) == data, (name, shape, fmt)
    for snap in frozen.values():
        assert snapshots.verify(db, snap.id).ok
    # A new snapshot sees the new state.
    assert snapshots.create(db, project.id, {}, created_by=None).row_count == 10
    now_gold = snapshots.create(db, project.id, {"min_gold_accuracy": 0.9}, created_by=None)
    assert now_gold.row_count == 0  # alice is at 1/2 now, bob never judged gold
    now_active = snapshots.create(db, project.id, {"exclude_paused": True}, created_by=None)
    assert now_active.filter["selection"]["user_ids"] == sorted([bob.id, carol.id])


def test_verify_notices_a_changed_prompt(db: Session, project_data: dict[str, Any]) -> None:
    snap = snapshots.create(db, project_data["project"].id, {}, created_by=None)
    project_data["tasks"][0][0].prompt.text = "Say hello, upserted."  # an edit outside the app
    db.flush()
    result = snapshots.verify(db, snap.id)
    assert not result.ok and result.row_count == snap.row_count and result.sha256 != snap.sha256


def test_snapshot_filters_are_checked(db: Session, project_data: dict[str, Any]) -> None:
    project = project_data["project"]
    with pytest.raises(InvalidInput, match="unknown export filter"):
        snapshots.create(db, project.id, {"anotator": "x"}, created_by=None)
    with pytest.raises(InvalidInput, match="nobody-snap"):
        snapshots.create(db, project.id, {"annotator": "nobody-snap"}, created_by=None)
    with pytest.raises(NotFound):
        snapshots.create(db, 987654, {}, created_by=None)
    snap = snapshots.create(
        db, project.id, {"annotator": "bob-snap", "meta.missing": "x"}, created_by=None
    )
    assert snap.row_count == 0
    assert snap.filter["requested"] == {"annotator": ["bob-snap"], "meta": {"missing": ["x"]}}


def test_snapshot_rows_for_training(db: Session, project_data: dict[str, Any]) -> None:
    project = project_data["project"]
    snap = snapshots.create(db, project.id, {"annotator": "alice-snap"}, created_by=None)
    rows = list(snapshots.rows(db, snap.id))
    assert [r["annotator"] for r in rows] == ["alice-snap"] * 4
    assert {r["margin"] for r in rows if r["prompt_id"] != "gold"} == {2}


# --- HTTP -------------------------------------------------------------------------------------


def test_api_create_get_list_export_and_verify(  # type: ignore[no-untyped-def]
    client, db: Session, project_data: dict[str, Any], tmp_path: Path
) -> None:
    project = project_data["project"]
    headers = make_token(db, make_user(db, Role.researcher))
    resp = client.post(
        f"/api/v1/projects/{project.id}/snapshots",
        json={"filters": {"min_agreement": 1, "annotator": ["alice-snap", "bob-snap"]}},
        headers=headers,
    )
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["row_count"] == 4 and len(body["sha256"]) == 64
    assert body["filters"] == {"annotator": ["alice-snap", "bob-snap"], "min_agreement": 1.0}
    sid = body["id"]

    assert client.get(f"/api/v1/snapshots/{sid}", headers=headers).json() == body
    listed = client.get(f"/api/v1/projects/{project.id}/snapshots", headers=headers).json()
    assert [s["id"] for s in listed] == [sid]

    url = f"/api/v1/snapshots/{sid}/export"
    first = client.get(url, headers=headers)
    assert first.status_code == 200
    assert (
        first.headers["content-disposition"] == f'attachment; filename="snapshot-{sid}-pairs.jsonl"'
    )
    assert hashlib.sha256(first.content).hexdigest() == body["sha256"]
    assert client.get(url, headers=headers).content == first.content

    hf = client.get(url, params={"format": "hf", "shape": "rankings"}, headers=headers)
    assert hf.status_code == 200 and hf.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(hf.content), mode="r:gz") as archive:
        assert sorted(archive.getnames()) == [
            f"snapshot-{sid}-rankings",
            f"snapshot-{sid}-rankings/data-00000-of-00001.arrow",
            f"snapshot-{sid}-rankings/dataset_info.json",
            f"snapshot-{sid}-rankings/state.json",
        ]
        assert all(m.mtime == 0 and m.uname == "" for m in archive.getmembers())
    assert (
        client.get(url, params={"format": "hf", "shape": "rankings"}, headers=headers).content
        == hf.content
    )

    resp = client.get(url, params={"annotator": "bob-snap"}, headers=headers)
    assert resp.status_code == 422 and "fixed" in resp.json()["detail"]
    assert client.get(url, params={"shape": "nope"}, headers=headers).status_code == 422
    verified = client.get(f"/api/v1/snapshots/{sid}/verify", headers=headers).json()
    assert verified == {"ok": True, "row_count": 4, "sha256": body["sha256"]}
    assert client.get("/api/v1/snapshots/987654", headers=headers).status_code == 404
    resp = client.post(
        f"/api/v1/projects/{project.id}/snapshots", json={"filters": {"bogus": 1}}, headers=headers
    )
    assert resp.status_code == 422 and "bogus" in resp.json()["detail"]
    resp = client.post(f"/api/v1/projects/{project.id}/snapshots", headers=headers)
    assert resp.status_code == 201 and resp.json()["row_count"] == 7  # no body: everything


def test_api_roles(client, db: Session, project_data: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    project = project_data["project"]
    url = f"/api/v1/projects/{project.id}/snapshots"
    assert client.post(url, json={}).status_code == 401
    annotator = make_token(db, make_user(db, Role.annotator))
    assert client.post(url, json={}, headers=annotator).status_code == 403
    admin = make_token(db, make_user(db, Role.admin))
    sid = client.post(url, json={}, headers=admin).json()["id"]
    for path in (url, f"/api/v1/snapshots/{sid}", f"/api/v1/snapshots/{sid}/export"):
        assert client.get(path, headers=annotator).status_code == 403
        assert client.get(path, headers=admin).status_code == 200


def test_page_lists_and_creates_snapshots(  # type: ignore[no-untyped-def]
    client, db: Session, project_data: dict[str, Any]
) -> None:
    project = project_data["project"]
    researcher = make_user(db, Role.researcher)
    snapshots.create(db, project.id, {"annotator": "bob-snap"}, created_by=researcher.id)
    csrf = login(client, researcher.username)
    page = client.get(f"/projects/{project.id}/snapshots")
    assert page.status_code == 200
    assert "bob-snap" in page.text and "Create snapshot" in page.text
    resp = client.post(
        f"/projects/{project.id}/snapshots",
        data={"csrf_token": csrf, "min_agreement": "0.9", "exclude_paused": "true"},
        follow_redirects=False,
    )
    assert resp.status_code == 303
    made = snapshots.list_for_project(db, project.id)
    assert len(made) == 2 and made[0].filter["requested"] == {
        "min_agreement": 0.9,
        "exclude_paused": True,
    }
    resp = client.post(
        f"/projects/{project.id}/snapshots",
        data={"csrf_token": csrf, "min_agreement": "lots"},
    )
    assert resp.status_code == 422 and "min_agreement must be a number" in resp.text
    assert len(snapshots.list_for_project(db, project.id)) == 2
    resp = client.post(f"/projects/{project.id}/snapshots", data={"min_agreement": "0.5"})
    assert resp.status_code == 403  # no CSRF token


# --- CLI ----------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(
    committed_factory: sessionmaker[Session],
    backend_settings,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> sessionmaker[Session]:
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", backend_settings.database_url)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return committed_factory


def test_cli_snapshot_and_export_of_it(cli_env: sessionmaker[Session], tmp_path: Path) -> None:
    with transaction(cli_env) as session:
        project = make_project(session, name="cli-snap-project")
        ann = make_user(session, username="cli-snap-ann")
        for i in range(2):
            task, a, b = pairwise(
                session,
                project,
                (f"y{i}", f"n{i}"),
                external_id=f"c{i}",
                metadata_={"split": "train" if i else "test"},
            )
            judge(session, task, ann, [[a], [b]])
    runner = CliRunner()
    made = runner.invoke(cli, ["snapshot", "cli-snap-project", "--meta", "split=train"])
    assert made.exit_code == 0, made.output
    with transaction(cli_env) as session:
        snap = session.query(Snapshot).one()
        assert snap.row_count == 1 and snap.filter["requested"] == {"meta": {"split": ["train"]}}
    assert f"snapshot {snap.id}: 1 pairs" in made.output

    out = tmp_path / "snap.jsonl"
    done = runner.invoke(
        cli, ["export", "cli-snap-project", "--snapshot", str(snap.id), "-o", str(out)]
    )
    assert done.exit_code == 0, done.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == snap.sha256
    assert [r["prompt_id"] for r in jsonl(out.read_bytes())] == ["c1"]

    filtered = tmp_path / "filtered.jsonl"
    done = runner.invoke(
        cli, ["export", "cli-snap-project", "--meta", "split=test", "-o", str(filtered)]
    )
    assert done.exit_code == 0, done.output
    assert [r["prompt_id"] for r in jsonl(filtered.read_bytes())] == ["c0"]

    hf_dir = tmp_path / "hf-out"
    done = runner.invoke(
        cli, ["export", "cli-snap-project", "--format", "hf", "--shape", "raw", "-o", str(hf_dir)]
    )
    assert done.exit_code == 0, done.output
    state = json.loads((hf_dir / "state.json").read_text())
    assert state["_data_files"] == [{"filename": "data-00000-of-00001.arrow"}]

    bad = runner.invoke(
        cli, ["export", "cli-snap-project", "--snapshot", str(snap.id), "--annotator", "x"]
    )
    assert bad.exit_code == 1 and "fixed" in bad.output
    assert (
        runner.invoke(cli, ["snapshot", "cli-snap-project", "--min-agreement", "3"]).exit_code == 1
    )
