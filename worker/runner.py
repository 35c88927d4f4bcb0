"""Runs one claimed job of each kind: read its data, train, register the result, finish it.

The worker loop (worker/main.py) owns the queue side — claiming, heartbeats, failing and
requeueing. This module owns what a job *does*. Each kind ends the same way: the artifact is
written atomically by the trainer, then one transaction registers the model version and marks
the job succeeded, so a model version exists exactly when its job succeeded, and an artifact
whose transaction failed is removed again.

Progress flows out through `report` (the worker's heartbeat thread writes the latest dict to
the job row); `should_stop` is polled after every optimizer step and turns a shutdown signal,
a cancel, or a lost claim into `Interrupted`, which the trainer lets propagate without saving.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db import read_only, transaction
from app.models import Job, ModelKind
from app.services import jobs, model_registry, training_data
from app.settings import Settings

Report = Callable[[dict[str, Any]], None]
ShouldStop = Callable[[], bool]

RUNNER_PARAMS = {
    "trigger": "who asked for the job (auto = the every-N-judgments schedule)",
    "fail_after_step": "fault injection: raise after this optimizer step (crash-safety tests)",
}
"""Job params the runner reads itself; every other reward param must be a RewardConfig field."""


class Interrupted(Exception):
    """Training stopped between steps because the worker was told to stop."""


class JobError(Exception):
    """A failure that will repeat on retry (bad params, no data): the job fails at once."""


@dataclass(frozen=True)
class JobSpec:
    """What the runner needs of a claimed job, copied out of the claiming transaction."""

    id: int
    kind: str
    project_id: int | None
    params: dict[str, Any]
    worker_id: str

    @classmethod
    def of(cls, job: Job) -> JobSpec:
        return cls(
            id=job.id,
            kind=job.kind,
            project_id=job.project_id,
            params=dict(job.params or {}),
            worker_id=job.worker_id or "",
        )


def json_safe(value: Any) -> Any:
    """NaN and infinities become None: Postgres JSON (and strict JSON clients) reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def artifact_dir(settings: Settings, kind: str, job_id: int) -> Path:
    return Path(settings.artifact_dir) / "models" / f"{kind}-{job_id}"


def run(
    settings: Settings,
    factory: sessionmaker[Session],
    job: JobSpec,
    *,
    report: Report,
    should_stop: ShouldStop,
) -> dict[str, Any]:
    """Run `job` to completion and mark it succeeded; returns its final metrics.

    Raises `Interrupted` when `should_stop` turned true mid-run, `JobError` for failures a
    retry will not fix, and anything else for failures that might be transient.
    """
    if job.kind == jobs.REWARD:
        return run_reward(settings, factory, job, report=report, should_stop=should_stop)
    if job.kind in (jobs.PPO, jobs.GENERATE):
        raise JobError(f"{job.kind} jobs are not implemented yet")
    raise JobError(f"unknown job kind {job.kind!r}")


def _check_type(name: str, value: Any, default: Any) -> Any:
    """Coerce a JSON param to the type of the config field's default, or say what is wrong."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise JobError(f"parameter {name!r} must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobError(f"parameter {name!r} must be an integer, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JobError(f"parameter {name!r} must be a number, not {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise JobError(f"parameter {name!r} must be a string, not {value!r}")
    return value


def reward_config(params: dict[str, Any], settings: Settings) -> Any:
    """A `RewardConfig` from job params: unknown names and wrong types fail the job up front."""
    from worker.reward import RewardConfig

    fields = {f.name: f for f in dataclasses.fields(RewardConfig)}
    unknown = sorted(set(params) - set(fields) - set(RUNNER_PARAMS))
    if unknown:
        raise JobError(
            f"unknown reward parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    values = {
        name: _check_type(name, params[name], fields[name].default)
        for name in fields
        if name in params
    }
    values.setdefault("cache_dir", str(Path(settings.artifact_dir) / "cache"))
    try:
        return RewardConfig(**values)
    except (TypeError, ValueError) as exc:
        raise JobError(f"invalid reward parameters: {exc}") from exc


def load_groups(
    factory: sessionmaker[Session], project_id: int
) -> tuple[list[Any], dict[str, Any]]:
    """The project's judgments up to the newest one now, as PreferenceGroups, plus a record
    of the cut-off (stored with the model so the run can be reproduced)."""
    from worker.reward import PreferenceGroup

    with transaction(factory) as session:
        read_only(session)  # SQLite: a long read must not hold the write lock over labeling
        cutoff = training_data.max_judgment_id(session, project_id)
        rows = list(training_data.preference_groups(session, project_id, max_judgment_id=cutoff))
    try:
        groups = [PreferenceGroup(**{**row, "prompt_id": str(row["prompt_id"])}) for row in rows]
    except ValueError as exc:
        raise JobError(f"a judgment cannot be used for training: {exc}") from exc
    data = {
        "project_id": project_id,
        "max_judgment_id": cutoff,
        "judgments": len(groups),
        "prompts": len({g.prompt_id for g in groups}),
    }
    return groups, data


def run_reward(
    settings: Settings,
    factory: sessionmaker[Session],
    job: JobSpec,
    *,
    report: Report,
    should_stop: ShouldStop,
) -> dict[str, Any]:
    """Train a reward model on the project's judgments and register it as a model version."""
    from worker.reward import train_reward

    if job.project_id is None:
        raise JobError("a reward job needs a project")
    config = reward_config(job.params, settings)
    fail_after = job.params.get("fail_after_step")
    groups, data = load_groups(factory, job.project_id)
    if not any(len(g.ranking) > 1 for g in groups):
        raise JobError(f"project {job.project_id} has no judgments with a preference to train on")
    report({"stage": "training", "data": data})

    out_dir = artifact_dir(settings, "reward", job.id)
    if out_dir.exists():
        # Left by an attempt that died between saving and registering: never registered
        # (registration and success commit together), so nothing points at it.
        shutil.rmtree(out_dir)

    last: dict[str, Any] = {}

    def on_progress(progress: dict[str, Any]) -> None:
        last.update(json_safe({**progress, "stage": "training", "data": data}))
        report(dict(last))
        if isinstance(fail_after, int) and progress["step"] >= fail_after:
            raise RuntimeError(f"injected failure after step {progress['step']} (fail_after_step)")
        if should_stop():
            raise Interrupted(f"stopped after step {progress['step']} of {progress['total_steps']}")

    try:
        metrics = train_reward(config, groups, out_dir, on_progress=on_progress)
    except ValueError as exc:  # the trainer's verdict on the data or config
        raise JobError(str(exc)) from exc
    metrics = json_safe({**metrics, "data": data})
    report({"stage": "registering"})
    try:
        with transaction(factory) as session:
            model = model_registry.register(
                session,
                kind=ModelKind.reward,
                artifact_path=out_dir,
                project_id=job.project_id,
                job_id=job.id,
                config=json_safe({**dataclasses.asdict(config), "data": data}),
                metrics=metrics,
            )
            jobs.finish(
                session,
                job.id,
                {**metrics, "model_version_id": model.id},
                worker_id=job.worker_id,
                progress={**last, "stage": "done", "eta_s": 0.0},
            )
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return {**metrics, "model_version_id": model.id}
