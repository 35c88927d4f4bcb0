"""The job queue: enqueue, claim, heartbeat, finish, fail, requeue, cancel.

The ``jobs`` table is both the queue and the run record the UI shows. Workers are separate
processes that share nothing but the database, so every step here is one short transaction
owned by the caller (the request or the worker loop); nothing here commits.

Claiming uses ``SELECT … FOR UPDATE SKIP LOCKED`` on Postgres, so several workers never take
the same job; on SQLite every transaction begins IMMEDIATE (see ``app.db``), which serializes
claims without it. Time is always passed in (``now``) so stale-heartbeat logic is testable
without sleeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.domain import job_params
from app.domain.job_params import GENERATE, PPO, REWARD
from app.errors import Conflict, InvalidInput, NotFound
from app.models import Job, JobState, Judgment, ModelKind, ModelVersion, Project, Snapshot

WEBHOOK = "webhook"  # delivered by app.services.webhooks.run_due, not the worker runner
TRAINING_KINDS = (REWARD, PPO, GENERATE)
"""What the training worker's runner claims; webhook deliveries go through webhooks.run_due,
which honours their back-off times."""
USER_KINDS = TRAINING_KINDS
"""What people may start (API, admin form, CLI): `enqueue`."""
KINDS = (*TRAINING_KINDS, WEBHOOK)
"""Job kinds the queue holds; the app itself queues the rest (`enqueue_internal`)."""

ACTIVE_STATES = (JobState.queued, JobState.running)
FINAL_STATES = (JobState.succeeded, JobState.failed, JobState.cancelled)
DEFAULT_MAX_ATTEMPTS = 3
AUTO_REWARD_SETTING = "reward_every_n_judgments"
MAX_ERROR_CHARS = 8000
MODEL_PARAMS: dict[str, ModelKind] = {
    "reward_model_id": ModelKind.reward,
    "heldout_reward_model_id": ModelKind.reward,
    "parent_policy_id": ModelKind.policy,
    "policy_id": ModelKind.policy,
}
"""Params that name a model version, with the kind it must be (ppo and generate jobs)."""

_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled}),
    # running → queued: a stale heartbeat, a retryable failure, or a worker told to stop.
    JobState.running: frozenset(
        {JobState.succeeded, JobState.failed, JobState.queued, JobState.cancelled}
    ),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


def can_transition(old: JobState, new: JobState) -> bool:
    """Whether a job may move from `old` to `new`; final states never change again."""
    return new in _TRANSITIONS[old]


def _move(job: Job, new: JobState) -> None:
    if not can_transition(job.state, new):
        raise Conflict(
            f"job {job.id} is {job.state.value}; it cannot become {new.value}",
            job_id=job.id,
            state=job.state.value,
        )
    job.state = new


def _for_update(stmt: Select[Any], session: Session) -> Select[Any]:
    """Row locks that skip rows other workers hold (Postgres); SQLite is already serialized."""
    if session.get_bind().dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True)
    return stmt


def _validate_params(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise InvalidInput("params must be a JSON object with string keys")
    return dict(params)


def get(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def list_for_project(
    session: Session,
    project_id: int,
    *,
    limit: int = 100,
    kinds: Sequence[str] = TRAINING_KINDS,
) -> list[Job]:
    """Newest first; the project must exist so a typo is a 404, not an empty list. Training
    jobs by default: webhook deliveries are queue plumbing (`kinds=(WEBHOOK,)` lists them)."""
    if session.get(Project, project_id) is None:
        raise NotFound(f"no project {project_id}")
    stmt = (
        select(Job)
        .where(Job.project_id == project_id, Job.kind.in_(list(kinds)))
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    )
    return list(session.scalars(stmt))


def list_recent(session: Session, *, limit: int = 100) -> list[Job]:
    return list(session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))


def active_job(session: Session, project_id: int, kind: str) -> Job | None:
    stmt = (
        select(Job)
        .where(Job.project_id == project_id, Job.kind == kind, Job.state.in_(ACTIVE_STATES))
        .order_by(Job.id)
        .limit(1)
    )
    return session.scalar(stmt)


def check_params(kind: str, params: dict[str, Any]) -> None:
    """InvalidInput unless a `kind` job could start with `params`: the rules the worker applies
    when it runs one (app.domain.job_params), asked up front so a typo or `epochs: -3` is a
    422 now instead of a failed job, or an untrained model, later."""
    try:
        job_params.check(kind, params)
    except job_params.InvalidParams as exc:
        raise InvalidInput(str(exc)) from None
    if kind in (GENERATE, PPO) and "prompts" in params:
        # Deferred import: generation reaches this module through chaining.
        from app.services import generation

        generation.parse_selection(params["prompts"])


def _check_models(session: Session, project_id: int, params: dict[str, Any]) -> None:
    """InvalidInput unless every model the params name exists, is of the kind the param
    takes, and belongs to `project_id`: a job must not train on or sample from another
    project's models. The worker asks again when it runs (app.services.chaining)."""
    for name, kind in MODEL_PARAMS.items():
        model_id = job_params.int_param(params, name)  # already checked by check_params
        if model_id is None:
            continue
        model = session.get(ModelVersion, model_id)
        if model is None or model.project_id != project_id:
            raise InvalidInput(f"{name}: project {project_id} has no model {model_id}")
        if model.kind is not kind:
            raise InvalidInput(
                f"{name}: model {model_id} is a {model.kind.value} model, not a {kind.value}"
            )


def enqueue(
    session: Session,
    project_id: int,
    kind: str,
    params: dict[str, Any] | None,
    created_by: int | None,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Job:
    """Queue a job a person asked for (the API, the admin form, the CLI): one of USER_KINDS,
    with params the worker will accept (`check_params`) naming only this project's snapshots
    and models. At most one reward job per project may be queued or running at once."""
    if kind not in USER_KINDS:
        raise InvalidInput(f"unknown job kind {kind!r}; expected one of {', '.join(USER_KINDS)}")
    clean = _validate_params(params)
    check_params(kind, clean)
    snapshot_id = clean.get("snapshot_id")
    if kind == REWARD and snapshot_id is not None:
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is None or snapshot.project_id != project_id:
            raise InvalidInput(f"project {project_id} has no snapshot {snapshot_id}")
    _check_models(session, project_id, clean)
    return enqueue_internal(session, project_id, kind, clean, created_by, max_attempts=max_attempts)


def enqueue_internal(
    session: Session,
    project_id: int,
    kind: str,
    params: dict[str, Any] | None,
    created_by: int | None = None,
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Job:
    """Queue a job the app itself starts: a chained run, an automatic retrain, a webhook
    delivery. Any of KINDS; params are not checked beyond being an object, since a loop
    setting stored before a rule must fail its own job in the worker, not the job that
    succeeded and chains it. At most one reward job per project may be queued or running.

    The project row is locked first (``FOR NO KEY UPDATE``, which does not block the foreign
    key checks of judgments being inserted meanwhile), and the "already active?" question is
    asked in a new statement after the lock is held, so two workers' auto-schedules or two
    admins' clicks cannot both enqueue at READ COMMITTED.
    """
    if kind not in KINDS:
        raise InvalidInput(f"unknown job kind {kind!r}; expected one of {', '.join(KINDS)}")
    if max_attempts < 1:
        raise InvalidInput("max_attempts must be at least 1")
    clean = _validate_params(params)
    project = session.get(Project, project_id, with_for_update={"key_share": True})
    if project is None:
        raise NotFound(f"no project {project_id}")
    if kind == REWARD:
        existing = active_job(session, project_id, kind)
        if existing is not None:
            raise Conflict(
                f"project {project_id} already has an active reward job ({existing.id}, "
                f"{existing.state.value}); cancel it or wait for it to finish",
                job_id=existing.id,
            )
    job = Job(
        project_id=project_id,
        kind=kind,
        params=clean,
        state=JobState.queued,
        progress={},
        metrics={},
        attempts=0,
        max_attempts=max_attempts,
        created_by=created_by,
    )
    session.add(job)
    session.flush()
    return job


def claim(
    session: Session,
    worker_id: str,
    now: datetime,
    kinds: Sequence[str] | None = None,
    *,
    job_id: int | None = None,
) -> Job | None:
    """Take the oldest queued job (or the named one) for `worker_id`; None when none is free."""
    stmt = select(Job).where(Job.state == JobState.queued)
    if kinds is not None:
        stmt = stmt.where(Job.kind.in_(list(kinds)))
    if job_id is not None:
        stmt = stmt.where(Job.id == job_id)
    stmt = _for_update(stmt.order_by(Job.created_at, Job.id).limit(1), session)
    job = session.scalar(stmt)
    if job is None:
        return None
    _move(job, JobState.running)
    job.worker_id = worker_id
    job.started_at = now
    job.heartbeat_at = now
    job.finished_at = None
    job.progress = {}
    session.flush()
    return job


def _owned(session: Session, job_id: int, worker_id: str) -> Job | None:
    job = session.get(Job, job_id)
    if job is None or job.state is not JobState.running or job.worker_id != worker_id:
        return None
    return job


def heartbeat(
    session: Session, job_id: int, worker_id: str, progress: dict[str, Any] | None, now: datetime
) -> bool:
    """Record that `worker_id` is alive and how far it got.

    Returns False when the job is no longer this worker's to run (cancelled by a person, or
    requeued as stale and taken by another worker): the caller should stop at the next step.
    """
    job = _owned(session, job_id, worker_id)
    if job is None:
        return False
    job.heartbeat_at = now
    if progress is not None:
        job.progress = dict(progress)
    session.flush()
    return True


def finish(
    session: Session,
    job_id: int,
    metrics: dict[str, Any],
    *,
    worker_id: str | None = None,
    progress: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Job:
    """Mark a running job succeeded with its final metrics (and final progress, if given).

    Conflict when it was cancelled meanwhile, or, given `worker_id`, when another worker has
    taken it over: the caller then discards its result.
    """
    job = get(session, job_id)
    if worker_id is not None and job.state is JobState.running and job.worker_id != worker_id:
        raise Conflict(f"job {job_id} is now run by {job.worker_id}, not {worker_id}")
    _move(job, JobState.succeeded)
    job.metrics = dict(metrics)
    if progress is not None:
        job.progress = dict(progress)
    job.error = None
    job.finished_at = now or datetime.now(UTC)
    session.flush()
    return job


def fail(
    session: Session,
    job_id: int,
    error: str,
    *,
    retryable: bool = False,
    worker_id: str | None = None,
    now: datetime | None = None,
) -> Job:
    """Record a failed attempt: requeue while attempts remain and the error is retryable.

    A failure that will fail again the same way (bad params, not enough data) is final at
    once; a crash that may be transient (out of memory, a lost connection) gets another try.
    A job already cancelled stays cancelled, with the error kept for the record; given
    `worker_id`, a job another worker has taken over meanwhile is left alone.
    """
    job = get(session, job_id)
    if worker_id is not None and (job.state is not JobState.running or job.worker_id != worker_id):
        if job.state is JobState.cancelled and job.worker_id == worker_id:
            job.error = error[-MAX_ERROR_CHARS:]
        return job
    job.error = error[-MAX_ERROR_CHARS:]
    if job.state is JobState.cancelled:
        return job
    job.attempts += 1
    if retryable and job.attempts < job.max_attempts:
        _move(job, JobState.queued)
        job.worker_id = None
        job.progress = interrupted_progress(job.progress, f"attempt {job.attempts} failed")
    else:
        _move(job, JobState.failed)
        job.finished_at = now or datetime.now(UTC)
        if job.kind != WEBHOOK and job.project_id is not None:
            # Deferred import: webhooks queues its deliveries through this module.
            from app.services import webhooks

            webhooks.emit(
                session,
                job.project_id,
                "job.failed",
                {"job_id": job.id, "kind": job.kind, "error": job.error},
            )
    session.flush()
    return job


def requeue(
    session: Session, job_id: int, worker_id: str, *, progress: dict[str, Any] | None = None
) -> Job | None:
    """Give a running job back to the queue without counting an attempt (a worker shutting down).

    `progress` is the worker's latest (the row's is as old as the last heartbeat); the row
    keeps how far it got, as `interrupted`. Returns None when the job was no longer this
    worker's (cancelled or taken over meanwhile).
    """
    job = _owned(session, job_id, worker_id)
    if job is None:
        return None
    _move(job, JobState.queued)
    job.worker_id = None
    last = progress if progress is not None else job.progress
    job.progress = interrupted_progress(last, "worker stopped")
    session.flush()
    return job


def interrupted_progress(progress: dict[str, Any] | None, reason: str) -> dict[str, Any]:
    """A requeued job's progress: why it went back and how far the stopped run got
    (`interrupted`), without the step, loss and ETA keys a running job shows — nothing runs
    it until a worker claims it again, which starts the progress afresh."""
    last = progress or {}
    kept = {k: last[k] for k in ("stage", "model", "step", "total_steps") if k in last}
    return {"requeued": reason, **({"interrupted": kept} if kept else {})}


def requeue_stale(session: Session, now: datetime, stale_after_s: float) -> list[Job]:
    """Running jobs whose worker stopped heartbeating go back to the queue, or fail for good.

    A vanished worker counts as a failed attempt, so a job that kills its worker every time
    (out of memory, say) ends up failed after `max_attempts` instead of looping forever.
    """
    cutoff = now - timedelta(seconds=stale_after_s)
    stmt = select(Job).where(
        Job.state == JobState.running,
        func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at) < cutoff,
    )
    stale = list(session.scalars(_for_update(stmt.order_by(Job.id), session)))
    for job in stale:
        seen = job.heartbeat_at.isoformat() if job.heartbeat_at else "never"
        fail(
            session,
            job.id,
            f"worker {job.worker_id} stopped heartbeating (last heartbeat {seen})",
            retryable=True,
            now=now,
        )
    return stale


def cancel(session: Session, job_id: int, *, now: datetime | None = None) -> Job:
    """Stop a job: a queued one never runs; a running one's worker stops at its next heartbeat."""
    job = get(session, job_id)
    _move(job, JobState.cancelled)
    job.finished_at = now or datetime.now(UTC)
    session.flush()
    return job


def judgments_since_last_reward(session: Session, project_id: int) -> int:
    """Judgments the project's newest reward model did not train on, made after its newest
    reward job was queued.

    The model's baseline is its data cut-off (`config["data"]["max_judgment_id"]`, recorded
    by the worker), not its creation time: judgments that came in while it trained are not
    in it, so they count toward the next retrain. A model without that record (registered
    by hand) falls back to its creation time. Failed and cancelled jobs count as a baseline
    too: retrying a failing job on every poll would loop, so the next try waits for N more
    judgments.
    """
    stmt = select(func.count()).select_from(Judgment).where(Judgment.project_id == project_id)
    last_job = session.scalar(
        select(func.max(Job.created_at)).where(Job.project_id == project_id, Job.kind == REWARD)
    )
    if last_job is not None:
        stmt = stmt.where(Judgment.created_at > last_job)
    model = session.scalar(
        select(ModelVersion)
        .where(ModelVersion.project_id == project_id, ModelVersion.kind == ModelKind.reward)
        .order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())
        .limit(1)
    )
    if model is not None:
        data = (model.config or {}).get("data")
        cutoff = data.get("max_judgment_id") if isinstance(data, dict) else None
        if isinstance(cutoff, int) and not isinstance(cutoff, bool):
            stmt = stmt.where(Judgment.id > cutoff)
        else:
            stmt = stmt.where(Judgment.created_at > model.created_at)
    return int(session.scalar(stmt) or 0)


def reward_threshold(project: Project) -> int | None:
    """The project's "retrain after N new judgments" setting, when set to a positive integer."""
    value = (project.settings or {}).get(AUTO_REWARD_SETTING)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def maybe_schedule_reward(session: Session, project_id: int) -> Job | None:
    """Enqueue a reward job when the project asks for one every N judgments and N have come in."""
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id}")
    threshold = reward_threshold(project)
    if threshold is None or active_job(session, project_id, REWARD) is not None:
        return None
    if judgments_since_last_reward(session, project_id) < threshold:
        return None
    try:
        return enqueue_internal(session, project_id, REWARD, {"trigger": "auto"})
    except Conflict:
        return None  # another worker scheduled it between our check and our lock


def scheduled_projects(session: Session) -> list[int]:
    """Projects with the auto-retrain setting; few enough to filter in Python on any backend."""
    rows = session.execute(select(Project.id, Project.settings).order_by(Project.id))
    return [pid for pid, cfg in rows if (cfg or {}).get(AUTO_REWARD_SETTING)]


def overview(session: Session, project_id: int, *, limit: int = 100) -> tuple[Project, list[Job]]:
    """A project and its jobs, newest first: what the project's jobs page shows."""
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id}")
    return project, list_for_project(session, project_id, limit=limit)


def eta_text(progress: dict[str, Any]) -> str:
    """A human ETA ("3 min 20 s") from the progress dict's `eta_s`, empty when unknown."""
    eta = progress.get("eta_s")
    if isinstance(eta, bool) or not isinstance(eta, int | float) or eta < 0:
        return ""
    seconds = int(round(eta))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
