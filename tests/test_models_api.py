"""The model registry API and page, scoring errors, the score subprocess, and the CLI.

The happy path of scoring with a trained model is in tests/test_worker.py (it needs one); the
long-lived scorer process (reuse, errors, restarts, timeouts, threads) is in
tests/test_scoring.py.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from app.cli import cli
from app.db import transaction
from app.models import Job, ModelKind, ModelVersion, Role
from app.services import model_registry
from app.settings import Settings
from tests.factories import login, make_project, make_token, make_user

METRICS = {
    "eval": {
        "accuracy": 0.875,
        "loss": 0.41,
        "ece": 0.05,
        "by_annotator": {"a": {"accuracy": 1.0}},
    },
    "train_curve": [{"step": 1, "loss": 0.69}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.3}],
    "total_steps": 3,
    "pairs_per_s": 123.4,
}


def fake_artifact(root: Path, name: str = "reward-x") -> Path:
    """A directory shaped like a save_pretrained output (contents are not a real model)."""
    path = root / name
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text('{"num_labels": 1}')
    (path / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return path


def add_model(
    db: Session, path: Path, kind: ModelKind = ModelKind.reward, **fields: object
) -> ModelVersion:
    project = make_project(db)
    return model_registry.register(
        db,
        kind=kind,
        artifact_path=path,
        project_id=project.id,
        metrics=METRICS,
        config={"epochs": 3},
        **fields,  # type: ignore[arg-type]
    )


def test_models_api_lists_and_gets_with_roles(client, db: Session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    admin = make_token(db, make_user(db, Role.admin))
    researcher = make_token(db, make_user(db, Role.researcher))
    annotator = make_token(db, make_user(db, Role.annotator))
    first = add_model(db, fake_artifact(tmp_path, "a"))
    policy = add_model(db, fake_artifact(tmp_path, "b"), kind=ModelKind.policy, parent_id=first.id)

    assert client.get("/api/v1/models").status_code == 401
    assert client.get("/api/v1/models", headers=annotator).status_code == 403
    for headers in (admin, researcher):
        listed = client.get("/api/v1/models", headers=headers)
        assert listed.status_code == 200
        assert [m["id"] for m in listed.json()] == [policy.id, first.id]  # newest first
    row = listed.json()[1]
    assert {"id", "kind", "parent_id", "snapshot_id", "project_id", "metrics", "created_at"} <= set(
        row
    )
    assert (row["kind"], row["metrics"]["eval"]["accuracy"], row["config"]) == (
        "reward",
        0.875,
        {"epochs": 3},
    )
    assert listed.json()[0]["parent_id"] == first.id

    only_reward = client.get("/api/v1/models?kind=reward", headers=admin).json()
    assert [m["id"] for m in only_reward] == [first.id]
    by_project = client.get(f"/api/v1/models?project_id={policy.project_id}", headers=admin).json()
    assert [m["id"] for m in by_project] == [policy.id]

    assert client.get(f"/api/v1/models/{first.id}", headers=researcher).json()["id"] == first.id
    assert client.get("/api/v1/models/999999", headers=admin).status_code == 404
    assert client.get(f"/api/v1/models/{first.id}", headers=annotator).status_code == 403


def test_download_streams_the_directory_as_tar_gz(client, db: Session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    headers = make_token(db, make_user(db, Role.researcher))
    annotator = make_token(db, make_user(db, Role.annotator))
    path = fake_artifact(tmp_path)
    model = add_model(db, path)

    assert client.get(f"/api/v1/models/{model.id}/download", headers=annotator).status_code == 403
    resp = client.get(f"/api/v1/models/{model.id}/download", headers=headers)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/gzip"
    assert f'filename="reward-{model.id}.tar.gz"' in resp.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(resp.content), mode="r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    top = f"reward-{model.id}"
    assert files == {
        f"{top}/config.json": b'{"num_labels": 1}',
        f"{top}/sub/weights.bin": (path / "sub" / "weights.bin").read_bytes(),
    }

    gone = add_model(db, fake_artifact(tmp_path, "gone"))
    shutil.rmtree(tmp_path / "gone")
    missing = client.get(f"/api/v1/models/{gone.id}/download", headers=headers)
    assert missing.status_code == 404 and "missing" in missing.json()["detail"]


def test_score_errors(client, db: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    headers = make_token(db, make_user(db, Role.admin))
    annotator = make_token(db, make_user(db, Role.annotator))
    reward = add_model(db, fake_artifact(tmp_path, "r"))
    policy = add_model(db, fake_artifact(tmp_path, "p"), kind=ModelKind.policy)
    body = {"prompt": "Hi", "completions": ["a", "b"]}

    assert (
        client.post(f"/api/v1/models/{reward.id}/score", json=body, headers=annotator).status_code
        == 403
    )
    assert client.post("/api/v1/models/999999/score", json=body, headers=headers).status_code == 404
    wrong_kind = client.post(f"/api/v1/models/{policy.id}/score", json=body, headers=headers)
    assert (
        wrong_kind.status_code == 422 and "only reward models score" in wrong_kind.json()["detail"]
    )
    empty = client.post(
        f"/api/v1/models/{reward.id}/score",
        json={"prompt": "Hi", "completions": []},
        headers=headers,
    )
    assert empty.status_code == 422

    monkeypatch.setattr(model_registry, "_worker_extra_installed", lambda: False)
    missing = client.post(f"/api/v1/models/{reward.id}/score", json=body, headers=headers)
    assert missing.status_code == 503
    assert missing.json()["error"] == "scoring_unavailable"
    assert "pip install 'prefloop[worker]'" in missing.json()["detail"]


def test_score_cli_rejects_bad_requests(tmp_path: Path) -> None:
    def call(args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.score_cli", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert call([], "{}").returncode == 2
    bad = call([str(tmp_path)], json.dumps({"prompt": 1, "completions": ["a"]}))
    assert bad.returncode == 2 and "'prompt' must be a string" in bad.stderr
    nodir = call([str(tmp_path / "nope")], json.dumps({"prompt": "p", "completions": ["a"]}))
    assert nodir.returncode == 2 and "no model directory" in nodir.stderr
    both = call([str(tmp_path), "--serve"], "")
    assert both.returncode == 2 and "usage" in both.stderr


def test_models_page_plots_the_training_curve(client, db: Session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    researcher = make_user(db, Role.researcher)
    model = add_model(db, fake_artifact(tmp_path), name="<script>x</script>")
    empty = model_registry.register(
        db, kind=ModelKind.reward, artifact_path=fake_artifact(tmp_path, "e")
    )
    from tests.factories import login

    login(client, researcher.username)
    page = client.get("/models")
    assert page.status_code == 200
    assert f'id="model-{model.id}"' in page.text and f'id="model-{empty.id}"' in page.text
    assert f'points="{model_registry.svg_polyline([0.69, 0.5, 0.3])}"' in page.text
    assert "0.8750" in page.text  # nested eval metrics shown
    assert "no curve" in page.text
    assert "&lt;script&gt;x" in page.text and "<script>x" not in page.text


def test_curve_and_polyline_are_pure() -> None:
    assert model_registry.curve({"train_curve": [{"loss": 1.0}, {"loss": float("nan")}, 0.5]}) == [
        1.0,
        0.5,
    ]
    assert model_registry.curve({"history": [{"epoch": 1, "loss": 0.7}]}) == [0.7]
    assert model_registry.curve({"train_curve": [], "history": "x"}) == []
    assert model_registry.svg_polyline([]) == ""
    # highest value at the top (y = pad), lowest at the bottom (y = height - pad)
    assert (
        model_registry.svg_polyline([2.0, 1.0, 0.0], width=24, height=14, pad=2)
        == "2.0,2.0 12.0,7.0 22.0,12.0"
    )
    assert model_registry.svg_polyline([5.0], width=10, height=10, pad=1) == "1.0,1.0"


# --- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(
    committed_factory: sessionmaker[Session],
    backend_settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> sessionmaker[Session]:
    monkeypatch.setenv("PREFLOOP_DATABASE_URL", backend_settings.database_url)
    monkeypatch.setenv("PREFLOOP_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.chdir(tmp_path)  # no stray .env
    return committed_factory


def test_cli_train_reward_queues_a_job_and_models_lists(
    cli_env: sessionmaker[Session], tmp_path: Path
) -> None:
    with transaction(cli_env) as session:
        project = make_project(session, name="cli-project")
        add_model(session, fake_artifact(tmp_path))
    runner = CliRunner()
    queued = runner.invoke(
        cli,
        [
            "train",
            "reward",
            "cli-project",
            "--epochs",
            "2",
            "--lr",
            "0.001",
            "-p",
            "seed=7",
            "-p",
            "backbone=minilm",
        ],
    )
    assert queued.exit_code == 0, queued.output
    with transaction(cli_env) as session:
        job = session.query(Job).one()
        assert (job.kind, job.project_id, job.state.value) == ("reward", project.id, "queued")
        assert job.params == {"epochs": 2, "lr": 0.001, "seed": 7, "backbone": "minilm"}
    assert f"queued reward job {job.id}" in queued.output

    again = runner.invoke(cli, ["train", "reward", str(project.id)])
    assert again.exit_code == 1 and "already has an active reward job" in again.output
    assert runner.invoke(cli, ["train", "reward", "nope"]).exit_code == 1

    listed = runner.invoke(cli, ["models"])
    assert listed.exit_code == 0 and "0.875" in listed.output and "reward" in listed.output


def test_cli_score_reports_errors(cli_env: sessionmaker[Session], tmp_path: Path) -> None:
    with transaction(cli_env) as session:
        policy = add_model(session, fake_artifact(tmp_path), kind=ModelKind.policy)
    result = CliRunner().invoke(cli, ["score", str(policy.id), "--prompt", "hi", "-c", "a"])
    assert result.exit_code == 1 and "only reward models score" in result.output


def test_models_page_shows_partner_snapshot_sources_and_epochs(  # type: ignore[no-untyped-def]
    client, db: Session, tmp_path: Path
) -> None:
    project = make_project(db)
    metrics = {
        **METRICS,
        "eval": {
            "accuracy": 0.875,
            "by_source_pair": {"policy:3 vs upload": {"accuracy": 0.75, "pairs": 8}},
        },
        "history": [{"epoch": 1, "accuracy": 0.625}, {"epoch": 2, "accuracy": 0.875}],
    }
    main = model_registry.register(
        db,
        kind=ModelKind.reward,
        artifact_path=fake_artifact(tmp_path, "m"),
        project_id=project.id,
        metrics=metrics,
    )
    partner = model_registry.register(
        db,
        kind=ModelKind.reward,
        artifact_path=fake_artifact(tmp_path, "h"),
        project_id=project.id,
        config={"role": "heldout", "pair_of": main.id},
        metrics=metrics,
    )
    login(client, make_user(db, Role.researcher).username)
    page = client.get("/models").text
    row = page.split(f'id="model-{partner.id}"', 1)[1].split("</tr>", 1)[0]
    assert f"held-out partner of #{main.id}" in row
    main_row = page.split(f'id="model-{main.id}"', 1)[1].split("</tr>", 1)[0]
    assert "held-out partner" not in main_row
    assert "policy:3 vs upload 0.75 (8)" in main_row
    assert "1: 0.625, 2: 0.875" in main_row

    admin = make_token(db, make_user(db, Role.admin))
    assert client.get("/api/v1/models?project_id=987654", headers=admin).status_code == 404


def test_models_page_shows_a_policys_ppo_numbers(client, db: Session, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    project = make_project(db)
    reward = model_registry.register(
        db, kind=ModelKind.reward, artifact_path=fake_artifact(tmp_path, "r"), project_id=project.id
    )
    policy = model_registry.register(
        db,
        kind=ModelKind.policy,
        artifact_path=fake_artifact(tmp_path, "p"),
        project_id=project.id,
        reward_model_id=reward.id,
        metrics={
            "reward_mean": 0.25,
            "kl": 0.5,
            "best_step": 3,
            "steps": 4,
            "stop_reason": "kl_budget",
            "history": [{"step": 1, "reward_mean": 0.1}, {"step": 2, "reward_mean": 0.2}],
        },
    )
    login(client, make_user(db, Role.researcher).username)
    page = client.get("/models").text
    row = page.split(f'id="model-{policy.id}"', 1)[1].split("</tr>", 1)[0]
    assert "reward</span> 0.2500" in row and "KL</span> 0.5000" in row
    assert "kept step 3 of 4 (stopped: kl_budget)" in row
    assert f"against reward model #{reward.id}" in row
    assert "by epoch" not in row  # PPO steps are not epochs


def test_cli_train_ppo_and_generate_queue_checked_jobs(
    cli_env: sessionmaker[Session], tmp_path: Path
) -> None:
    with transaction(cli_env) as session:
        project = make_project(session, name="cli-loop")
        reward = model_registry.register(
            session,
            kind=ModelKind.reward,
            artifact_path=fake_artifact(tmp_path, "r"),
            project_id=project.id,
        )
        reward_id = reward.id
    runner = CliRunner()
    ppo = runner.invoke(
        cli,
        [
            "train",
            "ppo",
            "cli-loop",
            "--steps",
            "3",
            "--reward-model",
            str(reward_id),
            "-p",
            "lr=1e-5",
        ],
    )
    assert ppo.exit_code == 0, ppo.output
    generate = runner.invoke(cli, ["train", "generate", str(project.id), "--prompts", "all"])
    assert generate.exit_code == 0, generate.output
    with transaction(cli_env) as session:
        queued = {j.kind: j.params for j in session.query(Job).all()}
    assert queued == {
        "ppo": {"total_steps": 3, "reward_model_id": reward_id, "lr": 1e-5},
        "generate": {"prompts": "all"},
    }
    assert "queued ppo job" in ppo.output and "queued generate job" in generate.output

    bad = runner.invoke(cli, ["train", "ppo", "cli-loop", "--steps", "0"])
    assert bad.exit_code == 1 and "total_steps" in bad.output
    foreign = runner.invoke(cli, ["train", "generate", "cli-loop", "--policy", str(reward_id)])
    assert foreign.exit_code == 1 and "policy_id" in foreign.output


def test_report_end_says_what_each_kind_made(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import _report_end
    from app.models import JobState

    ppo = Job(
        id=7,
        kind="ppo",
        state=JobState.succeeded,
        metrics={"model_version_id": 9, "best_step": 3, "steps": 4, "reward_mean": 0.5, "kl": 0.25},
    )
    generate = Job(
        id=8,
        kind="generate",
        state=JobState.succeeded,
        metrics={"completions_stored": 12, "tasks_created": 6},
    )
    assert _report_end(ppo) == 0 and _report_end(generate) == 0
    text = capsys.readouterr().out
    assert "job 7 succeeded: policy model 9, kept step 3 of 4 (reward 0.5000, KL 0.2500)" in text
    assert "job 8 succeeded: 12 answers stored, 6 tasks to label" in text
