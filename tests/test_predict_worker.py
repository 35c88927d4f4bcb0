"""The model in the labeling loop, end to end: real tiny reward and generate jobs score the
open tasks' completions (worker/predict.py), store the scores and task predictions, and the
claim code then hands out the reward model's closest calls first.

The reward model is trained on the planted preference of tests/test_worker.py ("good" beats
"bad"), so after training it is sure about good-vs-bad pairs and unsure about pairs whose
two answers carry the same marker: exactly what uncertainty sampling should ask people about.
"""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.domain.active import closest_pair_uncertainty
from app.models import (
    Completion,
    CompletionScore,
    JobState,
    ModelKind,
    ModelVersion,
    Project,
    Prompt,
    Role,
    Task,
    TaskPrediction,
    TaskState,
)
from app.services import chaining, jobs, model_registry, tasks
from app.settings import Settings
from tests.factories import make_project, make_prompt, make_task, make_user
from tests.test_worker import (  # noqa: F401  (backbone is a fixture)
    FILLER,
    WORDS,
    backbone,
    enqueue,
    job_row,
    seed_planted,
    tiny_params,
)
from worker import main as worker_main
from worker import predict
from worker.models import save_atomic, tiny_causal_lm, tiny_reward_model, tiny_tokenizer
from worker.reward import score


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; other test runs share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def worker_settings(backend_settings: Settings, tmp_path: Path) -> Settings:
    return backend_settings.model_copy(update={"artifact_dir": tmp_path / "artifacts"})


@pytest.fixture
def sqlite_only(backend: str) -> None:
    """Listed before committed_factory, so Postgres skips before emptying its tables."""
    if backend != "sqlite":
        pytest.skip("model-heavy end-to-end test: run once, on SQLite")


def add_open_pairs(factory: sessionmaker[Session], project_id: int) -> dict[str, list[int]]:
    """Unjudged tasks: 6 good-vs-bad pairs ("contrast") and 6 pairs whose answers carry the
    same marker ("same": good and good, or bad and bad)."""
    rng = random.Random(1)
    made: dict[str, list[int]] = {"contrast": [], "same": []}
    with transaction(factory) as session:
        project = session.get(Project, project_id)
        assert project is not None
        for i in range(12):
            kind = "contrast" if i % 2 else "same"
            markers = (
                ("good", "bad") if kind == "contrast" else [("good",) * 2, ("bad",) * 2][i // 2 % 2]
            )
            texts = [f"{' '.join(rng.choices(FILLER, k=2))} {m}" for m in markers]
            prompt = make_prompt(session, project, texts, text=" ".join(rng.choices(FILLER, k=3)))
            made[kind].append(make_task(session, project, prompt).id)
    return made


def open_tasks(session: Session, project_id: int) -> list[Task]:
    return list(
        session.scalars(
            select(Task).where(Task.project_id == project_id, Task.state == TaskState.open)
        )
    )


def scores_by_model(session: Session, model_id: int) -> dict[int, float]:
    rows = session.execute(
        select(CompletionScore.completion_id, CompletionScore.score).where(
            CompletionScore.model_version_id == model_id
        )
    )
    return {cid: s for cid, s in rows}


def test_a_reward_job_scores_the_open_tasks_and_claims_follow_its_doubts(
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    backbone: Path,  # noqa: F811
) -> None:
    project_id, _, _ = seed_planted(committed_factory, 160)
    pairs = add_open_pairs(committed_factory, project_id)
    job_id = enqueue(
        committed_factory, project_id, "reward", tiny_params(backbone, heldout_split=True)
    )
    seen: list[dict[str, Any]] = []

    outcomes = worker_main.main(
        worker_settings, once=True, heartbeat_every_s=0.2, on_progress=seen.append
    )

    assert outcomes == ["succeeded"]
    job = job_row(committed_factory, job_id)
    assert job.state is JobState.succeeded and job.progress["stage"] == "done"
    main_id, partner_id = job.metrics["model_version_id"], job.metrics["heldout_model_version_id"]
    scoring = [p for p in seen if p.get("stage") == "scoring"]
    assert {p["scoring_model"] for p in scoring} == {"main", "heldout"}
    assert scoring[-1]["scored_prompts"] == scoring[-1]["prompts_to_score"] == 160 + 12

    with transaction(committed_factory) as session:
        open_now = open_tasks(session, project_id)
        shown = {c for t in open_now for c in t.completion_ids}
        main_scores = scores_by_model(session, main_id)
        partner_scores = scores_by_model(session, partner_id)
        rows = {p.task_id: p for p in session.scalars(select(TaskPrediction))}
        prompt = session.get(Task, pairs["same"][0]).prompt  # type: ignore[union-attr]
        texts = [c.text for c in prompt.completions]
        ids = [c.id for c in prompt.completions]
        main_path = session.get(ModelVersion, main_id).artifact_path  # type: ignore[union-attr]
    assert len(open_now) == 172 and set(main_scores) == set(partner_scores) == shown
    recorded = dict(job.metrics["predictions"])
    assert recorded.pop("scoring_time_s") > 0
    assert recorded == {
        "scored": {"main": 344, "heldout": 344},
        "stored": {"main": 344, "heldout": 344},
        "models": {"main": main_id, "heldout": partner_id},
        "tasks_predicted": 172,
        "tasks_unscored": 0,
    }
    # Stored scores are what the served model says (same prompt rendering and batching).
    assert [main_scores[i] for i in ids] == pytest.approx(
        score(main_path, prompt.text, texts), abs=1e-4
    )
    assert set(rows) == {t.id for t in open_now}
    assert all(
        (r.reward_model_id, r.heldout_model_id) == (main_id, partner_id)
        and r.disagreement is not None
        for r in rows.values()
    )
    # The trained model is unsure exactly where the answers carry the same marker.
    same = [rows[t].uncertainty for t in pairs["same"]]
    contrast = [rows[t].uncertainty for t in pairs["contrast"]]
    assert sum(same) / len(same) < sum(contrast) / len(contrast), (same, contrast)

    with transaction(committed_factory) as session:
        chaining.update_loop(
            session, project_id, {"assignment_strategy": "uncertainty", "random_share": 0}
        )
        user = make_user(session, Role.annotator)
        got = tasks.claim_next(
            session, project_id, user, now=datetime.now(UTC), rng=random.Random(0)
        )
    assert got.task.id == min(rows.values(), key=lambda r: (r.uncertainty, r.task_id)).task_id


def test_scoring_trouble_never_fails_the_reward_job(
    sqlite_only: None,
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    backbone: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash while scoring is recorded on the job, which succeeds with its model; a stop
    signal while scoring ends the scoring, not the job."""
    project_id, _, _ = seed_planted(committed_factory, 40)
    job_id = enqueue(committed_factory, project_id, "reward", tiny_params(backbone, epochs=1))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected scoring failure")

    with monkeypatch.context() as patch:  # fault injection: the model loads, scoring dies
        patch.setattr(predict, "score_texts", broken)
        assert worker_main.main(worker_settings, once=True) == ["succeeded"]
    job = job_row(committed_factory, job_id)
    assert job.metrics["predictions"]["error"] == (
        "scoring failed: RuntimeError: injected scoring failure"
    )
    with transaction(committed_factory) as session:
        assert session.get(ModelVersion, job.metrics["model_version_id"]) is not None
        assert session.scalars(select(CompletionScore)).all() == []
        assert session.scalars(select(TaskPrediction)).all() == []

    job_id = enqueue(committed_factory, project_id, "reward", tiny_params(backbone, epochs=1))
    stop = threading.Event()

    def sigterm_when_scoring(progress: dict[str, Any]) -> None:
        if progress.get("stage") == "scoring":
            stop.set()  # what the SIGTERM handler does

    outcomes = worker_main.main(
        worker_settings, once=True, stop=stop, on_progress=sigterm_when_scoring
    )
    assert outcomes == ["succeeded"]  # trained and registered; only the scoring was cut
    job = job_row(committed_factory, job_id)
    assert job.metrics["predictions"]["stopped"] is True
    assert job.metrics["predictions"]["tasks_unscored"] == 40
    with transaction(committed_factory) as session:
        assert session.get(ModelVersion, job.metrics["model_version_id"]) is not None


def test_a_generate_job_scores_its_samples_with_the_main_partner_and_policy_models(
    sqlite_only: None,
    committed_factory: sessionmaker[Session],
    worker_settings: Settings,
    tmp_path: Path,
) -> None:
    causal = tiny_tokenizer(WORDS, kind="causal")
    save_atomic(tiny_causal_lm(len(causal), seed=0), causal, tmp_path / "policy", {})
    encoder = tiny_tokenizer(WORDS)
    for name, seed in (("own", 1), ("main", 2), ("partner", 3)):
        save_atomic(tiny_reward_model(len(encoder), seed=seed), encoder, tmp_path / name, {})

    def register(session: Session, kind: ModelKind, name: str, project_id: int, **kw: Any):  # type: ignore[no-untyped-def]
        return model_registry.register(
            session, kind=kind, artifact_path=tmp_path / name, project_id=project_id, **kw
        )

    with transaction(committed_factory) as session:
        project = make_project(session)
        waiting = make_prompt(session, project, [], text="w1 w2 w3")
        uploaded = make_prompt(session, project, ["good w1", "bad w2"], text="w4 w5")
        make_task(session, project, uploaded)
        own = register(session, ModelKind.reward, "own", project.id)
        policy = register(session, ModelKind.policy, "policy", project.id, reward_model_id=own.id)
        main = register(session, ModelKind.reward, "main", project.id)
        partner = register(
            session,
            ModelKind.reward,
            "partner",
            project.id,
            config={"role": "heldout", "pair_of": main.id},
        )
        params = {
            "policy_id": policy.id,
            "n": 4,
            "max_new_tokens": 2,
            "seed": 5,
            "prompts": "all",
            "device": "cpu",
        }
        job_id = jobs.enqueue(session, project.id, "generate", params, None).id
        ids = {"own": own.id, "main": main.id, "partner": partner.id}
        project_id, prompt_ids = project.id, (waiting.id, uploaded.id)

    assert worker_main.main(worker_settings, once=True) == ["succeeded"]

    job = job_row(committed_factory, job_id)
    with transaction(committed_factory) as session:
        made = session.scalars(
            select(Completion).where(Completion.source == f"policy:{policy.id}")
        ).all()
        every = session.scalars(
            select(Completion).where(Completion.prompt_id.in_(prompt_ids))
        ).all()
        by_model = {name: scores_by_model(session, mid) for name, mid in ids.items()}
        open_now = open_tasks(session, project_id)
        rows = {p.task_id: p for p in session.scalars(select(TaskPrediction))}
        up = session.get(Prompt, uploaded.id)
        up_texts = [c.text for c in up.completions]  # type: ignore[union-attr]
        up_ids = [c.id for c in up.completions]  # type: ignore[union-attr]
    assert made and job.metrics["tasks_created"] > 0
    # Every completion of the sampled prompts, new and uploaded, scored by all three models.
    for name in ("main", "partner", "own"):
        assert set(by_model[name]) == {c.id for c in every}, name
    assert [by_model["main"][i] for i in up_ids] == pytest.approx(
        score(tmp_path / "main", "w4 w5", up_texts), abs=1e-4
    )
    assert job.metrics["predictions"]["stored"] == {
        "main": len(every),
        "heldout": len(every),
        "policy_reward": len(every),
    }
    assert set(rows) == {t.id for t in open_now}
    assert all(
        (r.reward_model_id, r.heldout_model_id) == (ids["main"], ids["partner"])
        for r in rows.values()
    )
    assert job.metrics["predictions"]["tasks_predicted"] == len(open_now)


def test_store_maps_scores_to_completions_by_prompt_and_text(
    committed_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Pending scores keyed by (prompt id, text) land on every completion with that text."""
    with transaction(committed_factory) as session:
        project = make_project(session)
        prompt = make_prompt(session, project, ["a", "b", "a"])
        task = make_task(
            session, project, prompt, completion_ids=[c.id for c in prompt.completions][:2]
        )
        model = model_registry.register(
            session, kind=ModelKind.reward, artifact_path=tmp_path, project_id=project.id
        )
        job_id = jobs.enqueue(session, project.id, "generate", {}, None).id
        ids = [c.id for c in prompt.completions]
        project_id, prompt_id, task_id, model_id = project.id, prompt.id, task.id, model.id
    pending = predict.Pending(
        scores={predict.MAIN: {(prompt_id, "a"): 1.0, (prompt_id, "b"): 0.0}},
        model_ids={predict.MAIN: model_id},
        prompt_ids=[prompt_id],
    )
    outcome = predict.store(committed_factory, job_id, project_id, pending)
    assert outcome["stored"] == {"main": 3} and outcome["tasks_predicted"] == 1
    with transaction(committed_factory) as session:
        assert scores_by_model(session, model_id) == {ids[0]: 1.0, ids[1]: 0.0, ids[2]: 1.0}
        row = session.get(TaskPrediction, task_id)
        assert row is not None
        assert row.uncertainty == pytest.approx(closest_pair_uncertainty([1.0, 0.0]))
