"""The RLHF loop: generate and PPO jobs, held-out reward pairs, chaining, loop settings.

Service tests run on both backends. The end-to-end worker tests commit real rows and run
tiny models (a 2-layer Llama policy, 2-layer BERT reward models) on SQLite only: the worker
code is the same on Postgres, which test_worker.py already exercises with a reward job.
"""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.errors import InvalidInput, NotFound
from app.models import (
    Completion,
    Job,
    JobState,
    Judgment,
    ModelKind,
    ModelVersion,
    Project,
    ProjectMode,
    Role,
    Task,
)
from app.services import chaining, generation, jobs, model_registry, winrate
from app.settings import Settings
from tests.factories import make_project, make_prompt, make_task, make_token, make_user
from worker import main as worker_main
from worker.generate import GenerateConfig, load_policy, sample_completions
from worker.models import save_atomic, tiny_causal_lm, tiny_reward_model, tiny_tokenizer

FILLER = [f"w{i}" for i in range(12)]
WORDS = [*FILLER, "good", "bad"]
TINY_PPO = {
    "total_steps": 3,
    "batch_size": 4,
    "mini_batch_size": 2,
    "ppo_epochs": 1,
    "max_new_tokens": 4,
    "lr": 1e-3,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; other test runs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny models: a policy, two reward models (main and held-out), a reward backbone."""
    root = tmp_path_factory.mktemp("tiny-loop")
    causal = tiny_tokenizer(WORDS, kind="causal")
    save_atomic(tiny_causal_lm(len(causal), seed=0), causal, root / "policy", {"kind": "policy"})
    encoder = tiny_tokenizer(WORDS)
    for name, seed in (("reward", 1), ("heldout", 2), ("backbone", 3)):
        save_atomic(tiny_reward_model(len(encoder), seed=seed), encoder, root / name, {})
    return {name: root / name for name in ("policy", "reward", "heldout", "backbone")}


@pytest.fixture
def worker_settings(backend_settings: Settings, tmp_path: Path) -> Settings:
    return backend_settings.model_copy(update={"artifact_dir": tmp_path / "artifacts"})


@pytest.fixture
def sqlite_only(backend: str) -> None:
    """Listed before committed_factory, so Postgres skips before emptying its tables."""
    if backend != "sqlite":
        pytest.skip("model-heavy end-to-end test: run once, on SQLite")


def register(session: Session, kind: ModelKind, path: Path, project: Project, **fields: Any):
    return model_registry.register(
        session, kind=kind, artifact_path=path, project_id=project.id, **fields
    )


def judge(session: Session, project: Project, task: Task, user_id: int) -> Judgment:
    a, b = task.completion_ids[:2]
    judgment = Judgment(
        project_id=project.id,
        task_id=task.id,
        user_id=user_id,
        ranking=[[a], [b]],
        display_order=[a, b],
    )
    session.add(judgment)
    session.flush()
    return judgment


def job_row(factory: sessionmaker[Session], job_id: int) -> Job:
    with transaction(factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


# --- pure pairing rules ----------------------------------------------------------------------


def test_previous_completions_prefer_the_parent_then_the_newest_other_source() -> None:
    existing = [(1, "upload"), (2, "upload"), (3, "policy:4"), (4, "policy:7"), (5, "policy:7")]
    assert generation.previous_ids(existing, "policy:9", "policy:4") == [3]
    assert generation.previous_ids(existing, "policy:9", "policy:8") == [4, 5]
    assert generation.previous_ids(existing, "policy:7", None) == [3]
    assert generation.previous_ids([(1, "policy:9")], "policy:9", None) == []


def test_new_samples_pair_with_previous_ones_round_robin() -> None:
    pairs = generation.pair_with_previous([10, 11, 12], [1, 2], random.Random(0))
    assert [new for _, new in pairs] == [10, 11, 12]
    olds = [old for old, _ in pairs]
    assert sorted(set(olds)) == [1, 2] and olds[0] == olds[2] != olds[1]
    assert generation.pair_with_previous([10], [], random.Random(0)) == []


def test_candidate_sets_per_mode() -> None:
    rng = random.Random(0)
    common = {"source": "policy:9", "parent_source": None, "max_pairs": 16, "rng": rng}
    # Pairwise with an uploaded pair: each new sample against an upload, existing pairs kept out.
    existing = [(1, "upload"), (2, "upload")]
    sets = generation.candidate_sets(
        ProjectMode.pairwise, 2, existing, {frozenset((1, 2))}, [3, 4], **common
    )
    assert sorted(s[1] for s in sets) == [3, 4] and {s[0] for s in sets} == {1, 2}
    # Nothing to compare with: the new samples against each other, capped by max_pairs.
    sets = generation.candidate_sets(
        ProjectMode.pairwise, 2, [], set(), [5, 6, 7, 8], **{**common, "max_pairs": 3}
    )
    assert len(sets) == 3 and {c for s in sets for c in s} == {5, 6, 7, 8}
    # Ranking: one task of K, the new samples first, filled up with older ones.
    sets = generation.candidate_sets(ProjectMode.ranking, 4, existing, set(), [3, 4, 5], **common)
    assert len(sets) == 1 and len(sets[0]) == 4 and {3, 4, 5} <= set(sets[0])
    assert generation.candidate_sets(ProjectMode.ranking, 4, [], set(), [3], **common) == []


def test_parse_selection() -> None:
    assert generation.parse_selection("heldout") == "heldout"
    assert generation.parse_selection(["a", "b", "a"]) == ["a", "b"]
    for bad in ("some", [], [1], None, {"a": 1}):
        with pytest.raises(InvalidInput):
            generation.parse_selection(bad)


# --- services (both backends) ----------------------------------------------------------------


def test_select_prompts_waiting_all_heldout_and_listed(db: Session, tmp_path: Path) -> None:
    project = make_project(db)
    make_prompt(db, project, [], external_id="empty")
    one = make_prompt(db, project, ["only"], external_id="one")
    judged = make_prompt(db, project, ["a", "b"], external_id="judged")
    evaluated = make_prompt(db, project, ["c", "d"], external_id="evaluated")
    later = make_prompt(db, project, ["e", "f"], external_id="later")
    user = make_user(db)
    judge(db, project, make_task(db, project, judged), user.id)
    cutoff = judge(db, project, make_task(db, project, evaluated), user.id).id
    judge(db, project, make_task(db, project, later), user.id)  # after the model's cut-off
    reward = register(
        db,
        ModelKind.reward,
        tmp_path,
        project,
        config={"data": {"max_judgment_id": cutoff}, "heldout_prompt_ids": [evaluated.id]},
    )

    def ids(selection: Any, **kw: Any) -> list[str]:
        return [p.external_id for p in generation.select_prompts(db, project.id, selection, **kw)]

    assert ids("waiting") == ["empty", "one"]
    assert ids("all") == ["empty", "one", "judged", "evaluated", "later"]
    assert ids("all", limit=2) == ["empty", "one"]
    assert ids("heldout", reward_model=reward) == ["empty", "one", "evaluated", "later"]
    assert ids("heldout") == ids("all")  # no reward model: nothing was trained on
    assert ids(["later", "empty"]) == ["later", "empty"]
    with pytest.raises(InvalidInput, match="1 prompt id"):
        ids(["empty", "nope"])
    got = generation.select_prompts(db, project.id, ["one"])[0]
    assert (got.id, got.prompt) == (one.id, "Say hello.")
    make_prompt(
        db, project, [], external_id="chat", text=None, messages=[{"role": "user", "content": "hi"}]
    )  # type: ignore[arg-type]
    assert generation.select_prompts(db, project.id, ["chat"])[0].prompt == [
        {"role": "user", "content": "hi"}
    ]


def test_store_skips_known_texts_tags_the_policy_and_makes_tasks(
    db: Session, tmp_path: Path
) -> None:
    project = make_project(db, judgments_per_task=3)
    uploaded = make_prompt(db, project, ["old a", "old b"])
    make_task(db, project, uploaded)
    fresh = make_prompt(db, project, [])
    policy = register(db, ModelKind.policy, tmp_path, project)
    result = generation.store(
        db,
        project.id,
        {uploaded.id: ["old a", "new 1", "new 2"], fresh.id: ["x", "y", "z"]},
        source=f"policy:{policy.id}",
        model_version_id=policy.id,
        metadata={"job_id": 1},
        rng=random.Random(0),
        max_pairs=16,
    )
    assert (result.completions_stored, result.existing_duplicates) == (5, 1)
    stored = db.scalars(
        select(Completion).where(Completion.source == f"policy:{policy.id}").order_by(Completion.id)
    ).all()
    assert [c.text for c in stored] == ["new 1", "new 2", "x", "y", "z"]
    assert all(c.model_version_id == policy.id and c.metadata_ == {"job_id": 1} for c in stored)

    tasks = db.scalars(select(Task).where(Task.project_id == project.id).order_by(Task.id)).all()[
        1:
    ]  # the upload's own task first
    assert result.tasks_created == len(tasks) == 2 + 3
    by_text = {c.id: c.text for c in db.scalars(select(Completion))}
    uploaded_pairs = [sorted(by_text[c] for c in t.completion_ids) for t in tasks[:2]]
    # each new sample against one of the uploads
    assert sorted(p[0] for p in uploaded_pairs) == ["new 1", "new 2"]
    assert {p[1] for p in uploaded_pairs} <= {"old a", "old b"}
    fresh_pairs = {frozenset(by_text[c] for c in t.completion_ids) for t in tasks[2:]}
    assert fresh_pairs == {frozenset(p) for p in (("x", "y"), ("x", "z"), ("y", "z"))}
    assert all(t.required_judgments == 3 and t.state.value == "open" for t in tasks)

    # Storing the same samples again adds nothing.
    again = generation.store(
        db,
        project.id,
        {fresh.id: ["x", "y"]},
        source=f"policy:{policy.id}",
        model_version_id=policy.id,
        metadata={},
        rng=random.Random(0),
        max_pairs=16,
    )
    assert (again.completions_stored, again.existing_duplicates, again.tasks_created) == (0, 2, 0)


def test_store_makes_one_ranking_task_of_k(db: Session) -> None:
    project = make_project(db, mode=ProjectMode.ranking, candidates_per_task=3)
    prompt = make_prompt(db, project, [])
    result = generation.store(
        db,
        project.id,
        {prompt.id: ["a", "b", "c", "d"]},
        source="policy:default",
        model_version_id=None,
        metadata={},
        rng=random.Random(1),
        max_pairs=16,
    )
    task = db.scalars(select(Task).where(Task.project_id == project.id)).one()
    assert (result.completions_stored, result.tasks_created) == (4, 1)
    assert len(task.completion_ids) == 3


def test_loop_settings_validate_and_merge(db: Session) -> None:
    project = make_project(db, settings={"other": 1})
    assert chaining.get_loop(db, project.id) == {
        "reward_every_n_judgments": None,
        "ppo_after_reward": False,
        "generate_after_policy": False,
        "reward_params": {},
        "ppo_params": {},
        "generate_params": {},
        "assignment_strategy": "default",
        "random_share": 0.2,
    }
    got = chaining.update_loop(
        db, project.id, {"reward_every_n_judgments": 50, "ppo_params": {"total_steps": 5}}
    )
    assert got["reward_every_n_judgments"] == 50 and got["ppo_params"] == {"total_steps": 5}
    got = chaining.update_loop(db, project.id, {"ppo_after_reward": True})
    assert got["reward_every_n_judgments"] == 50 and got["ppo_after_reward"] is True
    assert project.settings["other"] == 1  # unrelated settings survive
    got = chaining.update_loop(db, project.id, {"reward_every_n_judgments": None})
    assert got["reward_every_n_judgments"] is None
    assert jobs.AUTO_REWARD_SETTING not in project.settings
    for bad in (
        {"ppo_after_reward": "yes"},
        {"reward_every_n_judgments": 0},
        {"reward_every_n_judgments": True},
        {"ppo_params": [1]},
        {"ppo_params": {"reward_model_id": 3}},
        {"generate_params": {"policy_id": 3}},
        {"sometimes": True},
    ):
        with pytest.raises(InvalidInput):
            chaining.update_loop(db, project.id, bad)
    # The params of the jobs the loop will start pass the worker's checks now, not later.
    for bad, message in (
        ({"ppo_params": {"totl_steps": 3}}, "ppo_params: unknown ppo parameter(s) totl_steps"),
        (
            {"reward_params": {"epochs": 0}},
            "reward_params: invalid reward parameters: epochs must be at least 1, not 0",
        ),
        ({"generate_params": {"prompts": "some"}}, "generate_params: prompts must be one of"),
    ):
        with pytest.raises(InvalidInput, match=re.escape(message)):
            chaining.update_loop(db, project.id, bad)
    assert chaining.get_loop(db, project.id)["ppo_after_reward"] is True  # nothing half-written
    with pytest.raises(NotFound):
        chaining.get_loop(db, 999_999)


def test_after_success_chains_only_what_the_project_asks_for(db: Session, tmp_path: Path) -> None:
    project = make_project(db)
    reward = register(db, ModelKind.reward, tmp_path, project)
    policy = register(db, ModelKind.policy, tmp_path, project, reward_model_id=reward.id)
    args = {"project_id": project.id, "job_id": 7}
    assert chaining.after_success(db, kind="reward", model_version_id=reward.id, **args) is None
    assert chaining.after_success(db, kind="ppo", model_version_id=policy.id, **args) is None

    chaining.update_loop(
        db,
        project.id,
        {
            "ppo_after_reward": True,
            "generate_after_policy": True,
            "ppo_params": {"total_steps": 5},
            "generate_params": {"n": 3},
        },
    )
    ppo = chaining.after_success(db, kind="reward", model_version_id=reward.id, **args)
    assert ppo is not None and (ppo.kind, ppo.state, ppo.project_id) == (
        "ppo",
        JobState.queued,
        project.id,
    )
    assert ppo.params == {
        "total_steps": 5,
        "reward_model_id": reward.id,
        "trigger": "chain",
        "after_job": 7,
    }
    gen = chaining.after_success(db, kind="ppo", model_version_id=policy.id, **args)
    assert gen is not None and gen.kind == "generate"
    assert gen.params == {
        "prompts": "heldout",
        "n": 3,
        "policy_id": policy.id,
        "trigger": "chain",
        "after_job": 7,
    }
    assert chaining.after_success(db, kind="generate", model_version_id=policy.id, **args) is None


def test_ppo_inputs_resolve_the_loop_lineage(db: Session, tmp_path: Path) -> None:
    project = make_project(db)
    with pytest.raises(InvalidInput, match="no reward model"):
        chaining.ppo_inputs(db, project.id)
    old = register(db, ModelKind.reward, tmp_path, project)
    main = register(db, ModelKind.reward, tmp_path, project)
    partner = register(
        db, ModelKind.reward, tmp_path, project, config={"role": "heldout", "pair_of": main.id}
    )
    got = chaining.ppo_inputs(db, project.id)
    # The partner is newer, but never the main reward model; it is the held-out one.
    assert (got.reward.id, got.heldout.id, got.parent) == (main.id, partner.id, None)  # type: ignore[union-attr]
    assert chaining.ppo_inputs(db, project.id, use_heldout=False).heldout is None
    assert chaining.ppo_inputs(db, project.id, reward_model_id=old.id).heldout is None
    policy = register(db, ModelKind.policy, tmp_path, project)
    got = chaining.ppo_inputs(db, project.id, heldout_reward_model_id=old.id)
    assert (got.heldout.id, got.parent.id) == (old.id, policy.id)  # type: ignore[union-attr]
    with pytest.raises(InvalidInput, match="not a reward"):
        chaining.ppo_inputs(db, project.id, reward_model_id=policy.id)
    with pytest.raises(InvalidInput, match="not a policy"):
        chaining.ppo_inputs(db, project.id, parent_policy_id=main.id)
    with pytest.raises(NotFound):
        chaining.ppo_inputs(db, project.id, parent_policy_id=999_999)


def test_scheduled_reward_jobs_carry_the_loop_reward_params(db: Session) -> None:
    project = make_project(db)
    chaining.update_loop(
        db, project.id, {"reward_every_n_judgments": 1, "reward_params": {"heldout_split": True}}
    )
    assert chaining.schedule_reward(db, project.id) is None  # no judgments yet
    prompt = make_prompt(db, project, ["a", "b"])
    judge(db, project, make_task(db, project, prompt), make_user(db).id)
    job = chaining.schedule_reward(db, project.id)
    assert job is not None and job.params == {"heldout_split": True, "trigger": "auto"}


def test_loop_api_roles_and_validation(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    admin = make_token(db, make_user(db, Role.admin))
    researcher = make_token(db, make_user(db, Role.researcher))
    annotator = make_token(db, make_user(db, Role.annotator))
    project = make_project(db)
    url = f"/api/v1/projects/{project.id}/loop"

    assert client.get(url).status_code == 401
    for headers in (researcher, annotator):
        assert client.get(url, headers=headers).status_code == 403
        assert client.put(url, json={"ppo_after_reward": True}, headers=headers).status_code == 403
    got = client.get(url, headers=admin)
    assert got.status_code == 200 and got.json()["ppo_after_reward"] is False

    put = client.put(
        url,
        json={"ppo_after_reward": True, "reward_every_n_judgments": 20, "ppo_params": {"lr": 1e-4}},
        headers=admin,
    )
    assert put.status_code == 200, put.text
    assert put.json() == {
        "reward_every_n_judgments": 20,
        "ppo_after_reward": True,
        "generate_after_policy": False,
        "reward_params": {},
        "ppo_params": {"lr": 1e-4},
        "generate_params": {},
        "assignment_strategy": "default",
        "random_share": 0.2,
    }
    assert client.get(url, headers=admin).json() == put.json()
    db.refresh(project)
    assert project.settings[jobs.AUTO_REWARD_SETTING] == 20

    for bad in (
        {"reward_every_n_judgments": 0},
        {"nope": 1},
        {"ppo_params": {"reward_model_id": 1}},
        {"ppo_after_reward": None},
        # no coercion: "yes" is not true, and true is not 1 (a retrain after every judgment)
        {"ppo_after_reward": "yes"},
        {"generate_after_policy": 0},
        {"reward_every_n_judgments": True},
        {"reward_every_n_judgments": "5"},
        {"random_share": True},
        {"random_share": "0.5"},
        {"reward_params": {"snapshot_id": 1}},  # every retrain takes its own snapshot
    ):
        resp = client.put(url, json=bad, headers=admin)
        assert resp.status_code == 422, (bad, resp.text)
    assert client.get("/api/v1/projects/999999/loop", headers=admin).status_code == 404


# --- the worker, end to end ------------------------------------------------------------------


def test_bad_loop_jobs_fail_at_once_without_loading_a_model(
    committed_factory: sessionmaker[Session], worker_settings: Settings
) -> None:
    with transaction(committed_factory) as session:
        project = make_project(session)
        make_prompt(session, project, ["a", "b"])
        pid = project.id
        # Internal: params people send are refused at once (test_jobs); these stand for
        # params stored before a rule existed, which the worker must still refuse.
        queued = [
            jobs.enqueue_internal(session, pid, kind, params).id
            for kind, params in (
                ("ppo", {}),
                ("ppo", {"totl_steps": 3}),
                ("ppo", {"lr": "fast"}),
                ("generate", {}),
                ("generate", {"prompts": "some"}),
                ("generate", {"policy_id": 999_999, "prompts": "all"}),
                ("generate", {"prompts": "all", "device": "tpu"}),
                ("ppo", {"device": "cuda:1"}),
            )
        ]
    for _ in queued:
        assert worker_main.main(worker_settings, once=True) == ["failed"]
    errors = [job_row(committed_factory, j).error or "" for j in queued]
    assert "has no reward model yet" in errors[0]
    assert "unknown ppo parameter(s) totl_steps" in errors[1]
    assert "parameter 'lr' must be a number" in errors[2]
    assert "no prompts to generate for (prompts=waiting)" in errors[3]
    assert "prompts must be one of waiting, all, heldout" in errors[4]
    assert "no policy 999999" in errors[5]
    assert "parameter 'device' must be auto, cpu, cuda or cuda:N" in errors[6]
    assert "parameter 'device' of a ppo job must be auto or cpu" in errors[7]
    assert all(job_row(committed_factory, j).attempts == 1 for j in queued)  # never retried


def test_generate_job_stores_tagged_samples_and_creates_tasks(
    sqlite_only: None,
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    tiny_dirs: dict[str, Path],
) -> None:
    with transaction(committed_factory) as session:
        project = make_project(session)
        waiting = make_prompt(session, project, [], text="w1 w2 w3")
        uploaded = make_prompt(session, project, ["good w1", "bad w2"], text="w4 w5")
        make_task(session, project, uploaded)
        policy = register(session, ModelKind.policy, tiny_dirs["policy"], project)
        params = {
            "policy_id": policy.id,
            "n": 6,
            "max_new_tokens": 2,
            "seed": 5,
            "prompts": "all",
            "device": "cpu",  # the prediction below samples on the CPU too
        }
        job_id = jobs.enqueue(session, project.id, "generate", params, None).id
        ids = (project.id, waiting.id, uploaded.id, policy.id)
    project_id, waiting_id, uploaded_id, policy_id = ids

    # What the job will sample (same model, config and seed): plant one of the texts.
    model, tokenizer = load_policy(tiny_dirs["policy"], worker_settings.artifact_dir)
    config = GenerateConfig(n=6, max_new_tokens=2, seed=5)
    expected = sample_completions(model, tokenizer, ["w1 w2 w3", "w4 w5"], config)
    assert len(expected.completions[1]) >= 2, expected
    planted = expected.completions[1][0]
    with transaction(committed_factory) as session:
        session.add(Completion(prompt_id=uploaded_id, text=planted))

    seen: list[dict[str, Any]] = []
    assert worker_main.main(worker_settings, once=True, on_progress=seen.append) == ["succeeded"]
    job = job_row(committed_factory, job_id)
    new_waiting = expected.completions[0]
    new_uploaded = expected.completions[1][1:]
    assert job.metrics["completions_stored"] == len(new_waiting) + len(new_uploaded)
    assert job.metrics["existing_duplicates"] == 1
    assert job.metrics["sampled_duplicates"] == expected.dropped_duplicates
    assert job.metrics["duplicates_dropped"] == expected.dropped_duplicates + 1
    assert (job.metrics["prompts"], job.metrics["samples"], job.metrics["source"]) == (
        2,
        12,
        f"policy:{policy_id}",
    )
    assert job.progress["stage"] == "done" and job.progress["step"] == 2
    assert any(p.get("stage") == "generating" for p in seen)

    with transaction(committed_factory) as session:
        made = session.scalars(
            select(Completion)
            .where(Completion.source == f"policy:{policy_id}")
            .order_by(Completion.id)
        ).all()
        assert [c.text for c in made] == new_waiting + new_uploaded
        assert all(
            c.model_version_id == policy_id and c.metadata_["job_id"] == job_id for c in made
        )
        tasks = session.scalars(
            select(Task).where(Task.project_id == project_id).order_by(Task.id)
        ).all()[1:]
        new_ids = {c.id for c in made}
        on_uploaded = [t for t in tasks if t.prompt_id == uploaded_id]
        # new vs. previous: one pair per new sample, each with an uploaded completion
        assert len(on_uploaded) == len(new_uploaded)
        assert all(len(set(t.completion_ids) & new_ids) == 1 for t in on_uploaded)
        on_waiting = [t for t in tasks if t.prompt_id == waiting_id]
        n = len(new_waiting)
        assert len(on_waiting) == min(n * (n - 1) // 2, worker_settings.max_pairs_per_prompt)
        assert job.metrics["tasks_created"] == len(tasks)


def test_ppo_job_registers_the_best_policy_with_lineage_and_chains_generation(
    sqlite_only: None,
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    tiny_dirs: dict[str, Path],
) -> None:
    with transaction(committed_factory) as session:
        project = make_project(session)
        for i in range(6):
            make_prompt(session, project, [], text=" ".join(FILLER[i : i + 3]))
        parent = register(session, ModelKind.policy, tiny_dirs["policy"], project)
        reward = register(session, ModelKind.reward, tiny_dirs["reward"], project)
        partner = register(
            session,
            ModelKind.reward,
            tiny_dirs["heldout"],
            project,
            config={"role": "heldout", "pair_of": reward.id},
        )
        chaining.update_loop(session, project.id, {"generate_after_policy": True})
        job_id = jobs.enqueue(session, project.id, "ppo", dict(TINY_PPO), None).id
        ids = (project.id, parent.id, reward.id, partner.id)
    project_id, parent_id, reward_id, partner_id = ids

    assert worker_main.main(worker_settings, once=True) == ["succeeded"]
    job = job_row(committed_factory, job_id)
    with transaction(committed_factory) as session:
        model = session.scalars(select(ModelVersion).where(ModelVersion.job_id == job_id)).one()
        chained = session.scalars(select(Job).where(Job.kind == "generate")).one()
    assert (model.kind, model.parent_id, model.reward_model_id, model.project_id) == (
        ModelKind.policy,
        parent_id,
        reward_id,
        project_id,
    )
    assert job.metrics["model_version_id"] == model.id
    assert job.metrics["heldout_reward_model_id"] == partner_id  # picked up by itself
    assert model.config["guard"] is not None  # on, since a held-out model scores rollouts
    history = model.metrics["history"]
    assert 1 <= len(history) <= 3 and all("heldout_reward_mean" in h for h in history)
    assert model.metrics["best_step"] in [h["step"] for h in history]
    assert model.metrics["best"]["step"] == model.metrics["best_step"]
    assert model.metrics["final"] == history[-1] and "stop_reason" in model.metrics
    assert job.progress["stage"] == "done"

    out_dir = worker_settings.artifact_dir / "models" / f"policy-{job_id}"
    assert Path(model.artifact_path) == out_dir.resolve()
    assert [p.name for p in out_dir.parent.iterdir()] == [out_dir.name]
    assert not (worker_settings.artifact_dir / "work" / f"ppo-{job_id}").exists()
    loaded, _ = load_policy(out_dir, worker_settings.artifact_dir)
    assert loaded.config.num_hidden_layers == 2

    assert chained.params == {
        "prompts": "heldout",
        "policy_id": model.id,
        "trigger": "chain",
        "after_job": job_id,
    }
    assert job.metrics["next_job_id"] == chained.id


def test_a_stopped_ppo_job_is_requeued_and_leaves_no_checkpoint(
    sqlite_only: None,
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    tiny_dirs: dict[str, Path],
) -> None:
    with transaction(committed_factory) as session:
        project = make_project(session)
        make_prompt(session, project, [], text="w1 w2")
        parent = register(session, ModelKind.policy, tiny_dirs["policy"], project)
        register(session, ModelKind.reward, tiny_dirs["reward"], project)
        params = {**TINY_PPO, "parent_policy_id": parent.id, "guard": {"patience": 1}}
        job_id = jobs.enqueue(session, project.id, "ppo", params, None).id
    stop = threading.Event()

    def on_progress(progress: dict[str, Any]) -> None:
        if progress.get("step") == 1 and progress.get("stage") == "training":
            stop.set()

    assert worker_main.main(worker_settings, once=True, stop=stop, on_progress=on_progress) == [
        "queued"
    ]
    job = job_row(committed_factory, job_id)
    assert (job.state, job.attempts) == (JobState.queued, 0)
    for sub in ("models", "work"):
        folder = worker_settings.artifact_dir / sub
        assert not folder.exists() or list(folder.iterdir()) == []
    with transaction(committed_factory) as session:
        assert session.scalars(
            select(ModelVersion).where(ModelVersion.kind == ModelKind.policy)
        ).all() == [session.get(ModelVersion, parent.id)]


def test_reward_job_with_heldout_split_trains_a_pair_and_chains_ppo(
    sqlite_only: None,
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    tiny_dirs: dict[str, Path],
) -> None:
    rng = random.Random(0)
    with transaction(committed_factory) as session:
        project = make_project(session)
        users = [make_user(session) for _ in range(2)]
        for i in range(24):
            words = rng.choices(FILLER, k=3)
            prompt = make_prompt(
                session, project, [f"good {words[0]}", f"bad {words[1]}"], text=" ".join(words)
            )
            judge(session, project, make_task(session, project, prompt), users[i % 2].id)
        chaining.update_loop(
            session, project.id, {"ppo_after_reward": True, "ppo_params": {"total_steps": 2}}
        )
        params = {
            "backbone": str(tiny_dirs["backbone"]),
            "max_length": 32,
            "batch_size": 8,
            "epochs": 1,
            "eval_fraction": 0.25,
            "heldout_split": True,
        }
        job_id = jobs.enqueue(session, project.id, "reward", params, None).id
        project_id = project.id

    assert worker_main.main(worker_settings, once=True, kinds=["reward"]) == ["succeeded"]
    job = job_row(committed_factory, job_id)
    with transaction(committed_factory) as session:
        main, partner = session.scalars(
            select(ModelVersion).where(ModelVersion.job_id == job_id).order_by(ModelVersion.id)
        ).all()
        ppo = session.scalars(select(Job).where(Job.kind == "ppo")).one()
        inputs = chaining.ppo_inputs(session, project_id, reward_model_id=main.id)
    assert job.metrics["model_version_id"] == main.id
    assert job.metrics["heldout_model_version_id"] == partner.id
    assert partner.config["role"] == "heldout" and partner.config["pair_of"] == main.id
    assert "role" not in main.config
    # Two halves of the 24 prompts, disjoint: each model's untrained prompts hold the other half.
    main_data, partner_data = main.config["data"], partner.config["data"]
    assert main_data["prompts"] + partner_data["prompts"] == 24
    assert main_data["prompts"] == partner_data["prompts"] == 12
    assert len(main.config["heldout_prompt_ids"]) == 12 + 3  # the other half + its eval quarter
    assert Path(partner.artifact_path).name == f"reward-{job_id}-heldout"
    assert ppo.params == {
        "total_steps": 2,
        "reward_model_id": main.id,
        "trigger": "chain",
        "after_job": job_id,
    }
    assert job.metrics["next_job_id"] == ppo.id
    assert inputs.heldout is not None and inputs.heldout.id == partner.id


def test_jobs_never_use_another_projects_models_when_they_run(
    committed_factory: sessionmaker[Session], worker_settings: Settings, tmp_path: Path
) -> None:
    """Enqueueing refuses them (test_jobs); a loop setting or an old row could still name one."""
    with transaction(committed_factory) as session:
        mine, theirs = make_project(session), make_project(session)
        make_prompt(session, mine, ["a", "b"])
        reward = register(session, ModelKind.reward, tmp_path, theirs)
        policy = register(session, ModelKind.policy, tmp_path, theirs)
        own_reward = register(session, ModelKind.reward, tmp_path, mine)
        for params, what in (
            ({"reward_model_id": reward.id}, f"reward model {reward.id}"),
            ({"parent_policy_id": policy.id}, f"policy {policy.id}"),
            ({"heldout_reward_model_id": reward.id}, f"held-out reward model {reward.id}"),
        ):
            with pytest.raises(InvalidInput) as exc:
                chaining.ppo_inputs(session, mine.id, **params)
            assert (
                exc.value.message == f"{what} belongs to project {theirs.id}, not project {mine.id}"
            )
        with pytest.raises(InvalidInput, match=f"belongs to project {theirs.id}"):
            generation.policy(session, policy.id, project_id=mine.id)
        assert generation.policy(session, policy.id, project_id=theirs.id).id == policy.id
        # The packaged default, not their newest policy, when none of mine is named.
        assert chaining.ppo_inputs(session, mine.id).parent is None
        assert chaining.ppo_inputs(session, mine.id).reward.id == own_reward.id
        queued = [
            jobs.enqueue_internal(session, mine.id, kind, params).id
            for kind, params in (
                ("ppo", {"parent_policy_id": policy.id}),
                ("generate", {"policy_id": policy.id, "prompts": "all"}),
            )
        ]
        ids = (mine.id, theirs.id, policy.id, own_reward.id)
    for _ in queued:
        assert worker_main.main(worker_settings, once=True) == ["failed"]
    mine_id, theirs_id, policy_id, own_reward_id = ids
    for job_id in queued:
        job = job_row(committed_factory, job_id)
        assert job.attempts == 1  # a final failure, not retried
        assert f"policy {policy_id} belongs to project {theirs_id}, not project {mine_id}" in (
            job.error or ""
        )
    with transaction(committed_factory) as session:
        assert session.scalars(select(Completion).where(Completion.source != "upload")).all() == []
        registered = session.scalars(
            select(ModelVersion.id).where(ModelVersion.project_id == mine_id)
        ).all()
        assert registered == [own_reward_id]  # no policy made from their snapshot


def _store_samples(
    db: Session, project: Project, policy: ModelVersion | None, prompt_ids: list[int]
) -> str:
    """What a generate job of `policy` stores (the real code path); returns its source."""
    source = generation.source_for(policy.id if policy else None)
    generation.store(
        db,
        project.id,
        {pid: [f"{source} answer to {pid}"] for pid in prompt_ids},
        source=source,
        model_version_id=policy.id if policy else None,
        metadata={},
        rng=random.Random(0),
        max_pairs=16,
        parent_source=generation.source_for(policy.parent_id) if policy else None,
    )
    return source


def test_ppo_never_starts_from_a_rejected_policys_descendants(db: Session, tmp_path: Path) -> None:
    """QA: policy 5 was rejected; PPO then started from policy 8, its unjudged child."""
    project = make_project(db, mode=ProjectMode.pairwise)
    annotator = make_user(db, Role.annotator)
    prompts = [make_prompt(db, project, [], text=f"question {i}").id for i in range(12)]
    _store_samples(db, project, None, prompts)
    reward = register(db, ModelKind.reward, tmp_path, project)
    base = {"base": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    held_up = register(
        db, ModelKind.policy, tmp_path, project, reward_model_id=reward.id, config=base
    )
    rejected = register(
        db, ModelKind.policy, tmp_path, project, reward_model_id=reward.id, config=base
    )
    source = _store_samples(db, project, rejected, prompts)
    for task in db.scalars(select(Task).order_by(Task.id)):
        sources = {
            c.id: c.source
            for c in db.scalars(select(Completion).where(Completion.id.in_(task.completion_ids)))
        }
        if source not in sources.values():
            continue
        new = next(c for c, s in sources.items() if s == source)
        old = next(c for c, s in sources.items() if s != source)
        db.add(
            Judgment(
                project_id=project.id,
                task_id=task.id,
                user_id=annotator.id,
                ranking=[[old], [new]],  # people prefer the default's answer every time
                display_order=list(task.completion_ids),
            )
        )
        task.judgment_count += 1
    db.flush()
    assert winrate.worse_than_parent_ids(db, project.id) == {rejected.id}
    child = register(db, ModelKind.policy, tmp_path, project, parent_id=rejected.id)
    grandchild = register(db, ModelKind.policy, tmp_path, project, parent_id=child.id)
    assert grandchild.state == "ready" and child.state == "ready"  # no verdict of their own

    # Not the newest policy (grandchild), nor its parent (child): their chain starts at a
    # rejected policy. The newest whose whole chain held up.
    assert chaining.ppo_inputs(db, project.id).parent.id == held_up.id  # type: ignore[union-attr]
    assert chaining.last_policy_that_held_up(db, project.id).id == held_up.id  # type: ignore[union-attr]
    # A child of the one that held up is a candidate again, the newest one.
    good_child = register(db, ModelKind.policy, tmp_path, project, parent_id=held_up.id)
    assert chaining.ppo_inputs(db, project.id).parent.id == good_child.id  # type: ignore[union-attr]
    # Named explicitly, a person's choice stands.
    named = chaining.ppo_inputs(db, project.id, parent_policy_id=grandchild.id)
    assert named.parent.id == grandchild.id  # type: ignore[union-attr]

    # Without a policy that held up: the packaged default.
    db.delete(good_child)
    db.flush()
    db.delete(held_up)
    db.flush()
    assert chaining.ppo_inputs(db, project.id).parent is None
