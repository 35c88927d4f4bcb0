"""`prefloop demo`: the bundled prompts, the simulated annotators' rule, the setup path (both
backends), annotators labelling a live server over HTTP, and (slow) one whole tiny iteration
through the real command, web app and worker subprocesses.
"""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
import threading
import tomllib
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.demo import annotators, preference, setup, watch
from app.main import create_app
from app.models import (
    Completion,
    Job,
    JobState,
    Judgment,
    ModelKind,
    ModelVersion,
    Project,
    Prompt,
    Role,
    Task,
    TaskState,
    User,
)
from app.services import chaining, jobs, model_registry, users
from app.settings import Settings
from tests.factories import make_task, make_user
from tests.live_server import serve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test backend, with the credentials file under a fresh artifact directory."""
    return settings.model_copy(update={"artifact_dir": tmp_path / "artifacts"})


# --- the bundled prompts ---------------------------------------------------------------------


def test_bundled_prompts_have_keywords_a_split_and_ship_in_the_wheel() -> None:
    prompts = setup.bundled_prompts()
    assert len(prompts) == 48
    assert len({p.external_id for p in prompts}) == 48
    assert all(p.text and p.keywords and all(k.strip() for k in p.keywords) for p in prompts)
    assert Counter(p.split for p in prompts) == {"train": 32, "heldout": 16}
    assert setup.keywords_by_id()["sleep"] == ("sleep", "bed", "screen")
    # package data: the file matches a pattern of pyproject's package-data for `app`
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["app"]
    assert any(fnmatch("demo/prompts.jsonl", pattern) for pattern in patterns)


# --- the simulated annotators' rule -----------------------------------------------------------


def test_the_rule_scores_keywords_length_repetition_and_finishing() -> None:
    keywords = ("sleep", "bed", "screen")
    good = preference.score(
        "Keep a fixed bed time, avoid screens late, and sleep in the dark.", keywords
    )
    assert (good.coverage, good.repetition, good.finished) == (1.0, 0.0, True)
    assert good.total == pytest.approx(2.0)
    assert preference.score("Go to bed early.", keywords).total == pytest.approx(2.0 / 3)
    # 40 words are free, each word past that costs 0.05
    forty = " ".join(f"w{i}" for i in range(40)) + "."
    sixty = " ".join(f"w{i}" for i in range(60)) + "."
    assert preference.score(forty, ()).total == pytest.approx(0.0)
    assert preference.score(sixty, ()).total == pytest.approx(-1.0)
    # "a b c a b c a b c": 7 trigrams, 3 distinct -> 4/7 repeat
    rep = preference.score("a b c a b c a b c.", ())
    assert rep.repetition == pytest.approx(4 / 7) and rep.total == pytest.approx(-3.0 * 4 / 7)
    cut = preference.score("Sleep is important because the body", keywords)
    assert not cut.finished and cut.total == pytest.approx(2.0 / 3 - 0.5)
    assert preference.score("  ", keywords).total == preference.EMPTY_SCORE
    assert preference.keyword_coverage(["sleeping"], ["sleep"]) == 1.0  # prefix match
    assert preference.keyword_coverage(["asleep"], ["sleep"]) == 0.0


def test_the_documented_preference_is_what_annotators_prefer() -> None:
    keywords = ("water", "minute", "boil")
    pairs = [  # (preferred, other): one rule at a time
        ("Boil water, add the egg, wait nine minutes.", "Eggs are a great breakfast food."),
        (
            "Boil the egg in water for nine minutes.",
            "Boil the egg in water for nine minutes, "
            + "then " * 0
            + " ".join(["and", "you", "can", "also", "think", "about", "lunch"] * 6)
            + ".",
        ),
        (
            "Boil water, then cook the egg for nine minutes.",
            "Boil water boil water boil water boil water for minutes.",
        ),
        ("Boil water and cook the egg for nine minutes.", "Boil water and cook the egg for nine"),
    ]
    for better, worse in pairs:
        p = preference.preference_probability(better, worse, keywords, 0.5)
        assert p > 0.8, (better, worse, p)
        assert preference.preference_probability(worse, better, keywords, 0.5) == pytest.approx(
            1 - p
        )
    # Bradley–Terry noise: the choice frequency matches sigmoid(diff / temperature)
    a, b = "Boil water for a minute.", "Boil it."  # coverage 1 vs 1/3: diff 4/3
    expected = 1 / (1 + math.exp(-(4 / 3) / 1.0))
    rng = random.Random(7)
    wins = sum(
        preference.choose([(1, a), (2, b)], keywords, rng, temperature=1.0) == 1
        for _ in range(4000)
    )
    assert abs(wins / 4000 - expected) < 0.03
    # each annotator's stream is its own and reproducible
    first = [preference.annotator_rng(0, "sim-1").random() for _ in range(2)]
    assert first == [preference.annotator_rng(0, "sim-1").random() for _ in range(2)]
    assert (
        preference.annotator_rng(0, "sim-1").random()
        != preference.annotator_rng(0, "sim-2").random()
    )
    with pytest.raises(ValueError, match="2 candidates"):
        preference.choose([(1, a)], keywords, rng)


# --- setup (both backends) --------------------------------------------------------------------


def _generate_jobs(session: Session, project_id: int) -> list[Job]:
    return list(
        session.scalars(
            select(Job)
            .where(Job.project_id == project_id, Job.kind == jobs.GENERATE)
            .order_by(Job.id)
        )
    )


def test_prepare_creates_the_project_loop_and_first_jobs_once(
    db: Session, demo_settings: Settings
) -> None:
    config = setup.DemoConfig()
    made = setup.prepare(db, demo_settings, config)
    assert made.created and made.prompts == 48
    project = db.get(Project, made.project_id)
    assert project is not None and project.name == setup.PROJECT_NAME
    assert project.instructions == setup.INSTRUCTIONS and project.judgments_per_task == 1
    stored = {
        p.external_id: p for p in db.scalars(select(Prompt).where(Prompt.project_id == project.id))
    }
    assert set(stored) == {p.external_id for p in setup.bundled_prompts()}
    assert stored["sleep"].metadata_["keywords"] == ["sleep", "bed", "screen"]
    assert db.scalar(select(func.count()).select_from(Completion)) == 0  # answers come from jobs

    loop = chaining.get_loop(db, project.id)
    sizes = setup.PRESETS["cpu"]
    assert loop["reward_every_n_judgments"] == sizes.reward_every
    assert loop["ppo_after_reward"] is True and loop["generate_after_policy"] is True
    assert loop["reward_params"] == sizes.reward
    assert loop["ppo_params"] == {**sizes.ppo, "prompts": made.train_ids, "seed": 0}
    assert loop["generate_params"] == {**sizes.generate, "prompts": made.heldout_ids}
    assert len(made.train_ids) == 32 and len(made.heldout_ids) == 16
    assert not set(made.train_ids) & set(made.heldout_ids)

    first, parents = _generate_jobs(db, project.id)
    assert [first.id, parents.id] == made.queued_job_ids
    assert first.state is JobState.queued and parents.state is JobState.queued
    assert first.params == {**sizes.first_generate, "prompts": made.train_ids, "seed": 0}
    assert parents.params == {**sizes.parent_answers, "prompts": made.heldout_ids, "seed": 0}
    assert parents.params["n"] == 1  # one parent answer per held-out prompt: no task to label

    again = setup.prepare(db, demo_settings, config)
    assert (again.project_id, again.created, again.queued_job_ids) == (project.id, False, [])
    assert len(_generate_jobs(db, project.id)) == 2
    assert db.scalar(select(func.count()).select_from(Prompt)) == 48

    # A failed first job is queued again on the next run (not the succeeded/queued ones).
    for job in _generate_jobs(db, project.id):
        job.state = JobState.failed
    db.flush()
    assert len(setup.prepare(db, demo_settings, config).queued_job_ids) == 2


def test_reset_keeps_the_old_project_renamed_and_stopped(
    db: Session, demo_settings: Settings
) -> None:
    old = setup.prepare(db, demo_settings, setup.DemoConfig())
    new = setup.prepare(db, demo_settings, setup.DemoConfig(), reset=True)
    assert new.created and new.project_id != old.project_id and len(new.queued_job_ids) == 2
    renamed = db.get(Project, old.project_id)
    assert renamed is not None and renamed.name.startswith(f"{setup.PROJECT_NAME} (reset ")
    assert chaining.get_loop(db, old.project_id)["reward_every_n_judgments"] is None
    assert chaining.get_loop(db, old.project_id)["ppo_after_reward"] is False
    assert {j.state for j in _generate_jobs(db, old.project_id)} == {JobState.cancelled}
    assert setup.find_project(db).id == new.project_id  # type: ignore[union-attr]


def test_tiny_configuration_starts_from_a_registered_policy_and_backbone(
    db: Session, demo_settings: Settings, tmp_path: Path
) -> None:
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    config = setup.DemoConfig(preset="tiny", policy_dir=policy_dir, reward_backbone="/m/backbone")
    made = setup.prepare(db, demo_settings, config)
    base = db.get(ModelVersion, made.base_policy_id)
    assert base is not None and base.kind is ModelKind.policy
    assert base.config == {"role": setup.BASE_POLICY_ROLE}
    assert all(j.params["policy_id"] == base.id for j in _generate_jobs(db, made.project_id))
    loop = chaining.get_loop(db, made.project_id)
    assert loop["reward_params"]["backbone"] == "/m/backbone"
    assert loop["ppo_params"]["total_steps"] == setup.PRESETS["tiny"].ppo["total_steps"]
    # registered once, also across runs
    assert setup.prepare(db, demo_settings, config).base_policy_id == base.id
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        setup.DemoConfig(preset="huge").sizes  # noqa: B018


def test_accounts_are_made_once_and_their_passwords_kept(
    db: Session, demo_settings: Settings
) -> None:
    admin, annotator = setup.ensure_accounts(db, demo_settings)
    assert (admin.username, annotator.username) == ("admin", "demo")
    assert admin.password and annotator.password
    assert users.authenticate(db, "admin", admin.password).role is Role.admin
    assert users.authenticate(db, "demo", annotator.password).role is Role.annotator
    path = setup.credentials_path(demo_settings)
    assert path.stat().st_mode & 0o077 == 0  # owner only
    assert setup.ensure_accounts(db, demo_settings) == (admin, annotator)

    tokens = setup.simulated_tokens(db, 3)
    assert [name for name, _ in tokens] == ["sim-1", "sim-2", "sim-3"]
    for name, token in tokens:
        user = users.user_for_token(db, token)
        assert (user.username, user.role, user.password_hash) == (name, Role.annotator, None)
    assert len(setup.simulated_tokens(db, 2)) == 2  # reused accounts, new tokens
    assert db.scalar(select(func.count()).select_from(User).where(User.username.like("sim-%"))) == 3


def test_another_admin_is_reused_without_a_password(
    db: Session, tmp_path: Path, settings: Settings
) -> None:
    make_user(db, Role.admin, "root")
    admin, _ = setup.ensure_accounts(db, settings.model_copy(update={"artifact_dir": tmp_path}))
    assert admin == setup.Account("root", None)
    assert db.scalar(select(User).where(User.username == "admin")) is None


# --- watching the loop ---------------------------------------------------------------------------


def _job(state: str, kind: str = "ppo", **fields: object) -> watch.JobView:
    base: dict[str, object] = {
        "id": 4,
        "kind": kind,
        "state": state,
        "params": {"trigger": "chain", "after_job": 3},
        "progress": {},
        "metrics": {},
        "error": None,
    }
    base.update(fields)
    return watch.JobView(**base)  # type: ignore[arg-type]


def _loop(*job_views: watch.JobView, judgments: int = 0) -> watch.LoopView:
    return watch.LoopView(
        list(job_views), judgments, open_tasks=2, done_tasks=judgments, policies=[]
    )


def test_the_narrator_says_each_stage_once_and_throttles_progress() -> None:
    narrator = watch.Narrator()
    assert narrator.update(_loop(_job("queued")), 0.0) == [
        "ppo job 4 queued (loop, after job 3)",
        "labels: 0 judgments so far, 2 tasks open, 0 done",
    ]
    step = {"stage": "training", "step": 1, "total_steps": 8, "reward_mean": 0.5, "kl": 0.01}
    lines = narrator.update(_loop(_job("running", progress=step)), 1.0)
    assert lines[0] == "ppo job 4 started"
    assert lines[1].startswith("ppo job 4: PPO step 1/8, reward 0.500, KL 0.010")
    step2 = {**step, "step": 2}
    assert narrator.update(_loop(_job("running", progress=step2)), 5.0) == []  # too soon
    assert narrator.update(_loop(_job("running", progress=step2)), 17.0)[0].startswith(
        "ppo job 4: PPO step 2/8"
    )
    done = {"model_version_id": 9, "best_step": 8, "steps": 8, "reward_mean": 0.7, "kl": 0.2}
    assert narrator.update(_loop(_job("succeeded", metrics=done), judgments=3), 18.0) == [
        "ppo job 4 done: policy 9: best step 8 of 8, reward 0.700, KL 0.200 (- s)",
        "labels: 3 judgments so far, 2 tasks open, 3 done",
    ]
    failed = _job(
        "failed", id=5, kind="reward", params={"trigger": "auto"}, error="JobError: x\ntb"
    )
    assert narrator.update(_loop(failed, judgments=3), 30.0) == [
        "reward job 5 queued (every-N-judgments schedule)",
        "reward job 5 FAILED: JobError: x",
    ]


def test_an_iteration_ends_when_the_policys_pairs_are_judged(db: Session, tmp_path: Path) -> None:
    made = setup.prepare(db, Settings(artifact_dir=tmp_path), setup.DemoConfig())
    project = db.get(Project, made.project_id)
    assert project is not None
    reward = model_registry.register(
        db, kind=ModelKind.reward, artifact_path=tmp_path, project_id=project.id
    )
    policy = model_registry.register(
        db,
        kind=ModelKind.policy,
        artifact_path=tmp_path,
        project_id=project.id,
        reward_model_id=reward.id,
        metrics={"kl": 0.25},
    )
    assert watch.pairs_progress(db, project.id, policy.id) == watch.PairsProgress(False, 0, 0)
    jobs.enqueue(
        db, project.id, jobs.GENERATE, {"policy_id": policy.id}, None
    ).state = JobState.succeeded
    annotator = make_user(db)
    tasks = []
    for external_id in made.heldout_ids[:4]:
        prompt = db.scalar(select(Prompt).where(Prompt.external_id == external_id))
        assert prompt is not None
        parent = Completion(prompt_id=prompt.id, text="parent", source="policy:default")
        new = Completion(prompt_id=prompt.id, text="new", source=f"policy:{policy.id}")
        db.add_all([parent, new])
        db.flush()
        tasks.append(
            (make_task(db, project, prompt, completion_ids=[parent.id, new.id]), parent, new)
        )
    progress = watch.pairs_progress(db, project.id, policy.id)
    assert progress == watch.PairsProgress(True, 4, 0) and not progress.finished
    for i, (task, parent, new) in enumerate(tasks):
        winner, loser = (new, parent) if i < 3 else (parent, new)  # 3 wins, 1 loss
        db.add(
            Judgment(
                project_id=project.id,
                task_id=task.id,
                user_id=annotator.id,
                ranking=[[winner.id], [loser.id]],
                display_order=[parent.id, new.id],
            )
        )
        task.judgment_count, task.state = 1, TaskState.done
    db.flush()
    assert watch.pairs_progress(db, project.id, policy.id).finished
    # A child policy's pairs show the parent's answers too: they are the child's, not its.
    child = model_registry.register(
        db,
        kind=ModelKind.policy,
        artifact_path=tmp_path,
        project_id=project.id,
        parent_id=policy.id,
    )
    prompt = tasks[0][0].prompt
    newest = Completion(prompt_id=prompt.id, text="newest", source=f"policy:{child.id}")
    db.add(newest)
    db.flush()
    make_task(db, project, prompt, completion_ids=[tasks[0][2].id, newest.id])
    assert watch.pairs_progress(db, project.id, policy.id) == watch.PairsProgress(True, 4, 4)
    assert watch.pairs_progress(db, project.id, child.id) == watch.PairsProgress(False, 1, 0)
    result = watch.policy_result(db, project.id, policy.id)
    assert result is not None
    lines = watch.result_lines(result)
    assert lines[0].startswith(
        f"policy {policy.id}: human win rate vs parent (policy:default): 75% (95% CI "
    )
    assert "3 wins, 1 losses, 0 ties of 4" in lines[0]
    assert "predicted win rate on the same pairs: n/a (0 of 4 pairs scored)" in lines[1]
    assert lines[2] == "  KL from the reference: 0.250 nats"
    loop = watch.view(db, project.id)
    assert loop.policies == [policy.id, child.id] and loop.judgments == 4
    assert (loop.open_tasks, loop.done_tasks) == (1, 4)


# --- simulated annotators against a live server (both backends) -------------------------------


def test_simulated_annotators_label_over_http_without_duplicates(
    committed_factory: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    demo_settings = settings.model_copy(update={"artifact_dir": tmp_path})
    with transaction(committed_factory) as session:
        made = setup.prepare(session, demo_settings, setup.DemoConfig())
        project = session.get(Project, made.project_id)
        assert project is not None
        project.judgments_per_task = 2  # two different annotators per pair
        for external_id in made.train_ids[:12]:
            prompt = session.scalar(select(Prompt).where(Prompt.external_id == external_id))
            assert prompt is not None
            keywords = " and ".join(setup.keywords_by_id()[external_id])
            good = Completion(prompt_id=prompt.id, text=f"It is about {keywords}.")
            bad = Completion(prompt_id=prompt.id, text="no no no no no no no no no no")
            session.add_all([good, bad])
            session.flush()
            make_task(session, project, prompt, completion_ids=[good.id, bad.id])
        tokens = setup.simulated_tokens(session, 3)
        project_id = project.id
    app = create_app(settings)
    try:
        with serve(app) as base:
            sims = [
                annotators.SimulatedAnnotator(
                    name, token, base, project_id, setup.keywords_by_id(), seed=1, think_s=0
                )
                for name, token in tokens
            ]
            stop = threading.Event()
            threads = [
                threading.Thread(target=s.run, args=(stop,), kwargs={"until_idle": True})
                for s in sims
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads)
            # a repeated POST with the same client_key is a replay, not a second judgment
            with sims[0]._client() as client:
                assert sims[0].label_once(client) is False  # nothing left: 204
    finally:
        app.state.engine.dispose()

    assert all(not s.tally.errors for s in sims), [s.tally.errors for s in sims]
    assert sum(s.tally.judged for s in sims) == 24
    with transaction(committed_factory) as session:
        rows = session.scalars(select(Judgment).where(Judgment.project_id == project_id)).all()
        assert len(rows) == 24
        assert len({(r.task_id, r.user_id) for r in rows}) == 24  # nobody judged a task twice
        assert len({r.client_key for r in rows}) == 24
        tasks = session.scalars(select(Task).where(Task.project_id == project_id)).all()
        assert all(t.state is TaskState.done and t.judgment_count == 2 for t in tasks)
        texts = {c.id: c.text for c in session.scalars(select(Completion))}
        preferred = sum(texts[r.ranking[0][0]].startswith("It is about") for r in rows)
        assert preferred >= 22  # the rule's clear favourite (p > 0.99 at temperature 0.5)


# --- the whole command, tiny (slow) ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_one_tiny_iteration_through_the_real_command(tmp_path: Path, backend: str) -> None:
    """`prefloop demo --simulate 3 --iterations 1` with tiny models: web app and worker as
    subprocesses, annotators over HTTP, reward → PPO → generate → win rate, then exit 0."""
    if backend != "sqlite":
        pytest.skip("runs its own SQLite database; once is enough")
    from worker.models import save_atomic, tiny_causal_lm, tiny_reward_model, tiny_tokenizer

    words = [f"w{i}" for i in range(20)] + ["water", "light", "sleep", "bed", "."]
    causal = tiny_tokenizer(words, kind="causal")
    save_atomic(tiny_causal_lm(len(causal), seed=0), causal, tmp_path / "policy", {})
    encoder = tiny_tokenizer(words)
    save_atomic(tiny_reward_model(len(encoder), seed=1), encoder, tmp_path / "backbone", {})
    env = {
        **os.environ,
        "PREFLOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}",
        "PREFLOOP_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    argv = [
        sys.executable,
        "-m",
        "app.cli",
        "demo",
        "--preset",
        "tiny",
        "--policy",
        str(tmp_path / "policy"),
        "--reward-backbone",
        str(tmp_path / "backbone"),
        "--simulate",
        "3",
        "--iterations",
        "1",
        "--port",
        str(_free_port()),
        "--timeout",
        "150",
    ]
    done = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200, check=False
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for expected in (
        "3 simulated annotators labelling through the API",
        "admin: admin  password: ",
        "reward job",
        "ppo job",
        "human win rate vs parent (policy:1)",
        "iteration 1 finished in",
    ):
        assert expected in out, out
    # Re-running reuses the project (and exits at once: iteration 1 is already done).
    again = subprocess.run(
        [*argv[:-2], "--timeout", "60"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(id 1, reused)" in again.stdout and "queued the first generate" not in again.stdout
    assert "iteration 1 finished before this run" in again.stdout


def test_the_command_refuses_bad_options_before_touching_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from app.cli import cli

    monkeypatch.setenv("PREFLOOP_DATABASE_URL", f"sqlite:///{tmp_path / 'demo.db'}")
    monkeypatch.setenv("PREFLOOP_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    runner = CliRunner()
    bad_preset = runner.invoke(cli, ["demo", "--preset", "huge"])
    assert bad_preset.exit_code == 2 and "unknown preset 'huge'" in bad_preset.output
    negative = runner.invoke(cli, ["demo", "--simulate", "-1"])
    assert negative.exit_code == 2 and "--simulate must be 0 or more" in negative.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = runner.invoke(cli, ["demo", "--port", str(port)])
    assert busy.exit_code == 1 and f"127.0.0.1:{port} is in use" in busy.output
    assert not (tmp_path / "demo.db").exists()  # nothing was set up
