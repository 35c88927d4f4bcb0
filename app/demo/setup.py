"""The demo's setup: accounts, the demo project from the bundled prompts, its loop, first jobs.

One iteration of the loop, as the demo configures it:

  1. the packaged policy answers the 32 "train" prompts twice each (pairs to label) and the
     16 "held-out" prompts once each (the parent's answers, never labelled);
  2. after `reward_every` judgments the worker trains a reward model (MiniLM),
  3. which starts PPO (LoRA on SmolLM2) on the train prompts (`ppo_after_reward`),
  4. whose policy answers the held-out prompts (`generate_after_policy`); each new answer is
     paired with the parent's answer to the same prompt,
  5. and the annotators' judgments of those pairs are the new policy's human win rate.

Everything is written through the ordinary services, so the demo project is a normal project
afterwards. `prepare` is idempotent: a second run finds the project by name and queues no
second set of first jobs; `reset=True` renames the old project out of the way (its judgments
are kept: the system never deletes them), stops its loop and cancels its queued jobs.
"""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Job, JobState, ModelKind, ModelVersion, Project, Role, User
from app.services import chaining, jobs, model_registry, projects, prompts, users
from app.settings import Settings

PROJECT_NAME = "prefloop-demo"
ADMIN = "admin"
ANNOTATOR = "demo"
SIMULATED_PREFIX = "sim-"
TRAIN, HELDOUT = "train", "heldout"
BASE_POLICY_ROLE = "demo-base"
"""`config["role"]` of a policy the demo registered as its starting point (`--policy DIR`)."""
CREDENTIALS_FILE = "demo-credentials.json"
INSTRUCTIONS = (
    "Pick the answer that (1) mentions what the prompt asks about, (2) is concise: at most "
    "about 40 words, (3) does not repeat itself, and (4) finishes its last sentence."
)


# --- the bundled prompts ----------------------------------------------------------------------


@dataclass(frozen=True)
class BundledPrompt:
    external_id: str
    text: str
    keywords: tuple[str, ...]
    split: str  # TRAIN | HELDOUT


def prompts_file_bytes() -> bytes:
    """The bundled prompt set (package data, so it ships in the wheel)."""
    return resources.files("app.demo").joinpath("prompts.jsonl").read_bytes()


def bundled_prompts() -> list[BundledPrompt]:
    rows = []
    for line in prompts_file_bytes().decode("utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        meta = record["metadata"]
        rows.append(
            BundledPrompt(record["id"], record["prompt"], tuple(meta["keywords"]), meta["split"])
        )
    return rows


def keywords_by_id() -> dict[str, tuple[str, ...]]:
    """What the simulated annotators know about each prompt (see app.demo.preference)."""
    return {p.external_id: p.keywords for p in bundled_prompts()}


def split_ids(split: str) -> list[str]:
    return [p.external_id for p in bundled_prompts() if p.split == split]


# --- sizes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Job params of one demo preset (each is a plain trainer/sampler field; see worker/)."""

    reward_every: int
    first_generate: dict[str, Any]  # train prompts: pairs to label
    parent_answers: dict[str, Any]  # held-out prompts: one answer each, not labelled
    reward: dict[str, Any]
    ppo: dict[str, Any]
    generate: dict[str, Any]  # the new policy on the held-out prompts


PRESETS: dict[str, Sizes] = {
    # One iteration in under 15 minutes on a 2-core CPU (measured: bench/README.md, "Demo").
    "cpu": Sizes(
        reward_every=24,
        first_generate={"n": 2, "max_new_tokens": 48, "temperature": 0.8},
        parent_answers={"n": 1, "max_new_tokens": 48, "temperature": 0.8},
        reward={
            "epochs": 4,
            "lr": 1e-4,
            "batch_size": 8,
            "max_length": 256,
            "eval_fraction": 0.2,
        },
        ppo={
            "use_lora": True,
            "lr": 2e-4,
            "batch_size": 4,
            "mini_batch_size": 4,
            "ppo_epochs": 2,
            "max_new_tokens": 48,
            "total_steps": 10,
        },
        generate={"n": 2, "max_new_tokens": 48, "temperature": 0.8},
    ),
    # Tests: tiny models (`--policy`, `--reward-backbone`), a few tokens, two PPO steps. Three
    # answers per train prompt make up to 96 pairs; a reward model after 64 judgments leaves
    # at most 32 + 32 held-out pairs, so the second iteration cannot start before the first
    # one's pairs are all judged (the tiny loop outruns the annotators otherwise).
    "tiny": Sizes(
        reward_every=64,
        first_generate={"n": 3, "max_new_tokens": 4, "temperature": 1.0, "device": "cpu"},
        parent_answers={"n": 1, "max_new_tokens": 4, "temperature": 1.0, "device": "cpu"},
        reward={"epochs": 1, "lr": 1e-3, "batch_size": 8, "max_length": 32},
        ppo={
            "batch_size": 4,
            "mini_batch_size": 2,
            "ppo_epochs": 1,
            "max_new_tokens": 4,
            "total_steps": 2,
            "lr": 1e-3,
            "device": "cpu",
        },
        generate={"n": 2, "max_new_tokens": 4, "temperature": 1.0, "device": "cpu"},
    ),
}


@dataclass(frozen=True)
class DemoConfig:
    """What `prefloop demo` was asked for."""

    preset: str = "cpu"
    policy_dir: Path | None = None  # None: the packaged SmolLM2
    reward_backbone: str | None = None  # None: the packaged MiniLM
    project_name: str = PROJECT_NAME
    seed: int = 0

    @property
    def sizes(self) -> Sizes:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        return PRESETS[self.preset]


# --- accounts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    username: str
    password: str | None  # None: existed before the demo, password unknown to it


def credentials_path(settings: Settings) -> Path:
    return Path(settings.artifact_dir) / CREDENTIALS_FILE


def _load_credentials(settings: Settings) -> dict[str, str]:
    path = credentials_path(settings)
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _save_credentials(settings: Settings, known: dict[str, str]) -> None:
    """Passwords the demo generated, so a second run can print them again (owner-only file)."""
    path = credentials_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2, sort_keys=True), encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)


def _ensure_user(
    session: Session, username: str, role: Role, known: dict[str, str]
) -> tuple[User, Account]:
    user = session.scalar(select(User).where(User.username == username))
    if user is not None:
        return user, Account(username, known.get(username))
    password = secrets.token_urlsafe(12)
    user = users.create(session, username, role, password)
    known[username] = password
    return user, Account(username, password)


def ensure_accounts(session: Session, settings: Settings) -> tuple[Account, Account]:
    """The admin (unless another admin exists) and the demo annotator, with passwords the demo
    knows (generated by an earlier run and kept in the credentials file)."""
    known = _load_credentials(settings)
    before = dict(known)
    admins = [u for u in users.list_users(session) if u.role is Role.admin]
    if admins and not any(u.username == ADMIN for u in admins):
        admin = Account(admins[0].username, known.get(admins[0].username))
    else:
        admin = _ensure_user(session, ADMIN, Role.admin, known)[1]
    annotator = _ensure_user(session, ANNOTATOR, Role.annotator, known)[1]
    if known != before:
        _save_credentials(settings, known)
    return admin, annotator


def simulated_tokens(session: Session, count: int) -> list[tuple[str, str]]:
    """`count` simulated annotators (sim-1 …, token-only accounts), each with a new API token."""
    if count < 0:
        raise ValueError("the number of simulated annotators cannot be negative")
    out = []
    for i in range(1, count + 1):
        username = f"{SIMULATED_PREFIX}{i}"
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            user = users.create(session, username, Role.annotator, None)
        out.append((username, users.create_token(session, user, "demo")))
    return out


# --- the project --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoSetup:
    """What `prepare` found or made."""

    project_id: int
    created: bool
    prompts: int
    train_ids: list[str]
    heldout_ids: list[str]
    queued_job_ids: list[int] = field(default_factory=list)
    base_policy_id: int | None = None


def find_project(session: Session, name: str = PROJECT_NAME) -> Project | None:
    return session.scalar(select(Project).where(Project.name == name))


def loop_changes(
    config: DemoConfig, train_ids: list[str], heldout_ids: list[str]
) -> dict[str, Any]:
    """The loop settings that make one iteration run by itself."""
    sizes = config.sizes
    reward = dict(sizes.reward)
    if config.reward_backbone:
        reward["backbone"] = config.reward_backbone
    return {
        jobs.AUTO_REWARD_SETTING: sizes.reward_every,
        chaining.PPO_AFTER_REWARD: True,
        chaining.GENERATE_AFTER_POLICY: True,
        chaining.REWARD_PARAMS: reward,
        chaining.PPO_PARAMS: {**sizes.ppo, "prompts": train_ids, "seed": config.seed},
        chaining.GENERATE_PARAMS: {**sizes.generate, "prompts": heldout_ids},
    }


def _retire(session: Session, project: Project, now: datetime) -> None:
    """`--reset`: rename the old demo project, stop its loop, cancel its queued jobs."""
    chaining.update_loop(
        session,
        project.id,
        {
            jobs.AUTO_REWARD_SETTING: None,
            chaining.PPO_AFTER_REWARD: False,
            chaining.GENERATE_AFTER_POLICY: False,
        },
    )
    project.name = f"{project.name} (reset {now:%Y-%m-%d %H:%M:%S})"
    queued = session.scalars(
        select(Job).where(Job.project_id == project.id, Job.state == JobState.queued)
    )
    for job in queued:
        jobs.cancel(session, job.id, now=now)
    session.flush()


def _base_policy(session: Session, project_id: int, policy_dir: Path) -> int:
    """The project's registered starting policy for `--policy DIR` (registered once)."""
    found = session.scalars(
        select(ModelVersion).where(
            ModelVersion.project_id == project_id, ModelVersion.kind == ModelKind.policy
        )
    )
    for model in found:
        if (model.config or {}).get("role") == BASE_POLICY_ROLE:
            return model.id
    model = model_registry.register(
        session,
        kind=ModelKind.policy,
        artifact_path=policy_dir,
        project_id=project_id,
        name="demo base policy",
        config={"role": BASE_POLICY_ROLE},
    )
    return model.id


def _has_first_jobs(session: Session, project_id: int) -> bool:
    """Whether the first generate jobs were queued before (and did not fail or get cancelled)."""
    states = session.scalars(
        select(Job.state).where(Job.project_id == project_id, Job.kind == jobs.GENERATE)
    )
    return any(s in (JobState.queued, JobState.running, JobState.succeeded) for s in states)


def prepare(
    session: Session,
    settings: Settings,
    config: DemoConfig,
    *,
    reset: bool = False,
    now: datetime | None = None,
) -> DemoSetup:
    """Find or create the demo project, set its loop, and queue the first generate jobs."""
    now = now or datetime.now(UTC)
    sizes = config.sizes
    train_ids, heldout_ids = split_ids(TRAIN), split_ids(HELDOUT)
    project = find_project(session, config.project_name)
    if project is not None and reset:
        _retire(session, project, now)
        project = None
    created = project is None
    if project is None:
        project = projects.create(
            session,
            name=config.project_name,
            instructions=INSTRUCTIONS,
            judgments_per_task=1,
        )
        prompts.import_upload(
            session,
            project.id,
            "prompts.jsonl",
            prompts_file_bytes(),
            upsert=False,
            rng=random.Random(config.seed),
            settings=settings,
        )
    chaining.update_loop(session, project.id, loop_changes(config, train_ids, heldout_ids))
    base_id = _base_policy(session, project.id, config.policy_dir) if config.policy_dir else None
    queued: list[int] = []
    if not _has_first_jobs(session, project.id):
        policy = {"policy_id": base_id} if base_id is not None else {}
        for params in (
            {**sizes.first_generate, "prompts": train_ids},
            {**sizes.parent_answers, "prompts": heldout_ids},
        ):
            job = jobs.enqueue(
                session, project.id, jobs.GENERATE, {**params, **policy, "seed": config.seed}, None
            )
            queued.append(job.id)
    count = projects.progress(session, project.id).get("prompts", 0)
    return DemoSetup(
        project_id=project.id,
        created=created,
        prompts=int(count),
        train_ids=train_ids,
        heldout_ids=heldout_ids,
        queued_job_ids=queued,
        base_policy_id=base_id,
    )
