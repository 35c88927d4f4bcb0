"""Runs one claimed job of each kind: read its data, train or sample, record it, finish it.

The worker loop (worker/main.py) owns the queue side — claiming, heartbeats, failing and
requeueing. This module owns what a job *does*:
  reward    train a reward model on the project's judgments (with `heldout_split`, a second
            one on other prompts, the held-out partner that guards PPO);
  ppo       optimise a policy against a reward model, keep the best checkpoint;
  generate  sample completions from a policy and queue them for labeling.
Each kind ends the same way: the artifact is written atomically, then one transaction
registers the model version (generate: stores the completions and tasks), marks the job
succeeded and enqueues the loop's next job if the project asks for it
(app.services.chaining). So a model version exists exactly when its job succeeded, and an
artifact whose transaction failed is removed again.

Progress flows out through `report` (the worker's heartbeat thread writes the latest dict to
the job row); `should_stop` is polled after every optimizer step and turns a shutdown signal,
a cancel, or a lost claim into `Interrupted`. On a shutdown (`should_save`) a reward job first
saves where it is, and its next attempt continues from there (run_reward); PPO and generate
jobs start over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db import read_only, transaction
from app.domain import job_params
from app.errors import DomainError, NotFound
from app.models import Job, ModelKind, ModelVersion
from app.services import (
    chaining,
    generation,
    jobs,
    model_registry,
    predictions,
    projects,
    snapshots,
    training_data,
)
from app.settings import Settings
from worker import predict
from worker.stopping import Interrupted

Report = Callable[[dict[str, Any]], None]
ShouldStop = Callable[[], bool]

# What each kind's params may say (the configs, the names the runner reads itself, the ranges)
# is decided in app.domain.job_params, which the web app checks new jobs with too.
RUNNER_PARAMS = job_params.RUNNER_PARAMS
REWARD_RUNNER_PARAMS = job_params.REWARD_RUNNER_PARAMS
GENERATE_RUNNER_PARAMS = job_params.GENERATE_RUNNER_PARAMS
PPO_RUNNER_PARAMS = job_params.PPO_RUNNER_PARAMS


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


def artifact_dir(settings: Settings, kind: str, job_id: int | str) -> Path:
    return Path(settings.artifact_dir) / "models" / f"{kind}-{job_id}"


def work_dir(settings: Settings, kind: str, job_id: int) -> Path:
    """Scratch space of a running job (PPO's checkpoints before the best one is kept)."""
    return Path(settings.artifact_dir) / "work" / f"{kind}-{job_id}"


def cache_dir(settings: Settings) -> Path:
    """Where the packaged SmolLM2 is converted to safetensors, once per artifact directory."""
    return Path(settings.artifact_dir) / "cache"


def run(
    settings: Settings,
    factory: sessionmaker[Session],
    job: JobSpec,
    *,
    report: Report,
    should_stop: ShouldStop,
    should_save: ShouldStop | None = None,
) -> dict[str, Any]:
    """Run `job` to completion and mark it succeeded; returns its final metrics.

    Raises `Interrupted` when `should_stop` turned true mid-run, `JobError` for failures a
    retry will not fix, and anything else for failures that might be transient. When
    `should_save` is true at that point (the worker is shutting down, the job stays ours), a
    reward job first leaves a resume checkpoint that its next attempt continues from.
    """
    kinds = {jobs.REWARD: run_reward, jobs.GENERATE: run_generate, jobs.PPO: run_ppo}
    if job.kind not in kinds:
        raise JobError(f"unknown job kind {job.kind!r}")
    if job.project_id is None:
        raise JobError(f"a {job.kind} job needs a project")
    if job.kind == jobs.REWARD:
        return run_reward(
            settings,
            factory,
            job,
            report=report,
            should_stop=should_stop,
            should_save=should_save or (lambda: False),
        )
    return kinds[job.kind](settings, factory, job, report=report, should_stop=should_stop)


# --- params -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _params_error() -> Iterator[None]:
    """A params check's complaint as a JobError: bad params fail the job once, unretried."""
    try:
        yield
    except job_params.InvalidParams as exc:
        raise JobError(str(exc)) from exc


def config_values(
    cls: type, params: dict[str, Any], own: Iterable[str], what: str
) -> dict[str, Any]:
    """The params that are fields of the config dataclass `cls`, type-checked; unknown names
    fail the job up front (job_params.config_values)."""
    with _params_error():
        return job_params.config_values(cls, params, own, what)


def _build(cls: type, values: dict[str, Any], what: str) -> Any:
    """`cls(**values)`; its range checks' ValueError fails the job without a retry."""
    with _params_error():
        return job_params.build(cls, values, what)


def reward_config(params: dict[str, Any], settings: Settings) -> Any:
    """A `RewardConfig` from job params, checked before any data or weights load: unknown
    names, wrong types, out-of-range values, a backbone that does not exist or reads fewer
    than max_length tokens all fail the job at once."""
    from worker.models import check_backbone
    from worker.reward import RewardConfig

    values = config_values(RewardConfig, params, REWARD_RUNNER_PARAMS, "reward")
    values.setdefault("cache_dir", str(cache_dir(settings)))
    config = _build(RewardConfig, values, "reward")
    try:
        where = Path(config.cache_dir) if config.cache_dir else None
        check_backbone(config.backbone, config.max_length, cache_dir=where)
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    return config


def _int_param(params: dict[str, Any], name: str, *, minimum: int = 1) -> int | None:
    with _params_error():
        return job_params.int_param(params, name, minimum=minimum)


def _device(params: dict[str, Any], cuda_available: bool) -> str:
    """The `device` param: "auto" (the default) is cuda when there is one, else cpu."""
    with _params_error():
        value = job_params.device_param(params, jobs.GENERATE)
    if value == "auto":
        return "cuda" if cuda_available else "cpu"
    return value


def _selection(params: dict[str, Any], default: str) -> generation.Selection:
    try:
        return generation.parse_selection(params.get("prompts", default))
    except DomainError as exc:
        raise JobError(str(exc)) from exc


def _describe(selection: generation.Selection) -> str:
    return selection if isinstance(selection, str) else f"{len(selection)} listed prompt ids"


# --- reward -------------------------------------------------------------------------------------


def load_groups(
    factory: sessionmaker[Session], project_id: int, *, snapshot_id: int | None
) -> tuple[list[Any], dict[str, Any]]:
    """The judgments of a snapshot of the project as PreferenceGroups, plus a record of the
    data (stored with the model so the run can be reproduced). Without `snapshot_id`, a new
    snapshot of every judgment is taken first (committed, so it stays a dataset version
    whatever happens to the job)."""
    from worker.reward import PreferenceGroup

    if snapshot_id is None:
        with transaction(factory) as session:
            snapshot_id = snapshots.create(session, project_id, {}, created_by=None).id
    with transaction(factory) as session:
        read_only(session)  # SQLite: a long read must not hold the write lock over labeling
        try:
            owner, cutoff, ids = training_data.snapshot_judgments(session, snapshot_id)
        except NotFound as exc:
            raise JobError(str(exc)) from exc
        if owner != project_id:
            raise JobError(f"snapshot {snapshot_id} belongs to project {owner}, not {project_id}")
        rows = list(
            training_data.preference_groups(
                session, project_id, max_judgment_id=cutoff, judgment_ids=ids
            )
        )
    try:
        groups = [PreferenceGroup(**{**row, "prompt_id": str(row["prompt_id"])}) for row in rows]
    except ValueError as exc:
        raise JobError(f"a judgment cannot be used for training: {exc}") from exc
    return groups, _data_record(project_id, cutoff, groups, snapshot_id)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object written by _write_json, or {} when there is none (or it is unreadable)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old file, the new one, or none, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(value), encoding="utf-8")
    os.replace(tmp, path)


def _data_record(
    project_id: int, cutoff: int, groups: list[Any], snapshot_id: int | None = None
) -> dict[str, Any]:
    return {
        "project_id": project_id,
        "snapshot_id": snapshot_id,
        "max_judgment_id": cutoff,
        "judgments": len(groups),
        "prompts": len({g.prompt_id for g in groups}),
    }


def _has_preference(groups: list[Any]) -> bool:
    return any(len(g.ranking) > 1 for g in groups)


@dataclass(frozen=True)
class RewardPart:
    """One reward model a reward job trains: the main one, or its held-out partner."""

    role: str  # "main" | "heldout"
    groups: list[Any]
    data: dict[str, Any]
    out_dir: Path
    untrained_prompts: list[int]  # judged prompts it never trained on (eval split, other half)


def _reward_parts(
    groups: list[Any], data: dict[str, Any], config: Any, params: dict[str, Any], out_dir: Path
) -> list[RewardPart]:
    """The main model's data, plus the held-out partner's with `heldout_split`.

    The split is by prompt and seeded (worker.reward.split_by_prompt), so the two models never
    see the same prompt: the partner's scores of a PPO rollout are an independent opinion,
    which is what lets the over-optimisation guard notice the main model being gamed.
    """
    from worker.reward import split_by_prompt

    with _params_error():
        split, fraction = job_params.heldout_params(params)

    def untrained(own: list[Any], others: list[Any]) -> list[int]:
        # The same call train_reward makes to hold out its evaluation prompts.
        _, evaluation = split_by_prompt(own, config.eval_fraction, config.seed)
        return sorted({int(g.prompt_id) for g in (*evaluation, *others)})

    if not split:
        return [RewardPart("main", groups, data, out_dir, untrained(groups, []))]
    main, partner = split_by_prompt(groups, fraction, config.seed)
    if not (_has_preference(main) and _has_preference(partner)):
        raise JobError(
            "too few judged prompts to train two reward models on separate prompts "
            f"({data['prompts']} prompts); train without heldout_split"
        )
    cutoff, snapshot = data["max_judgment_id"], data["snapshot_id"]
    return [
        RewardPart(
            "main",
            main,
            {**_data_record(data["project_id"], cutoff, main, snapshot), "split": 1 - fraction},
            out_dir,
            untrained(main, partner),
        ),
        RewardPart(
            "heldout",
            partner,
            {**_data_record(data["project_id"], cutoff, partner, snapshot), "split": fraction},
            out_dir.with_name(f"{out_dir.name}-heldout"),
            untrained(partner, main),
        ),
    ]


def _chain_and_finish(
    session: Session,
    job: JobSpec,
    model_version_id: int,
    final: dict[str, Any],
    last: dict[str, Any],
) -> None:
    """In the transaction that registered `model_version_id`: enqueue the loop's next job
    (its id goes into `final` as next_job_id) and mark `job` succeeded with `final`."""
    assert job.project_id is not None
    chained = chaining.after_success(
        session,
        kind=job.kind,
        project_id=job.project_id,
        model_version_id=model_version_id,
        job_id=job.id,
    )
    if chained is not None:
        final["next_job_id"] = chained.id
    jobs.finish(
        session,
        job.id,
        final,
        worker_id=job.worker_id,
        progress={**last, "stage": "done", "eta_s": 0.0},
    )


def run_reward(
    settings: Settings,
    factory: sessionmaker[Session],
    job: JobSpec,
    *,
    report: Report,
    should_stop: ShouldStop,
    should_save: ShouldStop = lambda: False,
) -> dict[str, Any]:
    """Train a reward model on the project's judgments and register it as a model version;
    with `heldout_split`, a held-out partner too (registered with role "heldout").

    Stopped with `should_save` true (the worker shutting down), the job leaves its state in
    its work directory: the snapshot it trains on (`data.json`), each finished part's
    metrics beside its saved model, and the running part's resume checkpoint. The next
    attempt reads the same judgments, keeps the finished parts and continues the running one
    from its last step (worker.reward.ResumeState). Any other end removes the work directory.
    """
    from worker.reward import train_reward

    assert job.project_id is not None
    config = reward_config(job.params, settings)
    fail_after = job.params.get("fail_after_step")
    work = work_dir(settings, "reward", job.id)
    # a resumed attempt reads the snapshot its first attempt took
    snapshot_id = _read_json(work / "data.json").get("snapshot_id") or job.params.get("snapshot_id")
    groups, data = load_groups(factory, job.project_id, snapshot_id=snapshot_id)
    if not _has_preference(groups):
        raise JobError(f"project {job.project_id} has no judgments with a preference to train on")
    parts = _reward_parts(
        groups, data, config, job.params, artifact_dir(settings, "reward", job.id)
    )
    finished: dict[str, dict[str, Any]] = {}
    for part in parts:
        done = _read_json(work / part.role / "done.json")
        if part.out_dir.exists() and done:
            finished[part.role] = done  # trained by an attempt that was stopped after it
        elif part.out_dir.exists():
            # Left by an attempt that died between saving and registering: never registered
            # (registration and success commit together), so nothing points at it.
            shutil.rmtree(part.out_dir)
    _write_json(work / "data.json", {"snapshot_id": data["snapshot_id"]})

    last: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    try:
        for part in parts:
            if part.role in finished:
                results.append(finished[part.role])
                continue
            extra = {"data": part.data, "model": part.role}
            report({"stage": "training", **extra})

            def on_progress(progress: dict[str, Any], extra: dict[str, Any] = extra) -> None:
                last.update(json_safe({**progress, "stage": "training", **extra}))
                report(dict(last))
                if isinstance(fail_after, int) and progress["step"] >= fail_after:
                    raise RuntimeError(
                        f"injected failure after step {progress['step']} (fail_after_step)"
                    )
                if should_stop():
                    raise Interrupted(
                        f"stopped after step {progress['step']} of {progress['total_steps']}",
                        save=should_save(),
                    )

            try:
                metrics = train_reward(
                    config,
                    part.groups,
                    part.out_dir,
                    on_progress=on_progress,
                    resume_dir=work / part.role,
                )
            except ValueError as exc:  # the trainer's verdict on the data or config
                raise JobError(str(exc)) from exc
            results.append(json_safe({**metrics, "data": part.data}))
            _write_json(work / part.role / "done.json", results[-1])

        # --- model in the loop (worker/predict.py): score the open tasks with the new models
        # while the job still runs; stored after it succeeded, never failing it.
        scoring = predict.for_reward(
            factory,
            job.project_id,
            [predict.ScoringModel(part.role, str(part.out_dir)) for part in parts],
            report=report,
            should_stop=should_stop,
        )
        # --- end model in the loop

        report({"stage": "registering"})
        with transaction(factory) as session:
            models: list[ModelVersion] = []
            for part, metrics in zip(parts, results, strict=True):
                role = {"role": "heldout", "pair_of": models[0].id} if models else {}
                models.append(
                    model_registry.register(
                        session,
                        kind=ModelKind.reward,
                        artifact_path=part.out_dir,
                        project_id=job.project_id,
                        job_id=job.id,
                        snapshot_id=part.data["snapshot_id"],
                        config=json_safe(
                            {
                                **dataclasses.asdict(config),
                                "data": part.data,
                                "heldout_prompt_ids": part.untrained_prompts,
                                **role,
                            }
                        ),
                        metrics=metrics,
                    )
                )
            final = {**results[0], "model_version_id": models[0].id}
            if len(models) > 1:
                heldout = results[1]
                final["heldout_model"] = {
                    "model_version_id": models[1].id,
                    "eval": heldout.get("eval", {}),
                    "data": heldout["data"],
                }
                final["heldout_model_version_id"] = models[1].id
            final[predictions.METRICS_KEY] = json_safe(scoring.summary)  # model in the loop
            _chain_and_finish(session, job, models[0].id, final, last)
    except Interrupted as stop:
        if not stop.save:  # cancelled or taken over: nothing of this attempt is kept
            for part in parts:
                shutil.rmtree(part.out_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        for part in parts:
            shutil.rmtree(part.out_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    # --- model in the loop: the job has succeeded; store the scores, replace the predictions
    predict.store(
        factory,
        job.id,
        job.project_id,
        scoring,
        {part.role: model.id for part, model in zip(parts, models, strict=True)},
    )
    # --- end model in the loop
    return final


# --- generate -----------------------------------------------------------------------------------


def run_generate(
    settings: Settings,
    factory: sessionmaker[Session],
    job: JobSpec,
    *,
    report: Report,
    should_stop: ShouldStop,
) -> dict[str, Any]:
    """Sample completions from a policy for the selected prompts, store the new ones and
    create their labeling tasks (app.services.generation), and finish the job — the last
    two in one transaction, so a retried job never stores twice."""
    import torch

    from worker.generate import GenerateConfig, load_policy, sample_completions

    assert job.project_id is not None
    values = config_values(GenerateConfig, job.params, GENERATE_RUNNER_PARAMS, "generate")
    policy_id = _int_param(job.params, "policy_id")
    limit = _int_param(job.params, "limit")
    selection = _selection(job.params, generation.WAITING)
    with transaction(factory) as session:
        read_only(session)
        project = projects.get(session, job.project_id)
        values.setdefault("n", project.candidates_per_task)
        values.setdefault("seed", job.id)  # reproducible from the job record, new per job
        policy = (
            generation.policy(session, policy_id, project_id=job.project_id)
            if policy_id is not None
            else None
        )
        reward_model = None
        if policy is not None and policy.reward_model_id is not None:
            reward_model = session.get(ModelVersion, policy.reward_model_id)
        if reward_model is None:
            reward_model = chaining.main_reward_model(session, job.project_id)
        prompts = generation.select_prompts(
            session, job.project_id, selection, limit=limit, reward_model=reward_model
        )
    config = _build(GenerateConfig, values, "generate")
    if not prompts:
        raise JobError(f"no prompts to generate for (prompts={_describe(selection)})")
    source = generation.source_for(policy_id)
    parent_source = None
    if policy is not None:
        parent_source = generation.source_for(policy.parent_id)

    report({"stage": "loading", "step": 0, "total_steps": len(prompts)})
    device = _device(job.params, torch.cuda.is_available())
    model, tokenizer = load_policy(
        policy.path if policy else None, cache_dir(settings), device=device
    )
    start = time.perf_counter()
    last: dict[str, Any] = {}

    def on_progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        last.update(
            {
                "stage": "generating",
                "step": done // config.n,  # samples are generated prompt by prompt
                "total_steps": len(prompts),
                "samples_done": done,
                "samples_total": total,
                "eta_s": elapsed / done * (total - done) if done else None,
            }
        )
        report(dict(last))
        if should_stop():
            raise Interrupted(f"stopped after {done} of {total} samples")

    result = sample_completions(
        model, tokenizer, [p.prompt for p in prompts], config, on_progress=on_progress
    )
    samples = {p.id: texts for p, texts in zip(prompts, result.completions, strict=True)}
    # --- model in the loop (worker/predict.py): score the samples with the project's reward
    # models (and the policy's own) while the job still runs; stored after it succeeded.
    del model  # the policy is done with: free its memory before loading the scorers
    scoring = predict.for_generate(
        factory,
        job.project_id,
        samples,
        policy.reward_model_id if policy is not None else None,
        report=report,
        should_stop=should_stop,
    )
    # --- end model in the loop
    report({"stage": "storing"})
    metadata = {
        "job_id": job.id,
        "seed": config.seed,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
    }
    with transaction(factory) as session:
        stored = generation.store(
            session,
            job.project_id,
            samples,
            source=source,
            model_version_id=policy_id,
            metadata=metadata,
            rng=random.Random(config.seed),
            max_pairs=settings.max_pairs_per_prompt,
            parent_source=parent_source,
        )
        metrics = {
            "policy_id": policy_id,
            "source": source,
            "prompts": len(prompts),
            "selection": _describe(selection),
            "samples": len(prompts) * config.n,
            "completions_stored": stored.completions_stored,
            "duplicates_dropped": result.dropped_duplicates + stored.existing_duplicates,
            "sampled_duplicates": result.dropped_duplicates,
            "existing_duplicates": stored.existing_duplicates,
            "empty_dropped": result.dropped_empty,
            "missing_eos": result.missing_eos,
            "tasks_created": stored.tasks_created,
            "generate_time_s": time.perf_counter() - start,
            "config": dataclasses.asdict(config),
            predictions.METRICS_KEY: scoring.summary,  # model in the loop
        }
        jobs.finish(
            session,
            job.id,
            json_safe(metrics),
            worker_id=job.worker_id,
            progress={**last, "stage": "done", "step": len(prompts), "eta_s": 0.0},
        )
    predict.store(factory, job.id, job.project_id, scoring)  # model in the loop
    return metrics


# --- ppo ----------------------------------------------------------------------------------------


def guard_config(params: dict[str, Any], has_heldout: bool) -> Any:
    """The over-optimisation guard's config, or None for no guard.

    `guard: false` turns it off; `true` or a dict of GuardConfig fields turns it on; left
    out, it is on exactly when a held-out reward model scores the rollouts (without one, the
    "best" step would be the luckiest batch of the training reward).
    """
    with _params_error():
        return job_params.guard_config(params.get("guard"), has_heldout)


def run_ppo(
    settings: Settings,
    factory: sessionmaker[Session],
    job: JobSpec,
    *,
    report: Report,
    should_stop: ShouldStop,
) -> dict[str, Any]:
    """Optimise a policy against a reward model with PPO and register the best checkpoint.

    Checkpoints go to a scratch directory; the one the guard calls best (the last step
    without a guard) is renamed to models/policy-<job id> and registered with its lineage
    (parent policy, reward model, the reward model's snapshot) in the transaction that
    finishes the job.
    """
    from accelerate import Accelerator

    from worker.generate import DEFAULT_POLICY, load_policy
    from worker.guard import OverOptimizationGuard
    from worker.ppo import PPOConfig, SequenceClassifierReward, train_ppo

    assert job.project_id is not None
    config = _build(
        PPOConfig, config_values(PPOConfig, job.params, PPO_RUNNER_PARAMS, "ppo"), "ppo"
    )
    fail_after = job.params.get("fail_after_step")
    selection = _selection(job.params, generation.ALL)
    limit = _int_param(job.params, "limit")
    if job.params.get("device", "auto") not in ("auto", "cpu"):
        raise JobError("parameter 'device' of a ppo job must be auto or cpu (accelerate decides)")
    on_cpu = job.params.get("device") == "cpu"
    with transaction(factory) as session:
        read_only(session)
        inputs = chaining.ppo_inputs(
            session,
            job.project_id,
            reward_model_id=_int_param(job.params, "reward_model_id"),
            parent_policy_id=_int_param(job.params, "parent_policy_id"),
            heldout_reward_model_id=_int_param(job.params, "heldout_reward_model_id"),
            use_heldout=job.params.get("guard") is not False,
        )
        prompts = generation.select_prompts(
            session,
            job.project_id,
            selection,
            limit=limit,
            reward_model=session.get(ModelVersion, inputs.reward.id),
        )
    guard_cfg = guard_config(job.params, inputs.heldout is not None)
    if not prompts:
        raise JobError(f"no prompts to train on (prompts={_describe(selection)})")
    lineage = {
        "job_id": job.id,
        "reward_model_id": inputs.reward.id,
        "heldout_reward_model_id": inputs.heldout.id if inputs.heldout else None,
        "parent_id": inputs.parent.id if inputs.parent else None,
        "snapshot_id": inputs.reward.snapshot_id,
    }

    scratch, out_dir = work_dir(settings, "ppo", job.id), artifact_dir(settings, "policy", job.id)
    for leftover in (scratch, out_dir):  # an earlier attempt's, never registered
        shutil.rmtree(leftover, ignore_errors=True)
    report({"stage": "loading", **lineage})
    accelerator = Accelerator(cpu=on_cpu)
    policy, tokenizer = load_policy(
        inputs.parent.path if inputs.parent else None, cache_dir(settings), device="cpu"
    )
    reward_fn = SequenceClassifierReward.load(inputs.reward.path, accelerator.device)
    heldout_fn = (
        SequenceClassifierReward.load(inputs.heldout.path, accelerator.device)
        if inputs.heldout
        else None
    )
    last: dict[str, Any] = {}

    def on_progress(progress: dict[str, Any]) -> None:
        last.update(json_safe({**progress, "stage": "training"}))
        report(dict(last))
        if isinstance(fail_after, int) and progress["step"] >= fail_after:
            raise RuntimeError(f"injected failure after step {progress['step']} (fail_after_step)")
        if should_stop():
            raise Interrupted(f"stopped after step {progress['step']} of {progress['total_steps']}")

    try:
        try:
            result = train_ppo(
                config,
                policy,
                tokenizer,
                reward_fn,
                [p.prompt for p in prompts],
                heldout_reward_fn=heldout_fn,
                guard=OverOptimizationGuard(guard_cfg) if guard_cfg is not None else None,
                on_progress=on_progress,
                accelerator=accelerator,
                out_dir=scratch,
                metadata={"lineage": lineage},
            )
        except ValueError as exc:  # the trainer's verdict on the prompts or config
            raise JobError(str(exc)) from exc
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(result["best_checkpoint"], out_dir)  # atomic: the kept checkpoint appears whole
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    history = result["history"]
    best = next((h for h in history if h["step"] == result["best_step"]), history[-1])
    metrics = json_safe(
        {
            **{k: best[k] for k in ("reward_mean", "heldout_reward_mean", "kl") if k in best},
            "best_step": result["best_step"],
            "steps": result["steps"],
            "total_steps": config.total_steps,
            "stopped_early": result["stopped_early"],
            "stop_reason": result["stop_reason"],
            "train_time_s": result["train_time_s"],
            "prompts": len(prompts),
            "selection": _describe(selection),
            **lineage,
            "best": best,
            "final": result["final"],
            "history": history,
        }
    )
    report({"stage": "registering"})
    try:
        with transaction(factory) as session:
            model = model_registry.register(
                session,
                kind=ModelKind.policy,
                artifact_path=out_dir,
                project_id=job.project_id,
                job_id=job.id,
                snapshot_id=inputs.reward.snapshot_id,
                parent_id=inputs.parent.id if inputs.parent else None,
                reward_model_id=inputs.reward.id,
                config=json_safe(
                    {
                        "ppo": dataclasses.asdict(config),
                        "guard": dataclasses.asdict(guard_cfg) if guard_cfg else None,
                        "base": inputs.parent.path if inputs.parent else DEFAULT_POLICY,
                        "heldout_reward_model_id": lineage["heldout_reward_model_id"],
                        "prompts": _describe(selection),
                    }
                ),
                metrics=metrics,
            )
            final = {**metrics, "model_version_id": model.id}
            _chain_and_finish(session, job, model.id, final, last)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return final
