"""Completion scores and task predictions (app.services.predictions), on both backends."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidInput, NotFound
from app.models import (
    CompletionScore,
    Job,
    ModelKind,
    ModelVersion,
    Project,
    ProjectMode,
    Task,
    TaskPrediction,
    TaskState,
)
from app.services import jobs, model_registry, predictions
from tests.factories import make_project, make_prompt, make_task


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def reward_model(db: Session, project: Project, tmp_path: Path) -> ModelVersion:
    return model_registry.register(
        db, kind=ModelKind.reward, artifact_path=tmp_path, project_id=project.id
    )


def prediction(db: Session, task: Task) -> TaskPrediction | None:
    db.expire_all()
    return db.get(TaskPrediction, task.id)


def test_store_scores_upserts_and_refuses_non_finite(db: Session, tmp_path: Path) -> None:
    project = make_project(db)
    prompt = make_prompt(db, project, ["a", "b"])
    a, b = (c.id for c in prompt.completions)
    model = reward_model(db, project, tmp_path)
    assert predictions.store_scores(db, model.id, {a: 1.5, b: -0.5}) == 2
    assert predictions.store_scores(db, model.id, {a: 2.0}) == 1  # a retried job: no conflict
    rows = db.execute(
        select(CompletionScore.completion_id, CompletionScore.score).where(
            CompletionScore.model_version_id == model.id
        )
    ).all()
    assert sorted(rows) == sorted([(a, 2.0), (b, -0.5)])
    assert predictions.scores_of(db, model.id, [a, b, 999_999]) == {a: 2.0, b: -0.5}
    with pytest.raises(InvalidInput, match=rf"non-finite scores for completion\(s\) \[{b}\]"):
        predictions.store_scores(db, model.id, {a: 1.0, b: math.nan})
    assert predictions.store_scores(db, model.id, {}) == 0


def test_predictions_from_stored_scores_for_pairwise_and_ranking_tasks(
    db: Session, tmp_path: Path
) -> None:
    project = make_project(db, mode=ProjectMode.ranking)
    pair = make_task(db, project, make_prompt(db, project, ["a", "b"]))
    ranked = make_task(db, project, make_prompt(db, project, ["x", "y", "z"]))
    main, heldout = reward_model(db, project, tmp_path), reward_model(db, project, tmp_path)
    a, b = pair.completion_ids
    x, y, z = ranked.completion_ids
    predictions.store_scores(db, main.id, {a: 1.0, b: 0.0, x: 0.0, y: 2.0, z: -0.25})
    predictions.store_scores(db, heldout.id, {a: 0.0, b: 1.0, x: 0.0, y: 0.0, z: 0.0})

    got = predictions.refresh_task_predictions(db, project.id, main.id, heldout.id)
    assert (got.predicted, got.unscored) == (2, 0)
    p = prediction(db, pair)
    assert p is not None and (p.reward_model_id, p.heldout_model_id) == (main.id, heldout.id)
    assert p.uncertainty == pytest.approx(sig(1.0) - 0.5)
    assert p.disagreement == pytest.approx(sig(1.0) - sig(-1.0))
    r = prediction(db, ranked)
    assert r is not None
    assert r.uncertainty == pytest.approx(sig(0.25) - 0.5)  # the closest pair: x vs z
    # main's pairs (x,y) sig(-2), (x,z) sig(.25), (y,z) sig(2.25); held-out all 0.5
    assert r.disagreement == pytest.approx(sig(2.25) - 0.5)

    # Without a held-out model: uncertainty only; a rescoring replaces the row.
    predictions.store_scores(db, main.id, {a: 0.0, b: 0.0})
    predictions.refresh_task_predictions(db, project.id, main.id)
    p = prediction(db, pair)
    assert p is not None and p.uncertainty == 0.0 and p.disagreement is None
    assert p.heldout_model_id is None
    assert len(db.scalars(select(TaskPrediction)).all()) == 2


def test_tasks_the_models_cannot_fully_score_lose_their_prediction(
    db: Session, tmp_path: Path
) -> None:
    project = make_project(db)
    t1 = make_task(db, project, make_prompt(db, project, ["a", "b"]))
    t2 = make_task(db, project, make_prompt(db, project, ["c", "d"]))
    old, new, partner = (reward_model(db, project, tmp_path) for _ in range(3))
    a, b = t1.completion_ids
    c, d = t2.completion_ids
    predictions.store_scores(db, old.id, {a: 0.0, b: 1.0, c: 0.0, d: 1.0})
    predictions.refresh_task_predictions(db, project.id, old.id)
    assert prediction(db, t2) is not None

    predictions.store_scores(db, new.id, {a: 0.0, b: 3.0, c: 0.0})  # d unscored by `new`
    predictions.store_scores(db, partner.id, {a: 0.0})  # partner scored only a
    got = predictions.refresh_task_predictions(db, project.id, new.id, partner.id)
    assert (got.predicted, got.unscored) == (1, 1)
    assert prediction(db, t2) is None  # old model's opinion is gone: t2 is unscored now
    p = prediction(db, t1)
    assert p is not None and p.reward_model_id == new.id
    assert p.disagreement is None and p.heldout_model_id is None  # partner did not score b


def test_only_open_non_gold_tasks_get_predictions_and_task_ids_narrow_it(
    db: Session, tmp_path: Path
) -> None:
    project = make_project(db)
    open_task = make_task(db, project, make_prompt(db, project, ["a", "b"]))
    done = make_task(db, project, make_prompt(db, project, ["c", "d"]), state=TaskState.done)
    gold = make_task(db, project, make_prompt(db, project, ["e", "f"]), is_gold=True)
    other = make_task(db, project, make_prompt(db, project, ["g", "h"]))
    model = reward_model(db, project, tmp_path)
    every = [c for t in (open_task, done, gold, other) for c in t.completion_ids]
    predictions.store_scores(db, model.id, dict.fromkeys(every, 0.0))

    got = predictions.refresh_task_predictions(db, project.id, model.id, task_ids=[open_task.id])
    assert (got.predicted, got.unscored) == (1, 0)
    assert prediction(db, other) is None
    predictions.refresh_task_predictions(db, project.id, model.id)
    assert {p.task_id for p in db.scalars(select(TaskPrediction))} == {open_task.id, other.id}
    assert predictions.open_task_ids(db, project.id, [open_task.prompt_id, done.prompt_id]) == [
        open_task.id
    ]
    with pytest.raises(NotFound):
        predictions.refresh_task_predictions(db, 999_999, model.id)


def test_unscored_completions_of_open_tasks(db: Session, tmp_path: Path) -> None:
    project = make_project(db)
    t1 = make_task(db, project, make_prompt(db, project, ["a", "b"]))
    prompt = make_prompt(db, project, ["c", "d", "e"])
    c, d, e = (x.id for x in prompt.completions)
    make_task(db, project, prompt, completion_ids=[c, d])
    make_task(db, project, prompt, completion_ids=[d, e], state=TaskState.done)
    model = reward_model(db, project, tmp_path)
    a, b = t1.completion_ids
    assert predictions.open_task_completions(db, project.id) == sorted([a, b, c, d])
    predictions.store_scores(db, model.id, {a: 0.0, d: 1.0})
    assert predictions.unscored_completions(db, project.id, model.id) == sorted([b, c])
    with pytest.raises(NotFound):
        predictions.unscored_completions(db, 999_999, model.id)


def test_scoring_inputs_group_by_prompt_and_render_chat_like_training(db: Session) -> None:
    project = make_project(db)
    plain = make_prompt(db, project, ["a", "b"], text="Say hi.")
    chat = make_prompt(
        db,
        project,
        ["x"],
        text=None,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    )
    ids = [c.id for c in (*plain.completions, *chat.completions)]
    got = predictions.scoring_inputs(db, ids)
    assert [(i.prompt_id, i.prompt) for i in got] == [
        (plain.id, "Say hi."),
        (chat.id, "user: hi\nassistant: yo"),
    ]
    assert got[0].completions == [(ids[0], "a"), (ids[1], "b")]
    assert got[1].completions == [(ids[2], "x")]
    keyed = predictions.completions_by_text(db, [plain.id])
    assert keyed == {(plain.id, "a"): [ids[0]], (plain.id, "b"): [ids[1]]}


def test_record_scoring_merges_into_the_job_metrics(db: Session) -> None:
    project = make_project(db)
    job = jobs.enqueue(db, project.id, "reward", {}, None)
    job.metrics = {"eval": {"accuracy": 0.9}, "predictions": {"scored": {"main": 4}}}
    db.flush()
    predictions.record_scoring(db, job.id, {"stored": {"main": 4}})
    db.expire_all()
    got = db.get(Job, job.id)
    assert got is not None and got.metrics == {
        "eval": {"accuracy": 0.9},
        "predictions": {"scored": {"main": 4}, "stored": {"main": 4}},
    }
    with pytest.raises(NotFound):
        predictions.record_scoring(db, 999_999, {})
