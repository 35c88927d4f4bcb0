"""The RLHF loop's wiring: per-project loop settings and which job a finished job starts.

    judgments ──every N──▶ reward ──ppo_after_reward──▶ ppo ──generate_after_policy──▶ generate
        ▲                                                                                │
        └──────────────────────── annotators judge the new tasks ◀───────────────────────┘

The settings live in the project's ``settings`` JSON (no schema change): the every-N reward
schedule (``reward_every_n_judgments``, read by ``app.services.jobs``), two switches, and the
params each chained job starts with, and the task assignment strategy with its random share
(app.domain.active; ``null`` puts either back to its default). `after_success` is called by
the worker inside the same transaction that registers a model and marks its job succeeded,
so a chained job exists exactly when the job before it succeeded.

This module also answers the loop's lineage questions — which reward model a PPO run trains
against, which held-out partner guards it, which policy it starts from — so that the rules
live in one place the web process can test without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain import active
from app.errors import InvalidInput, NotFound
from app.models import Job, ModelKind, ModelVersion, Project
from app.services import jobs, projects, winrate

PPO_AFTER_REWARD = "ppo_after_reward"
GENERATE_AFTER_POLICY = "generate_after_policy"
REWARD_PARAMS = "reward_params"
PPO_PARAMS = "ppo_params"
GENERATE_PARAMS = "generate_params"
LOOP_KEYS = (
    jobs.AUTO_REWARD_SETTING,
    PPO_AFTER_REWARD,
    GENERATE_AFTER_POLICY,
    REWARD_PARAMS,
    PPO_PARAMS,
    GENERATE_PARAMS,
    active.STRATEGY_SETTING,
    active.RANDOM_SHARE_SETTING,
)
CHAIN_TRIGGER = "chain"
DEFAULT_GENERATE_PROMPTS = "heldout"
"""A new policy's samples go first to the prompts its reward model never trained on."""

HELDOUT_ROLE = "heldout"
"""`config["role"]` of a reward model trained as another one's held-out partner."""

_PARAMS_KIND = {REWARD_PARAMS: jobs.REWARD, PPO_PARAMS: jobs.PPO, GENERATE_PARAMS: jobs.GENERATE}
"""The kind of job each params setting goes to."""

# Params the chain sets itself; a loop setting naming them would be silently overridden.
_CHAIN_OWNED = {
    PPO_PARAMS: ("reward_model_id", "trigger", "after_job"),
    GENERATE_PARAMS: ("policy_id", "trigger", "after_job"),
    REWARD_PARAMS: ("trigger", "after_job", "snapshot_id"),  # each retrain takes a new snapshot
}


# --- loop settings ------------------------------------------------------------------------------


def loop_settings(project: Project) -> dict[str, Any]:
    """The project's loop settings with defaults filled in (what GET /loop shows)."""
    stored = project.settings or {}
    strategy, share = active.strategy_settings(stored)
    return {
        jobs.AUTO_REWARD_SETTING: jobs.reward_threshold(project),
        PPO_AFTER_REWARD: stored.get(PPO_AFTER_REWARD) is True,
        GENERATE_AFTER_POLICY: stored.get(GENERATE_AFTER_POLICY) is True,
        REWARD_PARAMS: dict(stored.get(REWARD_PARAMS) or {}),
        PPO_PARAMS: dict(stored.get(PPO_PARAMS) or {}),
        GENERATE_PARAMS: dict(stored.get(GENERATE_PARAMS) or {}),
        # The task assignment strategy (app.domain.active), read by the claim code.
        active.STRATEGY_SETTING: strategy.value,
        active.RANDOM_SHARE_SETTING: share,
    }


def get_loop(session: Session, project_id: int) -> dict[str, Any]:
    return loop_settings(projects.get(session, project_id))


def _check_loop_value(key: str, value: Any) -> Any:
    if key == jobs.AUTO_REWARD_SETTING:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(
                f"{key} must be a whole number of at least 1, or null to turn it off"
            )
        return value
    if key == active.STRATEGY_SETTING:
        known = [s.value for s in active.AssignmentStrategy]
        if value is not None and value not in known:
            raise InvalidInput(f"{key} must be one of {', '.join(known)}, not {value!r}")
        return active.AssignmentStrategy(value).value if value is not None else None
    if key == active.RANDOM_SHARE_SETTING:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1
        ):
            raise InvalidInput(f"{key} must be a number from 0 to 1, not {value!r}")
        return float(value) if value is not None else None
    if key in (PPO_AFTER_REWARD, GENERATE_AFTER_POLICY):
        if not isinstance(value, bool):
            raise InvalidInput(f"{key} must be true or false")
        return value
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidInput(f"{key} must be a JSON object with string keys")
    owned = sorted(set(value) & set(_CHAIN_OWNED[key]))
    if owned:
        raise InvalidInput(f"{key} may not set {', '.join(owned)}: the loop sets it")
    try:  # the jobs these start must not fail later for a typo made now
        jobs.check_params(_PARAMS_KIND[key], value)
    except InvalidInput as exc:
        raise InvalidInput(f"{key}: {exc.message}") from None
    return dict(value)


def update_loop(session: Session, project_id: int, changes: dict[str, Any]) -> dict[str, Any]:
    """Change the loop settings named in `changes` (the others stay); returns them all.

    Every value is checked before anything is written. Job params are checked for shape only
    here (the web process cannot import the trainers); a bad trainer param fails the chained
    job at once with a message naming it.
    """
    unknown = sorted(set(changes) - set(LOOP_KEYS))
    if unknown:
        raise InvalidInput(
            f"unknown loop setting(s) {', '.join(unknown)}; known: {', '.join(LOOP_KEYS)}"
        )
    checked = {key: _check_loop_value(key, value) for key, value in changes.items()}
    project = projects.get(session, project_id)
    updated = dict(project.settings or {})
    for key, value in checked.items():
        if value is None:
            updated.pop(key, None)
        else:
            updated[key] = value
    project.settings = updated  # a new dict: JSON columns do not track in-place changes
    session.flush()
    return loop_settings(project)


# --- lineage ------------------------------------------------------------------------------------


def is_heldout(model: ModelVersion) -> bool:
    return (model.config or {}).get("role") == HELDOUT_ROLE


def main_reward_model(session: Session, project_id: int) -> ModelVersion | None:
    """The project's newest reward model that is not a held-out partner."""
    stmt = (
        select(ModelVersion)
        .where(ModelVersion.project_id == project_id, ModelVersion.kind == ModelKind.reward)
        .order_by(ModelVersion.id.desc())
    )
    return next((m for m in session.scalars(stmt) if not is_heldout(m)), None)


def heldout_partner(session: Session, reward_model: ModelVersion) -> ModelVersion | None:
    """The held-out reward model trained alongside `reward_model` (newest if several)."""
    stmt = (
        select(ModelVersion)
        .where(
            ModelVersion.kind == ModelKind.reward,
            ModelVersion.project_id == reward_model.project_id,
            ModelVersion.id != reward_model.id,
        )
        .order_by(ModelVersion.id.desc())
    )
    return next(
        (
            m
            for m in session.scalars(stmt)
            if is_heldout(m) and (m.config or {}).get("pair_of") == reward_model.id
        ),
        None,
    )


def model_of_kind(
    session: Session, model_id: int, kind: ModelKind, what: str = "model", *, project_id: int
) -> ModelVersion:
    """Model `model_id`, refused unless it is of `kind` and belongs to `project_id`.

    Enqueueing checks this too (app.services.jobs), but a loop setting or a job queued
    before that check could still name another project's model: a job never uses one.
    """
    model = session.get(ModelVersion, model_id)
    if model is None:
        raise NotFound(f"no {what} {model_id}")
    if model.project_id != project_id:
        owner = "no project" if model.project_id is None else f"project {model.project_id}"
        raise InvalidInput(f"{what} {model_id} belongs to {owner}, not project {project_id}")
    if model.kind is not kind:
        raise InvalidInput(f"{what} {model_id} is a {model.kind.value} model, not a {kind.value}")
    return model


def last_policy_that_held_up(session: Session, project_id: int) -> ModelVersion | None:
    """The project's newest policy whose whole chain held up, None when none did.

    A policy people judged worse than its parent (the live verdict, app.services.winrate)
    is out, and so is every policy trained from it, however new and unjudged: its chain
    starts from a rejected policy. A parent link that leaves the project, or loops, counts
    as not holding up.
    """
    policies = {
        m.id: m
        for m in session.scalars(
            select(ModelVersion).where(
                ModelVersion.project_id == project_id, ModelVersion.kind == ModelKind.policy
            )
        )
    }
    if not policies:
        return None
    worse = winrate.worse_than_parent_ids(session, project_id)
    held: dict[int, bool] = {}

    def holds_up(model_id: int) -> bool:
        chain: list[int] = []
        current: int | None = model_id
        verdict = True
        while current is not None:
            if current in held:
                verdict = held[current]
                break
            model = policies.get(current)
            if model is None or current in worse or current in chain:
                verdict = False
                break
            chain.append(current)
            current = model.parent_id
        for seen in chain:  # every policy on the way shares the verdict of what is above it
            held[seen] = verdict
        return verdict

    return next((policies[i] for i in sorted(policies, reverse=True) if holds_up(i)), None)


@dataclass(frozen=True)
class ModelRef:
    """A model version as plain values, safe to use after its transaction closed."""

    id: int
    path: str
    snapshot_id: int | None
    reward_model_id: int | None
    parent_id: int | None

    @classmethod
    def of(cls, model: ModelVersion) -> ModelRef:
        return cls(
            id=model.id,
            path=model.artifact_path,
            snapshot_id=model.snapshot_id,
            reward_model_id=model.reward_model_id,
            parent_id=model.parent_id,
        )


@dataclass(frozen=True)
class PPOInputs:
    """The models one PPO run uses: what it optimises against, what guards it, where it starts."""

    reward: ModelRef
    heldout: ModelRef | None
    parent: ModelRef | None  # None: the packaged default policy


def ppo_inputs(
    session: Session,
    project_id: int,
    *,
    reward_model_id: int | None = None,
    parent_policy_id: int | None = None,
    heldout_reward_model_id: int | None = None,
    use_heldout: bool = True,
) -> PPOInputs:
    """Resolve a PPO job's models; the defaults are the loop's rules.

    Reward model: the one named, else the project's newest (non-held-out) reward model.
    Held-out model: the one named, else the reward model's partner when it has one (unless
    `use_heldout` is False). Parent policy: the one named, else the project's newest policy
    whose whole chain held up (`last_policy_that_held_up`), else None (the packaged SmolLM2).
    Every model named must be of the project (`model_of_kind`).
    """
    projects.get(session, project_id)
    if reward_model_id is not None:
        reward = model_of_kind(
            session, reward_model_id, ModelKind.reward, "reward model", project_id=project_id
        )
    else:
        found = main_reward_model(session, project_id)
        if found is None:
            raise InvalidInput(
                f"project {project_id} has no reward model yet: train one (a reward job) first"
            )
        reward = found
    heldout: ModelVersion | None = None
    if heldout_reward_model_id is not None:
        heldout = model_of_kind(
            session,
            heldout_reward_model_id,
            ModelKind.reward,
            "held-out reward model",
            project_id=project_id,
        )
        if heldout.id == reward.id:
            raise InvalidInput("the held-out reward model must differ from the reward model")
    elif use_heldout:
        heldout = heldout_partner(session, reward)
    if parent_policy_id is not None:
        parent: ModelVersion | None = model_of_kind(
            session, parent_policy_id, ModelKind.policy, "policy", project_id=project_id
        )
    else:
        parent = last_policy_that_held_up(session, project_id)
    return PPOInputs(
        reward=ModelRef.of(reward),
        heldout=ModelRef.of(heldout) if heldout is not None else None,
        parent=ModelRef.of(parent) if parent is not None else None,
    )


# --- what runs next -----------------------------------------------------------------------------


def after_success(
    session: Session, *, kind: str, project_id: int, model_version_id: int, job_id: int
) -> Job | None:
    """Enqueue the loop's next job after job `job_id` of `kind` produced `model_version_id`.

    A new reward model starts PPO against it when `ppo_after_reward` is on; a new policy
    starts generation from it when `generate_after_policy` is on. Generation starts nothing:
    the next step waits for people (the every-N-judgments schedule). After a reward or PPO
    job it also refreshes the policies' "rejected" marks (app.services.winrate).
    """
    project = projects.get(session, project_id)
    if kind in (jobs.REWARD, jobs.PPO):
        # New judgments arrived (a reward job) or a policy was added: refresh the "rejected"
        # marks of policies people judged worse than their parent (app.services.winrate).
        winrate.refresh_marks(session, project_id)
    loop = loop_settings(project)
    chain = {"trigger": CHAIN_TRIGGER, "after_job": job_id}
    if kind == jobs.REWARD and loop[PPO_AFTER_REWARD]:
        params = {**loop[PPO_PARAMS], "reward_model_id": model_version_id, **chain}
        return jobs.enqueue_internal(session, project_id, jobs.PPO, params)
    if kind == jobs.PPO and loop[GENERATE_AFTER_POLICY]:
        params = {
            "prompts": DEFAULT_GENERATE_PROMPTS,
            **loop[GENERATE_PARAMS],
            "policy_id": model_version_id,
            **chain,
        }
        return jobs.enqueue_internal(session, project_id, jobs.GENERATE, params)
    return None


def schedule_reward(session: Session, project_id: int) -> Job | None:
    """`jobs.maybe_schedule_reward`, with the project's `reward_params` on the new job.

    So an automatic retrain trains the way the project asked (backbone, held-out pair).
    """
    job = jobs.maybe_schedule_reward(session, project_id)
    if job is None:
        return None
    project = projects.get(session, project_id)
    extra = loop_settings(project)[REWARD_PARAMS]
    if extra:
        job.params = {**extra, **(job.params or {})}
        session.flush()
    return job
