"""The worker: training data from judgments, the runner, the loop, crash and stop safety.

The end-to-end tests commit real rows (the worker builds its own engine, as in production)
and train a tiny reward model on a planted preference: the completion containing "good"
always beats the one containing "bad".
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from transformers import AutoModelForSequenceClassification

from app.db import transaction
from app.errors import InvalidInput
from app.main import create_app
from app.models import (
    Job,
    JobState,
    Judgment,
    ModelKind,
    ModelVersion,
    Project,
    ProjectMode,
    Role,
    Snapshot,
    Task,
    User,
)
from app.services import jobs, snapshots, training_data
from app.settings import Settings
from tests.factories import make_project, make_prompt, make_task, make_token, make_user
from worker import main as worker_main
from worker import runner
from worker.models import tiny_reward_model, tiny_tokenizer
from worker.reward import score

FILLER = [f"w{i}" for i in range(30)]
WORDS = [*FILLER, "good", "bad", "meh", "user:", "assistant:"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT + word-level tokenizer saved where a job's `backbone` param can name it."""
    path = tmp_path_factory.mktemp("tiny") / "backbone"
    tokenizer = tiny_tokenizer(WORDS)
    tiny_reward_model(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def worker_settings(backend_settings: Settings, tmp_path: Path) -> Settings:
    return backend_settings.model_copy(update={"artifact_dir": tmp_path / "artifacts"})


def tiny_params(backbone: Path, **overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "backbone": str(backbone),
        "max_length": 48,
        "batch_size": 16,
        "lr": 3e-3,
        "epochs": 2,
        "eval_fraction": 0.2,
        "seed": 0,
    }
    params.update(overrides)
    return params


def judge(
    session: Session,
    project: Project,
    user: User,
    ranking_texts: list[list[str]],
    prompt: str,
    texts: list[str],
    **fields: Any,
) -> Judgment:
    """A prompt with `texts` as completions, one task over them, and `user`'s ranking of them."""
    made = make_prompt(session, project, texts, text=prompt)
    task = make_task(session, project, made)
    by_text = {c.text: c.id for c in made.completions}
    ranking = [[by_text[t] for t in group] for group in ranking_texts]
    judgment = Judgment(
        project_id=project.id,
        task_id=task.id,
        user_id=user.id,
        ranking=ranking,
        display_order=[by_text[t] for t in texts],
        **fields,
    )
    session.add(judgment)
    session.flush()
    return judgment


def seed_planted(factory: sessionmaker[Session], n: int, seed: int = 0) -> tuple[int, int, str]:
    """`n` committed pairwise judgments where "good" beats "bad"; (project id, admin id, token)."""
    rng = random.Random(seed)

    def text(marker: str) -> str:
        words = rng.choices(FILLER, k=rng.randint(2, 6))
        words.insert(rng.randint(0, len(words)), marker)
        return " ".join(words)

    with transaction(factory) as session:
        admin = make_user(session, Role.admin)
        token = make_token(session, admin)["Authorization"]
        annotators = [make_user(session) for _ in range(3)]
        project = make_project(session)
        for i in range(n):
            good, bad = text("good"), text("bad")
            shown = [good, bad] if rng.random() < 0.5 else [bad, good]
            judge(
                session,
                project,
                annotators[i % 3],
                [[good], [bad]],
                " ".join(rng.choices(FILLER, k=3)),
                shown,
            )
        return project.id, admin.id, token


def job_row(factory: sessionmaker[Session], job_id: int) -> Job:
    with transaction(factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def enqueue(
    factory: sessionmaker[Session], project_id: int, kind: str, params: dict[str, Any], **kw: Any
) -> int:
    with transaction(factory) as session:
        return jobs.enqueue(session, project_id, kind, params, None, **kw).id


def enqueue_unchecked(
    factory: sessionmaker[Session], project_id: int, kind: str, params: dict[str, Any]
) -> int:
    """A job whose params nobody checked: what a loop setting stored before a rule existed
    starts. People's jobs are checked when created (test_jobs); the worker checks again."""
    with transaction(factory) as session:
        return jobs.enqueue_internal(session, project_id, kind, params).id


# --- training data ---------------------------------------------------------------------------


def test_preference_groups_keep_rankings_ties_and_the_cutoff(db: Session) -> None:
    annotator = make_user(db, username="ann-rows")
    project = make_project(db, mode=ProjectMode.ranking)
    first = judge(
        db, project, annotator, [["b"], ["a", "c"]], "Rank these.", ["a", "b", "c"], strength=3
    )
    chat = make_prompt(
        db,
        project,
        ["x", "y"],
        text=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    )
    task = make_task(db, project, chat)
    x, y = task.completion_ids
    db.add(
        Judgment(
            project_id=project.id,
            task_id=task.id,
            user_id=annotator.id,
            ranking=[[x, y]],
            none_acceptable=True,
            display_order=[y, x],
        )
    )
    db.flush()
    other = make_project(db)
    judge(db, other, annotator, [["p"], ["q"]], "Elsewhere.", ["p", "q"])

    rows = list(training_data.preference_groups(db, project.id))
    assert len(rows) == 2
    assert rows[0] == {
        "prompt_id": db.get(Task, first.task_id).prompt_id,  # type: ignore[union-attr]
        "prompt": "Rank these.",
        "completions": ["a", "b", "c"],
        "ranking": [[1], [0, 2]],
        "strength": 3,
        "annotator": "ann-rows",
        "sources": ["upload", "upload", "upload"],
    }
    assert rows[1]["prompt"] == "user: hi\nassistant: hello"
    assert rows[1]["ranking"] == [[0, 1]] and rows[1]["completions"] == ["x", "y"]

    cutoff = training_data.max_judgment_id(db, project.id)
    judge(db, project, annotator, [["n"], ["m"]], "Later.", ["m", "n"])
    assert len(list(training_data.preference_groups(db, project.id, max_judgment_id=cutoff))) == 2
    assert len(list(training_data.preference_groups(db, project.id))) == 3


# --- the runner and the loop, end to end -------------------------------------------------------


def test_worker_trains_registers_and_serves_a_reward_model(
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    backbone: Path,
    backend: str,
) -> None:
    project_id, _, token = seed_planted(committed_factory, 160)
    job_id = enqueue(committed_factory, project_id, "reward", tiny_params(backbone))
    seen: list[dict[str, Any]] = []

    outcomes = worker_main.main(
        worker_settings, once=True, heartbeat_every_s=0.2, on_progress=seen.append
    )

    assert outcomes == ["succeeded"]
    job = job_row(committed_factory, job_id)
    assert job.state is JobState.succeeded and job.error is None and job.attempts == 0
    assert job.progress["step"] == job.progress["total_steps"] == job.metrics["total_steps"]
    assert job.progress["stage"] == "done"
    assert [p["step"] for p in seen if "step" in p] == list(
        range(1, job.metrics["total_steps"] + 1)
    )
    data = job.metrics["data"]
    assert data["judgments"] == 160 and data["max_judgment_id"] > 0
    assert job.metrics["eval"]["accuracy"] >= 0.8, job.metrics["history"]

    with transaction(committed_factory) as session:
        model = session.scalars(select(ModelVersion)).one()
    assert (model.kind, model.job_id, model.project_id) == (ModelKind.reward, job_id, project_id)
    assert job.metrics["model_version_id"] == model.id
    assert model.config["backbone"] == str(backbone) and model.config["data"] == data
    out_dir = worker_settings.artifact_dir / "models" / f"reward-{job_id}"
    assert Path(model.artifact_path) == out_dir.resolve()
    assert AutoModelForSequenceClassification.from_pretrained(out_dir).config.num_labels == 1
    assert [p.name for p in out_dir.parent.iterdir()] == [out_dir.name]  # no temp leftovers

    app = create_app(worker_settings)
    headers = {"Authorization": token}
    with TestClient(app) as client:
        listed = client.get("/api/v1/models", headers=headers).json()
        assert [m["id"] for m in listed] == [model.id]
        assert listed[0]["metrics"]["eval"]["accuracy"] == job.metrics["eval"]["accuracy"]
        assert listed[0]["kind"] == "reward" and listed[0]["project_id"] == project_id

        archive = client.get(f"/api/v1/models/{model.id}/download", headers=headers)
        assert archive.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            names = set(tar.getnames())
        assert {f"reward-{model.id}/config.json", f"reward-{model.id}/prefloop.json"} <= names

        if backend == "sqlite":  # the scorer subprocess never touches the database: once is enough
            prompt, completions = "w1 w2 w3", ["w4 bad w5", "w4 good w5"]
            scored = client.post(
                f"/api/v1/models/{model.id}/score",
                headers=headers,
                json={"prompt": prompt, "completions": completions},
            )
            assert scored.status_code == 200, scored.text
            assert scored.json()["scores"] == pytest.approx(
                score(out_dir, prompt, completions), abs=1e-5
            )
            assert scored.json()["scores"][1] > scored.json()["scores"][0]

        job_page = client.get(f"/jobs/{job_id}", headers=headers)
        assert "Held-out evaluation" in job_page.text and "hx-trigger" not in job_page.text
        assert f"{job.metrics['eval']['accuracy']:.4f}" in job_page.text
        assert "160 judgments of" in job_page.text

        page = client.get("/models", headers=headers)
        assert page.status_code == 200 and "<polyline" in page.text
        assert f"/api/v1/models/{model.id}/download" in page.text
    app.state.engine.dispose()


def test_crash_mid_training_leaves_no_artifact_and_retries_then_fails(
    committed_factory: sessionmaker[Session], worker_settings: Settings, backbone: Path
) -> None:
    project_id, _, _ = seed_planted(committed_factory, 40)
    job_id = enqueue(
        committed_factory,
        project_id,
        "reward",
        tiny_params(backbone, epochs=1, fail_after_step=1),
        max_attempts=2,
    )
    models_dir = worker_settings.artifact_dir / "models"

    assert worker_main.main(worker_settings, once=True) == ["queued"]  # retryable: one more try
    job = job_row(committed_factory, job_id)
    assert (job.state, job.attempts) == (JobState.queued, 1)
    assert job.error is not None and job.error.startswith(
        "RuntimeError: injected failure after step 1"
    )
    assert not models_dir.exists() or list(models_dir.iterdir()) == []

    assert worker_main.main(worker_settings, once=True) == ["failed"]
    job = job_row(committed_factory, job_id)
    assert (job.state, job.attempts) == (JobState.failed, 2) and job.finished_at is not None
    assert "injected failure" in (job.error or "")
    assert not models_dir.exists() or list(models_dir.iterdir()) == []
    with transaction(committed_factory) as session:
        assert session.scalars(select(ModelVersion)).all() == []


def test_stop_signal_finishes_the_step_and_requeues_without_an_attempt(
    committed_factory: sessionmaker[Session], worker_settings: Settings, backbone: Path
) -> None:
    project_id, _, _ = seed_planted(committed_factory, 40)
    job_id = enqueue(committed_factory, project_id, "reward", tiny_params(backbone, epochs=1))
    stop = threading.Event()
    steps: list[int] = []

    def sigterm_at_first_step(progress: dict[str, Any]) -> None:
        if "step" in progress:
            steps.append(progress["step"])
            stop.set()  # what the SIGTERM handler does

    outcomes = worker_main.main(
        worker_settings, once=True, stop=stop, on_progress=sigterm_at_first_step
    )

    assert outcomes == ["queued"] and steps == [1]
    job = job_row(committed_factory, job_id)
    assert (job.state, job.attempts, job.worker_id, job.error) == (JobState.queued, 0, None, None)
    # Where it stopped, but no live step, loss or ETA: nothing runs it now.
    assert job.progress["requeued"] == "worker stopped"
    assert job.progress["interrupted"]["step"] == 1 and job.progress["interrupted"]["total_steps"]
    assert not {"step", "total_steps", "eta_s", "loss", "epoch"} & set(job.progress)
    models_dir = worker_settings.artifact_dir / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


def test_a_stopped_reward_job_resumes_on_its_next_claim_with_the_same_data(
    committed_factory: sessionmaker[Session], worker_settings: Settings, backbone: Path
) -> None:
    """SIGTERM (the stop event) after step 2: the job is requeued with its state saved;
    judgments that arrive meanwhile are not mixed in (the data cut-off is kept); the next
    claim continues at step 3 and succeeds, with a held-out partner, and the work directory
    is gone afterwards."""
    project_id, _, _ = seed_planted(committed_factory, 40)
    params = tiny_params(backbone, epochs=2, batch_size=8, heldout_split=True)
    job_id = enqueue(committed_factory, project_id, "reward", params)
    stop = threading.Event()
    steps: list[tuple[str, int]] = []

    def record(progress: dict[str, Any]) -> None:
        if "step" in progress:
            steps.append((progress["model"], progress["step"]))
            if len(steps) == 2 and not stop.is_set():
                stop.set()

    assert worker_main.main(worker_settings, once=True, stop=stop, on_progress=record) == ["queued"]
    work = runner.work_dir(worker_settings, "reward", job_id)
    assert (work / "main" / "resume.json").exists() and (work / "data.json").exists()
    snapshot_id = runner._read_json(work / "data.json")["snapshot_id"]
    with transaction(committed_factory) as session:
        cutoff = session.get(Snapshot, snapshot_id).max_judgment_id
    with transaction(committed_factory) as session:  # a judgment after the stop
        project = session.get(Project, project_id)
        assert project is not None
        late = judge(
            session,
            project,
            make_user(session),
            [["good w1"], ["bad w2"]],
            "late",
            ["good w1", "bad w2"],
        )
        assert late.id > cutoff
    steps.clear()
    assert worker_main.main(worker_settings, once=True, on_progress=record) == ["succeeded"]
    main_steps = [step for model, step in steps if model == "main"]
    assert main_steps[0] == 3 and main_steps == list(range(3, main_steps[-1] + 1))
    assert [step for model, step in steps if model == "heldout"][0] == 1
    assert not work.exists()
    job = job_row(committed_factory, job_id)
    assert (job.state, job.attempts) == (JobState.succeeded, 0)
    assert job.metrics["data"]["max_judgment_id"] == cutoff  # the late judgment is not in it
    assert job.metrics["data"]["snapshot_id"] == snapshot_id  # the first attempt's snapshot
    with transaction(committed_factory) as session:
        models = session.scalars(select(ModelVersion)).all()
        assert sorted(m.config.get("role", "main") for m in models) == ["heldout", "main"]
        assert {m.snapshot_id for m in models} == {snapshot_id}
        assert session.scalars(select(Snapshot.id)).all() == [snapshot_id]


def test_a_reward_job_trains_on_the_snapshot_it_names(
    committed_factory: sessionmaker[Session], worker_settings: Settings, backbone: Path
) -> None:
    """A snapshot filtered to one annotator: the job trains on exactly its judgments (14 of
    the 40) and the model names it; another project's snapshot is refused when queued."""
    project_id, _, _ = seed_planted(committed_factory, 42)
    other_project, _, _ = seed_planted(committed_factory, 3, seed=2)
    with transaction(committed_factory) as session:
        first = session.scalar(
            select(Judgment).where(Judgment.project_id == project_id).order_by(Judgment.id)
        )
        assert first is not None
        annotator = session.get(User, first.user_id)
        assert annotator is not None
        snapshot = snapshots.create(
            session, project_id, {"annotator": annotator.username}, created_by=None
        )
        foreign = snapshots.create(session, other_project, {}, created_by=None)
        snapshot_id, foreign_id, rows = snapshot.id, foreign.id, snapshot.row_count
    assert rows == 14
    with (
        transaction(committed_factory) as session,
        pytest.raises(InvalidInput, match="no snapshot"),
    ):
        jobs.enqueue(
            session, project_id, "reward", tiny_params(backbone, snapshot_id=foreign_id), None
        )
    job_id = enqueue(
        committed_factory, project_id, "reward", tiny_params(backbone, snapshot_id=snapshot_id)
    )
    assert worker_main.main(worker_settings, once=True) == ["succeeded"]
    job = job_row(committed_factory, job_id)
    assert job.metrics["data"]["snapshot_id"] == snapshot_id
    assert job.metrics["train_groups"] + job.metrics["eval_groups"] == 14
    with transaction(committed_factory) as session:
        model = session.get(ModelVersion, job.metrics["model_version_id"])
        assert model is not None and model.snapshot_id == snapshot_id
        assert session.scalars(select(Snapshot.id).order_by(Snapshot.id)).all() == [
            snapshot_id,
            foreign_id,
        ]  # no new snapshot when the job names one


def test_sigterm_to_a_real_worker_process_requeues_the_job(
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    backbone: Path,
    backend: str,
    tmp_path: Path,
) -> None:
    if backend == "postgres":
        pytest.skip("the signal path is the same on both backends; run it once")
    project_id, _, _ = seed_planted(committed_factory, 40)
    long_run = tiny_params(backbone, epochs=500, batch_size=1)  # far longer than the test
    job_id = enqueue(committed_factory, project_id, "reward", long_run)
    env = {
        **os.environ,
        "PREFLOOP_DATABASE_URL": worker_settings.database_url,
        "PREFLOOP_ARTIFACT_DIR": str(worker_settings.artifact_dir),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.main", "--once"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while job_row(committed_factory, job_id).state is not JobState.running:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the worker never claimed the job"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output
    job = job_row(committed_factory, job_id)
    assert (job.state, job.attempts, job.worker_id) == (JobState.queued, 0, None), job.error
    models_dir = worker_settings.artifact_dir / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


def test_runner_fails_unknown_kinds_params_and_empty_projects_for_good(
    committed_factory: sessionmaker[Session], worker_settings: Settings, backbone: Path
) -> None:
    project_id, _, _ = seed_planted(committed_factory, 4)
    with transaction(committed_factory) as session:
        empty_id = make_project(session).id
    ppo = enqueue(committed_factory, project_id, "ppo", {})
    generate = enqueue(committed_factory, project_id, "generate", {})
    typo = enqueue_unchecked(committed_factory, project_id, "reward", {"epochz": 2, "lr": "fast"})
    for _ in range(3):
        assert worker_main.main(worker_settings, once=True) == ["failed"]
    wrong_type = enqueue_unchecked(committed_factory, project_id, "reward", {"lr": "fast"})
    assert worker_main.main(worker_settings, once=True) == ["failed"]
    empty = enqueue(committed_factory, empty_id, "reward", tiny_params(backbone))
    assert worker_main.main(worker_settings, once=True) == ["failed"]
    assert worker_main.main(worker_settings, once=True) == []  # nothing left: --once returns

    errors = {
        j: job_row(committed_factory, j).error or ""
        for j in (ppo, generate, typo, wrong_type, empty)
    }
    assert errors[ppo].startswith("InvalidInput: project") and "no reward model yet" in errors[ppo]
    assert errors[generate].startswith("JobError: no prompts to generate for (prompts=waiting)")
    assert "unknown reward parameter(s) epochz" in errors[typo]
    assert "parameter 'lr' must be a number" in errors[wrong_type]
    assert "no judgments with a preference" in errors[empty]
    assert all(job_row(committed_factory, j).attempts == 1 for j in errors)  # never retried


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"epochs": -3}, "invalid reward parameters: epochs must be at least 1, not -3"),
        ({"epochs": 0}, "invalid reward parameters: epochs must be at least 1, not 0"),
        ({"batch_size": 0}, "invalid reward parameters: batch_size must be at least 1, not 0"),
        ({"grad_accum": 0}, "invalid reward parameters: grad_accum must be at least 1, not 0"),
        (
            {"eval_fraction": -0.5},
            "invalid reward parameters: eval_fraction must be at least 0 and below 1, not -0.5",
        ),
        (
            {"backbone": "/nonexistent/dir"},
            "backbone '/nonexistent/dir' not found: it is neither minilm, smollm2, an existing "
            "directory, nor a model id in the local Hugging Face cache",
        ),
        ({"backbone": "someone/not-downloaded"}, "backbone 'someone/not-downloaded' not found"),
        (
            {"max_length": 2048},
            "max_length 2048 exceeds the backbone's 256 positions; use a max_length of at most 256",
        ),
    ],
)
def test_impossible_reward_configs_fail_once_before_training(
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    backbone: Path,
    override: dict[str, Any],
    message: str,
) -> None:
    """QA's reports: epochs -3 "succeeded" with an untrained model, batch_size 0 divided by
    zero, a missing backbone and a max_length past the tiny BERT's 256 positions crashed
    cryptically three times over. Each now fails on its first attempt, saying why."""
    project_id, _, _ = seed_planted(committed_factory, 8)
    job_id = enqueue_unchecked(
        committed_factory, project_id, "reward", {**tiny_params(backbone), **override}
    )
    seen: list[dict[str, Any]] = []
    assert worker_main.main(worker_settings, once=True, on_progress=seen.append) == ["failed"]
    job = job_row(committed_factory, job_id)
    assert (job.state, job.attempts) == (JobState.failed, 1)
    assert (job.error or "").startswith(f"JobError: {message}"), job.error
    assert not any("step" in p for p in seen)  # not one training step was taken
    with transaction(committed_factory) as session:
        assert session.scalars(select(ModelVersion)).all() == []


def test_worker_loop_schedules_reward_retraining(
    committed_factory: sessionmaker[Session], worker_settings: Settings
) -> None:
    project_id, _, _ = seed_planted(committed_factory, 3)
    with transaction(committed_factory) as session:
        session.get(Project, project_id).settings = {jobs.AUTO_REWARD_SETTING: 3}  # type: ignore[union-attr]
    # Only "generate" jobs are claimed here, so the scheduled reward job stays queued.
    assert worker_main.main(worker_settings, once=True, kinds=["generate"]) == []
    with transaction(committed_factory) as session:
        scheduled = session.scalars(select(Job)).all()
        assert [(j.kind, j.state, j.params) for j in scheduled] == [
            ("reward", JobState.queued, {"trigger": "auto"})
        ]
    assert worker_main.main(worker_settings, once=True, kinds=["generate"]) == []
    with transaction(committed_factory) as session:
        assert len(session.scalars(select(Job)).all()) == 1  # still one: it is active


def test_heartbeat_thread_writes_progress_and_notices_a_cancel(
    committed_factory: sessionmaker[Session],
) -> None:
    with transaction(committed_factory) as session:
        project = make_project(session)
        job = jobs.enqueue(session, project.id, "reward", {}, None)
        jobs.claim(session, "me:1", job.created_at)
        job_id = job.id
    state = worker_main.RunState()
    state.update({"step": 4, "total_steps": 10})
    beat = threading.Thread(
        target=worker_main._heartbeat_loop, args=(committed_factory, job_id, "me:1", state, 0.01)
    )
    beat.start()
    deadline = time.monotonic() + 20
    while job_row(committed_factory, job_id).progress != {"step": 4, "total_steps": 10}:
        assert time.monotonic() < deadline, "no heartbeat wrote the progress"
        time.sleep(0.01)
    with transaction(committed_factory) as session:
        jobs.cancel(session, job_id)
    beat.join(20)
    assert not beat.is_alive() and state.lost.is_set()  # it stopped by itself: not ours any more


def test_sigterm_sets_the_stop_event_and_handlers_are_restored() -> None:
    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with worker_main.stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) == before


def test_json_safe_replaces_non_finite_numbers() -> None:
    value = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2, "e": "x"}}
    assert runner.json_safe(value) == {"a": None, "b": [1.0, None], "c": {"d": 2, "e": "x"}}
