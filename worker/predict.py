"""Scoring the labeling queue with the reward models: the model in the labeling loop.

The active-learning strategies (app.domain.active) hand out first the tasks the reward models
are least sure about, which needs every open task's candidates scored by the current models
(app.services.predictions keeps the scores and the per-task predictions). Two jobs do it:

- reward: once its models are trained, every completion shown by the project's open tasks
  is scored with the new main model and its held-out partner; after the job succeeded the
  scores are stored and the project's task predictions replaced (`for_reward`);
- generate: once the samples are drawn, they are scored (with the prompts' older completions
  a model has not scored yet) by the project's main reward model, its held-out partner, and
  the reward model the policy was trained against; after the job succeeded the scores are
  stored under the new completions' ids and those prompts' tasks get predictions
  (`for_generate`). The policy's reward model's scores are what a predicted win rate is
  computed from (app.services.winrate).

Scores are computed while the job is still running but stored after it succeeded. Running,
the worker's heartbeat carries the scoring progress to the job page, and a cancel or a
shutdown reaches `should_stop`; once a job has succeeded its worker stops heartbeating it. The
rows the scores belong to (the new models, the new completions) exist only once the finishing
transaction commits, so the scores wait in memory in between (a float per completion), keyed
by (prompt id, completion text).

Scoring is a by-product of the job: a failure is logged and written to the job's
``metrics["predictions"]`` and never fails or undoes the job. `should_stop` ends scoring
early; what was scored is still stored, and unscored tasks are still handed out, after the
scored ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db import read_only, transaction
from app.models import ModelVersion, Prompt
from app.services import chaining, predictions, training_data

log = logging.getLogger("prefloop.worker.predict")

Report = Callable[[dict[str, Any]], None]
ShouldStop = Callable[[], bool]
Key = tuple[int, str]
"""A completion as scored before it has an id: (prompt id, text)."""

MAIN, HELDOUT, POLICY_REWARD = "main", "heldout", "policy_reward"
PROMPTS_PER_BATCH = 32
"""Prompts per scoring round: one progress report and one stop check each."""
GROUPS_PER_PASS = 8
"""Prompts (with all their completions) per forward pass."""


@dataclass(frozen=True)
class ToScore:
    """One prompt's texts to score, the prompt rendered as reward training renders it."""

    prompt_id: int
    prompt: str
    texts: list[str]


@dataclass(frozen=True)
class ScoringModel:
    """A reward model to score with: its role, where it is saved, its id once registered."""

    role: str  # MAIN | HELDOUT | POLICY_REWARD
    path: str
    model_id: int | None = None


@dataclass
class Pending:
    """Scores computed while the job ran, waiting for their rows to exist (see `store`)."""

    scores: dict[str, dict[Key, float]] = field(default_factory=dict)  # by role
    model_ids: dict[str, int] = field(default_factory=dict)  # by role, where known
    prompt_ids: list[int] = field(default_factory=list)
    whole_project: bool = False  # refresh every open task (a new main model), not the prompts'
    summary: dict[str, Any] = field(default_factory=dict)  # for metrics["predictions"]


# --- scoring -------------------------------------------------------------------------------


def _batches(items: Sequence[ToScore], size: int) -> Iterator[Sequence[ToScore]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def score_texts(
    model_dir: str | Path,
    items: Sequence[ToScore],
    *,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
    should_stop: ShouldStop = lambda: False,
) -> tuple[dict[Key, float], bool]:
    """Score every text of `items` with the reward model saved in `model_dir`.

    Returns the scores by (prompt id, text) and whether `should_stop` ended it early. Several
    prompts share a forward pass (length-grouped, as in training).
    """
    import torch

    from worker.reward import (
        PreferenceCollator,
        PreferenceGroup,
        RewardConfig,
        RewardScorer,
        encode_groups,
        score_encoded,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = RewardScorer.load(model_dir, device)
    config = RewardConfig(max_length=scorer.max_length)
    collate = PreferenceCollator(pad_token_id=scorer.tokenizer.pad_token_id)
    scores: dict[Key, float] = {}
    todo = [i for i in items if i.texts]
    done = 0
    for batch in _batches(todo, PROMPTS_PER_BATCH):
        if should_stop():
            return scores, True
        groups = [PreferenceGroup(str(i.prompt_id), i.prompt, i.texts, ranking=[]) for i in batch]
        encoded = encode_groups(groups, scorer.tokenizer, config)
        per_group = score_encoded(
            scorer.model, encoded, collate, GROUPS_PER_PASS, scorer.device, use_bf16=False
        )
        for item, values in zip(batch, per_group, strict=True):
            scored = zip(item.texts, values.tolist(), strict=True)
            scores.update(((item.prompt_id, text), float(s)) for text, s in scored)
        done += len(batch)
        on_batch(done, len(todo))
    return scores, False


def _score_all(
    models: Sequence[ScoringModel],
    items_for: Callable[[ScoringModel], Sequence[ToScore]],
    pending: Pending,
    report: Report,
    should_stop: ShouldStop,
) -> None:
    """Score with each model in turn into `pending`, reporting progress; a failure is
    recorded, not raised."""
    start = time.perf_counter()
    counts: dict[str, int] = {}
    try:
        for model in models:
            items = items_for(model)

            def on_batch(done: int, total: int, role: str = model.role) -> None:
                progress = {
                    "scoring_model": role,
                    "scored_prompts": done,
                    "prompts_to_score": total,
                }
                report({"stage": "scoring", **progress})

            report({"stage": "scoring", "scoring_model": model.role, "scored_prompts": 0})
            scores, stopped = score_texts(
                model.path, items, on_batch=on_batch, should_stop=should_stop
            )
            pending.scores[model.role] = scores
            counts[model.role] = len(scores)
            if stopped:
                pending.summary["stopped"] = True
                break
    except Exception as exc:  # scoring is a by-product: the job stands without it
        log.warning("scoring for active learning failed", exc_info=True)
        pending.summary["error"] = f"scoring failed: {type(exc).__name__}: {exc}"
    pending.summary.update(
        {
            "scored": counts,
            "scoring_time_s": round(time.perf_counter() - start, 3),
        }
    )


def for_reward(
    factory: sessionmaker[Session],
    project_id: int,
    models: Sequence[ScoringModel],
    *,
    report: Report,
    should_stop: ShouldStop,
) -> Pending:
    """Score the completions of the project's open tasks with a reward job's new models
    (MAIN first, then HELDOUT), before they are registered."""
    pending = Pending(whole_project=True)
    items: list[ToScore] = []
    try:
        with transaction(factory) as session:
            read_only(session)  # SQLite: a long read must not hold the write lock
            wanted = predictions.open_task_completions(session, project_id)
            inputs = predictions.scoring_inputs(session, wanted)
        items = [ToScore(i.prompt_id, i.prompt, [t for _, t in i.completions]) for i in inputs]
        pending.prompt_ids = [i.prompt_id for i in items]
    except Exception as exc:
        log.warning("reading the completions to score failed", exc_info=True)
        pending.summary["error"] = f"scoring failed: {type(exc).__name__}: {exc}"
        return pending
    _score_all(models, lambda _: items, pending, report, should_stop)
    return pending


def for_generate(
    factory: sessionmaker[Session],
    project_id: int,
    samples: Mapping[int, Sequence[str]],
    policy_reward_model_id: int | None,
    *,
    report: Report,
    should_stop: ShouldStop,
) -> Pending:
    """Score a generate job's samples (by prompt id), before they are stored, with the
    project's main reward model, its held-out partner and the policy's reward model (when it
    is another one), each also scoring the prompts' older completions it has not scored."""
    pending = Pending(prompt_ids=sorted(samples))
    try:
        with transaction(factory) as session:
            read_only(session)
            models = _generate_models(session, project_id, policy_reward_model_id)
            prompts = {
                pid: training_data.prompt_text(p)
                for pid in pending.prompt_ids
                if (p := session.get(Prompt, pid)) is not None
            }
            existing = predictions.completions_by_text(session, prompts)
            ids = {cid for cids in existing.values() for cid in cids}
            missing: dict[str, set[Key]] = {}
            for model in models:
                assert model.model_id is not None
                scored = predictions.scores_of(session, model.model_id, ids)
                missing[model.role] = {
                    key for key, cids in existing.items() if any(c not in scored for c in cids)
                }
    except Exception as exc:
        log.warning("reading the completions to score failed", exc_info=True)
        pending.summary["error"] = f"scoring failed: {type(exc).__name__}: {exc}"
        return pending
    if not models:
        pending.summary["skipped"] = "the project has no reward model yet"
        return pending
    pending.model_ids = {m.role: m.model_id for m in models if m.model_id is not None}

    def items_for(model: ScoringModel) -> list[ToScore]:
        texts: dict[int, dict[str, None]] = {pid: {} for pid in prompts}  # ordered sets
        for pid, sampled in samples.items():
            if pid in texts:
                texts[pid].update(dict.fromkeys(sampled))
        for pid, text in sorted(missing[model.role]):
            texts[pid][text] = None
        return [ToScore(pid, prompts[pid], list(texts[pid])) for pid in sorted(texts)]

    _score_all(models, items_for, pending, report, should_stop)
    return pending


def _generate_models(
    session: Session, project_id: int, policy_reward_model_id: int | None
) -> list[ScoringModel]:
    """The project's main reward model and its held-out partner, then the policy's reward
    model if it is neither."""
    models: list[ScoringModel] = []
    main = chaining.main_reward_model(session, project_id)
    if main is not None:
        models.append(ScoringModel(MAIN, main.artifact_path, main.id))
        partner = chaining.heldout_partner(session, main)
        if partner is not None:
            models.append(ScoringModel(HELDOUT, partner.artifact_path, partner.id))
    if policy_reward_model_id is not None and all(
        m.model_id != policy_reward_model_id for m in models
    ):
        own = session.get(ModelVersion, policy_reward_model_id)
        if own is not None:
            models.append(ScoringModel(POLICY_REWARD, own.artifact_path, own.id))
    return models


# --- storing, once the job succeeded --------------------------------------------------------


def store(
    factory: sessionmaker[Session],
    job_id: int,
    project_id: int,
    pending: Pending,
    model_ids: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Store `pending`'s scores under their completions' ids and refresh the task
    predictions, in one transaction of its own; the outcome goes to the job's
    ``metrics["predictions"]``. Never raises: the job has already succeeded."""
    if not pending.scores:
        return {}
    ids = {**pending.model_ids, **(model_ids or {})}
    try:
        with transaction(factory) as session:
            keys = predictions.completions_by_text(session, pending.prompt_ids)
            stored: dict[str, int] = {}
            for role, scores in pending.scores.items():
                by_id = {cid: s for key, s in scores.items() for cid in keys.get(key, ())}
                stored[role] = predictions.store_scores(session, ids[role], by_id)
            outcome: dict[str, Any] = {"stored": stored, "models": dict(ids)}
            if MAIN in pending.scores:
                task_ids = (
                    None
                    if pending.whole_project
                    else predictions.open_task_ids(session, project_id, pending.prompt_ids)
                )
                refreshed = predictions.refresh_task_predictions(
                    session,
                    project_id,
                    ids[MAIN],
                    ids.get(HELDOUT) if HELDOUT in pending.scores else None,
                    task_ids,
                )
                outcome |= {"tasks_predicted": refreshed.predicted}
                outcome |= {"tasks_unscored": refreshed.unscored}
            predictions.record_scoring(session, job_id, outcome)
        return outcome
    except Exception as exc:  # the job has succeeded; its scores are a by-product
        log.warning("storing the scores of job %s failed", job_id, exc_info=True)
        error = {"error": f"storing scores failed: {type(exc).__name__}: {exc}"}
        try:
            with transaction(factory) as session:
                predictions.record_scoring(session, job_id, error)
        except Exception:
            log.warning("recording the scoring failure of job %s failed", job_id, exc_info=True)
        return error
