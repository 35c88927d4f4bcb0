"""The job queue: state machine, enqueue/claim/finish, concurrency, stale requeue, scheduling, API."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from itertools import product

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.errors import Conflict, InvalidInput, NotFound
from app.models import Job, JobState, Judgment, ModelKind, ModelVersion, Project, Role, User
from app.services import jobs
from tests.factories import login, make_project, make_prompt, make_task, make_token, make_user

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

Q, R, S, F, C = (
    JobState.queued,
    JobState.running,
    JobState.succeeded,
    JobState.failed,
    JobState.cancelled,
)
ALLOWED = {(Q, R), (Q, C), (R, S), (R, F), (R, Q), (R, C)}


@pytest.mark.parametrize(("old", "new"), list(product(JobState, JobState)))
def test_state_machine_table(old: JobState, new: JobState) -> None:
    assert jobs.can_transition(old, new) is ((old, new) in ALLOWED)


def add_judgment(
    session: Session, project: Project, user: User, when: datetime | None = None
) -> Judgment:
    """One judgment on a fresh pair (each judgment its own task, so users may repeat)."""
    prompt = make_prompt(session, project, ["good answer", "bad answer"])
    task = make_task(session, project, prompt)
    a, b = task.completion_ids
    judgment = Judgment(
        project_id=project.id,
        task_id=task.id,
        user_id=user.id,
        ranking=[[a], [b]],
        display_order=[a, b],
        **({"created_at": when} if when else {}),
    )
    session.add(judgment)
    session.flush()
    return judgment


# --- services ------------------------------------------------------------------------------


def test_enqueue_claim_heartbeat_finish(db: Session) -> None:
    admin = make_user(db, Role.admin)
    project = make_project(db)
    job = jobs.enqueue(db, project.id, "reward", {"epochs": 2}, admin.id)
    assert (job.state, job.attempts, job.params, job.created_by) == (Q, 0, {"epochs": 2}, admin.id)

    claimed = jobs.claim(db, "host:1", T0)
    assert claimed is not None and claimed.id == job.id
    assert (claimed.state, claimed.worker_id) == (R, "host:1")
    assert jobs.claim(db, "host:2", T0) is None

    assert jobs.heartbeat(db, job.id, "host:1", {"step": 3, "total_steps": 10, "loss": 0.5}, T0)
    assert not jobs.heartbeat(db, job.id, "host:2", {"step": 99}, T0)
    db.refresh(job)
    assert job.progress == {"step": 3, "total_steps": 10, "loss": 0.5}

    done = jobs.finish(db, job.id, {"eval_accuracy": 0.9}, now=T0)
    assert (done.state, done.metrics, done.error) == (S, {"eval_accuracy": 0.9}, None)
    with pytest.raises(Conflict):
        jobs.finish(db, job.id, {})
    with pytest.raises(Conflict):
        jobs.cancel(db, job.id)


def test_enqueue_rejects_unknown_kind_project_and_params(db: Session) -> None:
    project = make_project(db)
    with pytest.raises(InvalidInput, match="unknown job kind"):
        jobs.enqueue(db, project.id, "dance", {}, None)
    with pytest.raises(NotFound):
        jobs.enqueue(db, 999_999, "reward", {}, None)
    with pytest.raises(InvalidInput):
        jobs.enqueue(db, project.id, "reward", ["epochs"], None)  # type: ignore[arg-type]
    for kind in ("ppo", "generate"):
        assert jobs.enqueue(db, project.id, kind, {}, None).state is Q


def test_people_start_training_kinds_only_the_app_queues_webhooks(db: Session) -> None:
    project = make_project(db)
    with pytest.raises(InvalidInput) as refused:
        jobs.enqueue(db, project.id, "webhook", {}, None)
    assert refused.value.message == (
        "unknown job kind 'webhook'; expected one of reward, ppo, generate"
    )
    delivery = jobs.enqueue_internal(db, project.id, "webhook", {"url": "http://x"}, max_attempts=5)
    assert (delivery.kind, delivery.state, delivery.max_attempts) == ("webhook", Q, 5)


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("reward", {"epochs": -3}, "invalid reward parameters: epochs must be at least 1, not -3"),
        ("reward", {"epochs": 0}, "invalid reward parameters: epochs must be at least 1, not 0"),
        ("reward", {"epochs": "two"}, "parameter 'epochs' must be a whole number, not 'two'"),
        ("reward", {"epochs": 1.5}, "parameter 'epochs' must be a whole number, not 1.5"),
        ("reward", {"epochz": 1}, "unknown reward parameter(s) epochz; known: backbone,"),
        ("reward", {"batch_size": 0}, "batch_size must be at least 1, not 0"),
        ("reward", {"grad_accum": 0}, "grad_accum must be at least 1, not 0"),
        ("reward", {"lr": 0}, "lr must be a number above 0, not 0.0"),
        ("reward", {"lr": "fast"}, "parameter 'lr' must be a number, not 'fast'"),
        ("reward", {"weight_decay": -0.1}, "weight_decay must be a number of at least 0, not -0.1"),
        ("reward", {"warmup_ratio": 1}, "warmup_ratio must be at least 0 and below 1, not 1.0"),
        (
            "reward",
            {"eval_fraction": -0.5},
            "eval_fraction must be at least 0 and below 1, not -0.5",
        ),
        ("reward", {"max_length": 4}, "max_length must be at least 8 tokens, not 4"),
        ("reward", {"margin_scale": -1}, "margin_scale must be a number of at least 0, not -1.0"),
        ("reward", {"split_overhead_tokens": -1}, "split_overhead_tokens must be at least 0"),
        ("reward", {"keep_ties": "no"}, "parameter 'keep_ties' must be true or false, not 'no'"),
        ("reward", {"backbone": " "}, "backbone must be a name, path or model id"),
        (
            "reward",
            {"heldout_fraction": 1.5},
            "'heldout_fraction' must be between 0 and 1, not 1.5",
        ),
        ("ppo", {"totl_steps": 3}, "unknown ppo parameter(s) totl_steps"),
        ("ppo", {"mini_batch_size": 32}, "mini_batch_size must be in 1..batch_size"),
        ("ppo", {"kl_estimator": "k9"}, "kl_estimator must be one of k1, k2, k3, abs, not 'k9'"),
        (
            "ppo",
            {"guard": {"patience": 0}},
            "invalid guard parameters: patience must be at least 1",
        ),
        ("ppo", {"guard": {"patiense": 3}}, "unknown guard parameter(s) patiense"),
        ("ppo", {"device": "cuda:1"}, "parameter 'device' of a ppo job must be auto or cpu"),
        ("ppo", {"reward_model_id": 0}, "'reward_model_id' must be a whole number of at least 1"),
        ("generate", {"n": 0}, "invalid generate parameters: n must be at least 1, not 0"),
        ("generate", {"top_p": 0}, "top_p must be above 0 and at most 1, not 0.0"),
        ("generate", {"prompts": "some"}, "prompts must be one of waiting, all, heldout"),
        ("generate", {"device": "tpu"}, "parameter 'device' must be auto, cpu, cuda or cuda:N"),
        ("generate", {"limit": -1}, "parameter 'limit' must be a whole number of at least 1"),
    ],
)
def test_enqueue_refuses_params_the_worker_would_refuse(
    db: Session, kind: str, params: dict, message: str
) -> None:
    """The worker's own rules (app.domain.job_params), asked when the job is created."""
    project = make_project(db)
    with pytest.raises(InvalidInput) as refused:
        jobs.enqueue(db, project.id, kind, params, None)
    assert message in refused.value.message
    assert db.scalars(select(Job)).all() == []


def test_enqueue_accepts_whole_params_of_every_kind(db: Session) -> None:
    project = make_project(db)
    reward = {
        "epochs": 2.0,  # JSON does not tell 2 from 2.0
        "backbone": "/models/mine",  # whether it exists is the worker's question
        "heldout_split": True,
        "heldout_fraction": 0.3,
        "split_overhead_tokens": None,
        "trigger": "cli",
    }
    ppo = {"total_steps": 5, "guard": {"patience": 3}, "prompts": ["a", "b"], "device": "cpu"}
    policy = _model(db, project, ModelKind.policy)
    generate = {
        "n": 2,
        "temperature": 0,
        "policy_id": policy.id,
        "prompts": "heldout",
        "device": "cuda:1",
    }
    for kind, params in (("reward", reward), ("ppo", ppo), ("generate", generate)):
        assert jobs.enqueue(db, project.id, kind, params, None).params == params


def test_claim_takes_oldest_first_and_filters_kinds(db: Session) -> None:
    project = make_project(db)
    other = make_project(db)
    first = jobs.enqueue(db, project.id, "generate", {}, None)
    second = jobs.enqueue(db, other.id, "reward", {}, None)
    third = jobs.enqueue(db, project.id, "reward", {}, None)
    first.created_at = T0
    second.created_at = T0 + timedelta(seconds=1)
    third.created_at = T0 - timedelta(seconds=1)
    db.flush()
    assert jobs.claim(db, "w", T0, kinds=["generate"]).id == first.id  # type: ignore[union-attr]
    assert jobs.claim(db, "w", T0).id == third.id  # type: ignore[union-attr]
    assert jobs.claim(db, "w", T0, job_id=second.id).id == second.id  # type: ignore[union-attr]
    assert jobs.claim(db, "w", T0) is None


def test_one_active_reward_job_per_project(db: Session) -> None:
    project = make_project(db)
    other = make_project(db)
    job = jobs.enqueue(db, project.id, "reward", {}, None)
    with pytest.raises(Conflict, match="already has an active reward job"):
        jobs.enqueue(db, project.id, "reward", {}, None)
    jobs.enqueue(db, other.id, "reward", {}, None)  # other projects are independent
    jobs.enqueue(db, project.id, "ppo", {}, None)
    jobs.enqueue(db, project.id, "ppo", {}, None)  # the limit is for reward jobs only

    jobs.claim(db, "w", T0, kinds=["reward"], job_id=job.id)
    with pytest.raises(Conflict):  # running counts as active too
        jobs.enqueue(db, project.id, "reward", {}, None)
    jobs.finish(db, job.id, {})
    assert jobs.enqueue(db, project.id, "reward", {}, None).state is Q


def test_fail_requeues_retryable_errors_until_attempts_run_out(db: Session) -> None:
    project = make_project(db)
    job = jobs.enqueue(db, project.id, "reward", {}, None, max_attempts=2)
    jobs.claim(db, "w", T0)
    jobs.fail(db, job.id, "CUDA out of memory", retryable=True)
    assert (job.state, job.attempts, job.error, job.worker_id) == (Q, 1, "CUDA out of memory", None)
    jobs.claim(db, "w", T0)
    jobs.fail(db, job.id, "CUDA out of memory again", retryable=True, now=T0)
    assert (job.state, job.attempts, job.finished_at) == (F, 2, T0)

    permanent = jobs.enqueue(db, project.id, "reward", {}, None)
    jobs.claim(db, "w", T0)
    jobs.fail(db, permanent.id, "unknown parameter 'epochz'")
    assert (permanent.state, permanent.attempts) == (F, 1)


def test_requeue_after_shutdown_does_not_count_an_attempt(db: Session) -> None:
    project = make_project(db)
    job = jobs.enqueue(db, project.id, "reward", {}, None)
    jobs.claim(db, "w1", T0)
    assert jobs.requeue(db, job.id, "someone-else") is None
    assert jobs.requeue(db, job.id, "w1") is job
    assert (job.state, job.attempts, job.worker_id) == (Q, 0, None)


def test_cancel_stops_heartbeats_and_keeps_state(db: Session) -> None:
    project = make_project(db)
    queued = jobs.enqueue(db, project.id, "generate", {}, None)
    jobs.cancel(db, queued.id)
    assert queued.state is C
    assert jobs.claim(db, "w", T0) is None  # a cancelled job never runs

    running = jobs.enqueue(db, project.id, "reward", {}, None)
    jobs.claim(db, "w", T0)
    jobs.cancel(db, running.id)
    assert not jobs.heartbeat(db, running.id, "w", {"step": 1}, T0)
    assert jobs.requeue(db, running.id, "w") is None  # the worker stopping does not revive it
    jobs.fail(db, running.id, "Interrupted")
    assert running.state is C


def test_stale_heartbeat_requeues_with_bounded_attempts(db: Session) -> None:
    project = make_project(db)
    job = jobs.enqueue(db, project.id, "reward", {}, None, max_attempts=2)
    jobs.claim(db, "w1", T0)
    jobs.heartbeat(db, job.id, "w1", {"step": 1}, T0 + timedelta(seconds=50))

    assert jobs.requeue_stale(db, T0 + timedelta(seconds=100), stale_after_s=60) == []
    assert job.state is R  # the heartbeat at +50 s keeps it alive

    assert [j.id for j in jobs.requeue_stale(db, T0 + timedelta(seconds=111), 60)] == [job.id]
    assert (job.state, job.attempts, job.worker_id) == (Q, 1, None)
    assert "w1 stopped heartbeating" in (job.error or "")
    assert not jobs.heartbeat(db, job.id, "w1", {}, T0 + timedelta(seconds=112))  # w1 lost it

    later = T0 + timedelta(seconds=200)
    jobs.claim(db, "w2", later)
    assert jobs.requeue_stale(db, later + timedelta(seconds=61), 60) == [job]
    assert (job.state, job.attempts) == (F, 2)  # attempts exhausted: failed, not requeued
    assert jobs.requeue_stale(db, later + timedelta(seconds=999), 60) == []


def test_maybe_schedule_reward_after_n_new_judgments(db: Session) -> None:
    annotator = make_user(db)
    manual = make_project(db)
    project = make_project(db, settings={jobs.AUTO_REWARD_SETTING: 3})
    for _ in range(5):
        add_judgment(db, manual, annotator)
    assert jobs.maybe_schedule_reward(db, manual.id) is None  # no setting, no auto jobs
    assert jobs.scheduled_projects(db) == [project.id]

    for i in range(2):
        add_judgment(db, project, annotator, T0 + timedelta(seconds=i))
    assert jobs.maybe_schedule_reward(db, project.id) is None  # 2 < 3
    add_judgment(db, project, annotator, T0 + timedelta(seconds=2))
    job = jobs.maybe_schedule_reward(db, project.id)
    assert job is not None and job.params == {"trigger": "auto"} and job.kind == "reward"
    job.created_at = T0 + timedelta(seconds=10)
    db.flush()

    for i in range(5):
        add_judgment(db, project, annotator, T0 + timedelta(seconds=11 + i))
    assert jobs.maybe_schedule_reward(db, project.id) is None  # one is active already
    jobs.claim(db, "w", T0)
    jobs.finish(db, job.id, {})
    again = jobs.maybe_schedule_reward(db, project.id)  # 5 new judgments since that job
    assert again is not None and again.id != job.id
    again.created_at = T0 + timedelta(seconds=20)
    jobs.cancel(db, again.id)
    assert jobs.maybe_schedule_reward(db, project.id) is None  # cancelled is a baseline too

    db.add(
        ModelVersion(
            project_id=project.id,
            kind=ModelKind.reward,
            artifact_path="/x",
            created_at=T0 + timedelta(seconds=30),
        )
    )
    for i in range(3):
        add_judgment(db, project, annotator, T0 + timedelta(seconds=25 + i))
    db.flush()
    assert jobs.judgments_since_last_reward(db, project.id) == 0  # the model is newer
    for i in range(3):
        add_judgment(db, project, annotator, T0 + timedelta(seconds=31 + i))
    assert jobs.maybe_schedule_reward(db, project.id) is not None


def test_judgments_made_while_a_reward_job_trains_count_toward_the_next(db: Session) -> None:
    """QA: with N = 5, judgments 41-45 arrived while job 16 trained on judgments up to 40;
    no job followed its success until 5 more came. The model's baseline is its data
    cut-off, not its creation time."""
    annotator = make_user(db)
    project = make_project(db, settings={jobs.AUTO_REWARD_SETTING: 5})
    trained_on = [add_judgment(db, project, annotator, T0 + timedelta(seconds=i)) for i in range(5)]
    job = jobs.maybe_schedule_reward(db, project.id)
    assert job is not None
    job.created_at = T0 + timedelta(seconds=10)
    jobs.claim(db, "w", T0 + timedelta(seconds=11))
    during = [
        add_judgment(db, project, annotator, T0 + timedelta(seconds=20 + i)) for i in range(5)
    ]
    db.add(  # registered when training ends, after the five above
        ModelVersion(
            project_id=project.id,
            kind=ModelKind.reward,
            artifact_path="/x",
            job_id=job.id,
            config={"data": {"max_judgment_id": trained_on[-1].id, "judgments": 5}},
            created_at=T0 + timedelta(seconds=60),
        )
    )
    jobs.finish(db, job.id, {})
    db.flush()
    assert jobs.judgments_since_last_reward(db, project.id) == len(during) == 5
    again = jobs.maybe_schedule_reward(db, project.id)
    assert again is not None and again.id != job.id


def test_requeued_jobs_keep_where_they_stopped_but_show_no_live_progress(
    client,
    db: Session,  # type: ignore[no-untyped-def]
) -> None:
    """QA: after a SIGTERM requeue the page said "42 / 360 steps · 1 min 8 s ETA" for a
    queued job."""
    project = make_project(db)
    stopped = jobs.enqueue(db, project.id, "reward", {"keep_ties": False}, None)
    jobs.claim(db, "w1", T0)
    live = {"stage": "training", "model": "main", "step": 40, "total_steps": 360, "loss": 0.5}
    jobs.heartbeat(db, stopped.id, "w1", {**live, "epoch": 1.8888888888888888, "eta_s": 68}, T0)
    # The worker's own last progress is newer than the heartbeat's.
    jobs.requeue(db, stopped.id, "w1", progress={**live, "step": 42, "eta_s": 68})
    assert stopped.progress == {
        "requeued": "worker stopped",
        "interrupted": {"stage": "training", "model": "main", "step": 42, "total_steps": 360},
    }
    crashed = jobs.enqueue(db, project.id, "generate", {}, None)
    jobs.claim(db, "w2", T0, job_id=crashed.id)
    jobs.heartbeat(db, crashed.id, "w2", {"step": 3, "total_steps": 9, "eta_s": 5}, T0)
    jobs.fail(db, crashed.id, "CUDA out of memory", retryable=True)
    assert crashed.progress == {
        "requeued": "attempt 1 failed",
        "interrupted": {"step": 3, "total_steps": 9},
    }
    db.flush()

    headers = make_token(db, make_user(db, Role.researcher))
    page = client.get(f"/jobs/{stopped.id}", headers=headers).text
    assert (
        "Waiting for a worker. The last run stopped after step 42 of 360 (worker stopped)." in page
    )
    assert "42 / 360" not in page and "ETA" not in page and "1 min 8 s" not in page
    assert "<th>keep_ties</th><td>false</td>" in page  # params as JSON, not Python
    listing = client.get(f"/projects/{project.id}/jobs", headers=headers).text
    assert "interrupted after step 42" in listing and "interrupted after step 3" in listing
    assert "42 / 360" not in listing

    jobs.claim(db, "w3", T0, job_id=stopped.id)  # a new run starts its progress afresh
    assert stopped.progress == {}
    jobs.heartbeat(db, stopped.id, "w3", {**live, "epoch": 1.8888888888888888, "eta_s": 68}, T0)
    db.flush()
    running = client.get(f"/jobs/{stopped.id}", headers=headers).text
    assert "40 / 360" in running and "1 min 8 s" in running
    assert "<b>1.89</b>epoch" in running and "1.888" not in running


def test_eta_text() -> None:
    assert jobs.eta_text({}) == ""
    assert jobs.eta_text({"eta_s": 12.4}) == "12 s"
    assert jobs.eta_text({"eta_s": 200}) == "3 min 20 s"
    assert jobs.eta_text({"eta_s": 7500}) == "2 h 5 min"


# --- concurrency: real commits --------------------------------------------------------------


def _seed_jobs(factory: sessionmaker[Session], n: int) -> list[int]:
    with transaction(factory) as session:
        project = make_project(session)
        ids = []
        for _ in range(n):
            job = jobs.enqueue(session, project.id, "generate", {}, None)
            ids.append(job.id)
        return ids


def test_two_workers_never_take_the_same_job(
    committed_factory: sessionmaker[Session], backend: str
) -> None:
    ids = _seed_jobs(committed_factory, 2)
    if backend == "sqlite":
        # One writer at a time (BEGIN IMMEDIATE): claims in turn, each sees the other's commit.
        got = []
        for worker in ("a", "b", "c"):
            with transaction(committed_factory) as session:
                job = jobs.claim(session, worker, T0)
                got.append(job.id if job else None)
        assert sorted(got[:2]) == sorted(ids) and got[2] is None
        return

    # Postgres: both transactions hold their claim at the same moment before committing.
    barrier = threading.Barrier(2, timeout=10)
    got: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with transaction(committed_factory) as session:
                job = jobs.claim(session, name, T0)
                got[name] = job.id if job else None
                barrier.wait()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert sorted(v for v in got.values() if v is not None) == sorted(ids)


@pytest.mark.postgres
def test_many_workers_claim_every_job_exactly_once(
    committed_factory: sessionmaker[Session], backend: str
) -> None:
    if backend != "postgres":
        pytest.skip("SKIP LOCKED concurrency is a Postgres property; SQLite serializes writers")
    ids = _seed_jobs(committed_factory, 40)
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            while True:
                with transaction(committed_factory) as session:
                    job = jobs.claim(session, name, T0)
                    if job is None:
                        return
                    with lock:
                        claimed.append((name, job.id))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(job_id for _, job_id in claimed) == sorted(ids)
    with transaction(committed_factory) as session:
        assert all(session.get(Job, i).state is R for i in ids)  # type: ignore[union-attr]


def test_concurrent_auto_schedule_enqueues_once(
    committed_factory: sessionmaker[Session], backend: str
) -> None:
    with transaction(committed_factory) as session:
        user = make_user(session)
        project = make_project(session, settings={jobs.AUTO_REWARD_SETTING: 1})
        add_judgment(session, project, user)
        project_id = project.id
    results: list[int | None] = []
    errors: list[BaseException] = []

    def schedule() -> None:
        try:
            with transaction(committed_factory) as session:
                job = jobs.maybe_schedule_reward(session, project_id)
                results.append(job.id if job else None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=schedule) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len([r for r in results if r is not None]) == 1


# --- API and pages ------------------------------------------------------------------------

JSON = {"Accept": "application/json"}  # errors of HTML routes as JSON, to read their detail


def test_jobs_api_roles_and_lifecycle(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    admin = make_token(db, make_user(db, Role.admin))
    researcher = make_token(db, make_user(db, Role.researcher))
    annotator = make_token(db, make_user(db, Role.annotator))
    project = make_project(db)
    other = make_project(db)
    url = f"/api/v1/projects/{project.id}/jobs"
    body = {"kind": "reward", "params": {"epochs": 1}}

    assert client.post(url, json=body).status_code == 401
    assert client.get(url).status_code == 401
    assert client.post(url, json=body, headers=researcher).status_code == 403
    assert client.post(url, json=body, headers=annotator).status_code == 403
    created = client.post(url, json=body, headers=admin)
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["kind"], job["state"], job["params"], job["attempts"]) == (
        "reward",
        "queued",
        {"epochs": 1},
        0,
    )
    assert job["project_id"] == project.id

    again = client.post(url, json=body, headers=admin)
    assert again.status_code == 409 and again.json()["job_id"] == job["id"]
    bad = client.post(url, json={"kind": "sing"}, headers=admin)
    assert bad.status_code == 422 and "unknown job kind" in bad.json()["detail"]
    webhook = client.post(url, json={"kind": "webhook"}, headers=admin)
    assert webhook.status_code == 422
    assert webhook.json()["detail"] == (
        "unknown job kind 'webhook'; expected one of reward, ppo, generate"
    )
    # A field beside kind and params is refused by name, not dropped (it trained with defaults).
    stray = client.post(url, json={"kind": "ppo", "epochs": -3}, headers=admin)
    assert stray.status_code == 422
    assert [e["loc"] for e in stray.json()["errors"]] == [["body", "epochs"]]
    for params, detail in (
        ({"epochs": -3}, "invalid reward parameters: epochs must be at least 1, not -3"),
        ({"epochs": "two"}, "parameter 'epochs' must be a whole number, not 'two'"),
    ):
        refused = client.post(url, json={"kind": "ppo", "params": params}, headers=admin)
        assert refused.status_code == 422 and "unknown ppo parameter(s) epochs" in refused.text
        refused = client.post(
            f"/api/v1/projects/{other.id}/jobs",
            json={"kind": "reward", "params": params},
            headers=admin,
        )
        assert refused.status_code == 422 and refused.json()["detail"] == detail
    assert client.post("/api/v1/projects/999999/jobs", json=body, headers=admin).status_code == 404
    assert [j.id for j in db.scalars(select(Job))] == [job["id"]]  # nothing else was queued

    for headers in (admin, researcher):
        got = client.get(f"/api/v1/jobs/{job['id']}", headers=headers)
        assert got.status_code == 200 and got.json()["state"] == "queued"
        listed = client.get(url, headers=headers)
        assert [j["id"] for j in listed.json()] == [job["id"]]
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=annotator).status_code == 403
    assert client.get("/api/v1/jobs/999999", headers=admin).status_code == 404

    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=researcher).status_code == 403
    cancelled = client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=admin)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=admin).status_code == 409


def test_jobs_pages_start_and_live_status(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    admin = make_user(db, Role.admin)
    researcher = make_user(db, Role.researcher)
    project = make_project(db, name="Helpful <b>chat</b>")

    csrf = login(client, researcher.username)
    page = client.get(f"/projects/{project.id}/jobs")
    assert page.status_code == 200
    assert "Helpful &lt;b&gt;chat&lt;/b&gt;" in page.text and "Start training" not in page.text
    denied = client.post(
        f"/projects/{project.id}/jobs",
        data={"csrf_token": csrf, "epochs": "1"},
        headers=JSON,
    )
    assert denied.status_code == 403

    csrf = login(client, admin.username)
    assert "Start training" in client.get(f"/projects/{project.id}/jobs").text
    no_token = client.post(f"/projects/{project.id}/jobs", data={"epochs": "2"}, headers=JSON)
    assert no_token.status_code == 403
    for typed, message in (
        ("two", "epochs must be a whole number, not &#39;two&#39;"),
        ("1.5", "epochs must be a whole number, not &#39;1.5&#39;"),
        ("-3", "invalid reward parameters: epochs must be at least 1, not -3"),
    ):
        bad = client.post(
            f"/projects/{project.id}/jobs",
            data={"csrf_token": csrf, "epochs": typed, "lr": "0.01", "extra": '{"seed": 3}'},
        )
        # The form comes back with the message and what was typed, not an error page.
        assert bad.status_code == 422 and message in bad.text, bad.text
        assert (
            'class="job-form"' in bad.text
            and f'name="epochs" inputmode="numeric" placeholder="default" value="{typed}"'
            in bad.text
        )
        assert 'value="0.01"' in bad.text and "{&#34;seed&#34;: 3}</textarea>" in bad.text
    webhook = client.post(
        f"/projects/{project.id}/jobs", data={"csrf_token": csrf, "kind": "webhook"}
    )
    assert webhook.status_code == 422
    assert (
        "unknown job kind &#39;webhook&#39;; expected one of reward, ppo, generate" in webhook.text
    )
    assert db.scalars(select(Job)).all() == []
    started = client.post(
        f"/projects/{project.id}/jobs",
        data={
            "csrf_token": csrf,
            "epochs": "2",
            "lr": "0.001",
            "batch_size": "",
            "backbone": "",
            "extra": '{"seed": 7}',
        },
        follow_redirects=False,
    )
    assert started.status_code == 303, started.text
    job_id = int(started.headers["location"].rsplit("/", 1)[1])
    job = db.get(Job, job_id)
    assert job is not None and job.params == {"epochs": 2, "lr": 0.001, "seed": 7}

    full = client.get(f"/jobs/{job_id}")
    assert full.status_code == 200 and "<html" in full.text
    assert f'hx-get="/jobs/{job_id}"' in full.text and 'hx-trigger="every 2s"' in full.text

    jobs.claim(db, "host:42", T0, job_id=job_id)
    jobs.heartbeat(
        db,
        job_id,
        "host:42",
        {"step": 5, "total_steps": 20, "loss": 0.4321, "epoch": 1, "eta_s": 75},
        T0,
    )
    db.flush()
    fragment = client.get(f"/jobs/{job_id}", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert 'id="job-status"' in fragment.text
    assert "5 / 20" in fragment.text and "0.4321" in fragment.text and "1 min 15 s" in fragment.text
    assert 'aria-valuenow="5"' in fragment.text

    jobs.fail(db, job_id, "boom <script>alert(1)</script>")
    db.flush()
    final = client.get(f"/jobs/{job_id}", headers={"HX-Request": "true"})
    assert "hx-trigger" not in final.text  # polling stops once the job is final
    assert "&lt;script&gt;" in final.text and "<script>alert" not in final.text

    listing = client.get(f"/projects/{project.id}/jobs")
    assert f'href="/jobs/{job_id}"' in listing.text and "failed" in listing.text

    cancel_target = jobs.enqueue(db, project.id, "generate", {}, admin.id)
    db.flush()
    resp = client.post(
        f"/jobs/{cancel_target.id}/cancel", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert resp.status_code == 303
    db.refresh(cancel_target)
    assert cancel_target.state is C


def test_starting_a_second_reward_job_from_the_page_shows_the_conflict(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    admin = make_user(db, Role.admin)
    project = make_project(db)
    jobs.enqueue(db, project.id, "reward", {}, admin.id)
    csrf = login(client, admin.username)
    resp = client.post(
        f"/projects/{project.id}/jobs", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert resp.status_code == 409 and "already has an active reward job" in resp.text


def test_project_jobs_list_training_jobs_and_deliveries_apart(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    from app.services import webhooks

    admin = make_token(db, make_user(db, Role.admin))
    project = make_project(db)
    webhooks.register(db, project.id, "https://example.test/s", ["snapshot.created"])
    delivery = webhooks.emit(db, project.id, "snapshot.created", {"snapshot_id": 1})[0]
    url = f"/api/v1/projects/{project.id}/jobs"
    reward = client.post(url, json={"kind": "reward"}, headers=admin).json()
    assert [j["id"] for j in client.get(url, headers=admin).json()] == [reward["id"]]
    deliveries = client.get(f"{url}?kind=webhook", headers=admin).json()
    assert [j["id"] for j in deliveries] == [delivery.id]
    assert client.get(f"{url}?kind=sing", headers=admin).status_code == 422
    page = client.get(f"/projects/{project.id}/jobs", headers=admin).text
    assert f"/jobs/{reward['id']}" in page and f'/jobs/{delivery.id}"' not in page


def _model(db: Session, project: Project, kind: ModelKind) -> ModelVersion:
    model = ModelVersion(project_id=project.id, kind=kind, artifact_path="/models/x")
    db.add(model)
    db.flush()
    return model


def test_jobs_may_name_only_their_own_projects_models(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    """QA: a PPO job in project 2 trained against project 1's reward model and from its
    policy, and a generate job sampled from it; each model param is now checked up front."""
    admin = make_token(db, make_user(db, Role.admin))
    mine, theirs = make_project(db), make_project(db)
    reward, policy = _model(db, theirs, ModelKind.reward), _model(db, theirs, ModelKind.policy)
    url = f"/api/v1/projects/{mine.id}/jobs"
    body = {"kind": "ppo", "params": {"reward_model_id": reward.id, "parent_policy_id": policy.id}}
    resp = client.post(url, json=body, headers=admin)
    assert resp.status_code == 422, resp.text
    assert f"reward_model_id: project {mine.id} has no model {reward.id}" in resp.text
    refused = [
        ("ppo", {"parent_policy_id": policy.id}, f"parent_policy_id: project {mine.id} has no"),
        ("ppo", {"heldout_reward_model_id": reward.id}, "heldout_reward_model_id: project"),
        ("generate", {"policy_id": policy.id}, f"policy_id: project {mine.id} has no model"),
        ("generate", {"policy_id": 999_999}, "policy_id: project"),
    ]
    own_reward, own_policy = _model(db, mine, ModelKind.reward), _model(db, mine, ModelKind.policy)
    refused += [
        ("ppo", {"reward_model_id": own_policy.id}, "is a policy model, not a reward"),
        ("ppo", {"parent_policy_id": own_reward.id}, "is a reward model, not a policy"),
        ("generate", {"policy_id": own_reward.id}, "is a reward model, not a policy"),
    ]
    for kind, params, message in refused:
        with pytest.raises(InvalidInput) as exc:
            jobs.enqueue(db, mine.id, kind, params, None)
        assert message in exc.value.message, (kind, params)
    assert db.scalars(select(Job)).all() == []
    ok = {"reward_model_id": own_reward.id, "parent_policy_id": own_policy.id}
    created = client.post(url, json={"kind": "ppo", "params": ok}, headers=admin)
    assert created.status_code == 201 and created.json()["params"] == ok
    generate = {"kind": "generate", "params": {"policy_id": own_policy.id}}
    assert client.post(url, json=generate, headers=admin).status_code == 201


def test_the_jobs_form_starts_every_kind_and_keeps_the_kind_on_error(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    admin = make_user(db, Role.admin)
    project, other = make_project(db), make_project(db)
    foreign = _model(db, other, ModelKind.policy)
    csrf = login(client, admin.username)
    url = f"/projects/{project.id}/jobs"
    page = client.get(url).text
    assert '<select name="kind">' in page
    assert '<option value="reward" selected>reward</option>' in page
    assert '<option value="ppo">ppo</option><option value="generate">generate</option>' in page

    started = client.post(
        url,
        data={"csrf_token": csrf, "kind": "ppo", "extra": '{"total_steps": 2}'},
        follow_redirects=False,
    )
    assert started.status_code == 303, started.text
    job = db.get(Job, int(started.headers["location"].rsplit("/", 1)[1]))
    assert job is not None and (job.kind, job.params) == ("ppo", {"total_steps": 2})

    for data, message in (
        ({"kind": "ppo", "epochs": "two"}, "epochs must be a whole number"),
        ({"kind": "ppo", "extra": '{"totl_steps": 2}'}, "unknown ppo parameter(s) totl_steps"),
    ):
        bad = client.post(url, data={"csrf_token": csrf, **data})
        assert bad.status_code == 422 and message in bad.text, bad.text
        assert '<option value="ppo" selected>ppo</option>' in bad.text
        assert '<option value="reward" selected>' not in bad.text
    extra = f'{{"policy_id": {foreign.id}}}'
    bad = client.post(url, data={"csrf_token": csrf, "kind": "generate", "extra": extra})
    assert bad.status_code == 422 and f"has no model {foreign.id}" in bad.text
    assert '<option value="generate" selected>generate</option>' in bad.text
    started = client.post(
        url, data={"csrf_token": csrf, "kind": "generate"}, follow_redirects=False
    )
    assert started.status_code == 303
    kinds = [j.kind for j in db.scalars(select(Job).order_by(Job.id))]
    assert kinds == ["ppo", "generate"]
