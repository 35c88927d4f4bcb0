"""Completions sampled from a policy: which prompts get them, storing them, and their tasks.

A `generate` job (worker/runner.py) asks `select_prompts` what to sample for, samples outside
any transaction, then calls `store` in the transaction that finishes the job, so the new
completions and tasks appear exactly when the job succeeded (a retried job cannot store
twice). A completion's `source` names the policy that wrote it ("policy:12", or
"policy:default" for the packaged SmolLM2) and `model_version_id` links it into the lineage.

Tasks put the new samples in front of people where they teach the reward model most:
pairwise, each new sample against the previous policy's answer to the same prompt (the
question "did the new policy improve?"), or, for a prompt with nothing to compare against,
the new samples against each other (capped by app.domain.pairing); ranking, one task over up
to K candidates, new ones first.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.domain import pairing
from app.errors import InvalidInput
from app.models import (
    Completion,
    ModelKind,
    ModelVersion,
    ProjectMode,
    Prompt,
    Task,
    TaskState,
)
from app.services import chaining, projects, training_data

WAITING = "waiting"
"""Prompts with fewer than two completions: uploaded to be answered by a policy."""
ALL = "all"
HELDOUT = "heldout"
"""Prompts the reward model did not train on: never judged before its data cut-off, or put
in its evaluation split (or its held-out partner's half)."""
SELECTIONS = (WAITING, ALL, HELDOUT)
DEFAULT_SOURCE = "policy:default"
_CHUNK = 500

PromptValue = str | list[dict[str, str]]
Selection = str | list[str]


@dataclass(frozen=True)
class PromptInput:
    """A prompt as the sampler needs it: plain text, or chat messages."""

    id: int
    external_id: str
    prompt: PromptValue


@dataclass(frozen=True)
class StoreResult:
    completions_stored: int
    existing_duplicates: int  # sampled texts the prompt already had (from any source)
    tasks_created: int


def source_for(policy_id: int | None) -> str:
    return DEFAULT_SOURCE if policy_id is None else f"policy:{policy_id}"


def parse_selection(value: Any) -> Selection:
    """A job's `prompts` param: one of SELECTIONS, or a non-empty list of external ids."""
    if isinstance(value, str) and value in SELECTIONS:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(dict.fromkeys(value))
    raise InvalidInput(
        f"prompts must be one of {', '.join(SELECTIONS)} or a list of prompt ids, not {value!r}"
    )


def policy(session: Session, policy_id: int) -> chaining.ModelRef:
    """The policy model version a generate job samples from."""
    return chaining.ModelRef.of(
        chaining.model_of_kind(session, policy_id, ModelKind.policy, "policy")
    )


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def trained_prompt_ids(session: Session, reward_model: ModelVersion) -> set[int]:
    """Prompts whose judgments `reward_model` trained on (see HELDOUT)."""
    config = reward_model.config or {}
    cutoff = (config.get("data") or {}).get("max_judgment_id")
    if reward_model.project_id is None:
        return set()
    judged = training_data.judged_prompt_ids(
        session,
        reward_model.project_id,
        max_judgment_id=cutoff if isinstance(cutoff, int) else None,
    )
    return judged - {int(p) for p in config.get("heldout_prompt_ids") or []}


def select_prompts(
    session: Session,
    project_id: int,
    selection: Selection,
    *,
    limit: int | None = None,
    reward_model: ModelVersion | None = None,
) -> list[PromptInput]:
    """The prompts a job works on, highest priority first, then oldest first; at most `limit`.

    `reward_model` defines HELDOUT (without one, nothing has been trained on: every prompt
    is held out). A list of external ids must name prompts of the project, all of them, and
    keeps its own order.
    """
    projects.get(session, project_id)
    if limit is not None and limit < 1:
        raise InvalidInput("limit must be at least 1")
    stmt = (
        select(Prompt.id)
        .where(Prompt.project_id == project_id)
        .order_by(Prompt.priority.desc(), Prompt.id)
    )
    if selection == WAITING:
        completions = (
            select(func.count(Completion.id))
            .where(Completion.prompt_id == Prompt.id)
            .scalar_subquery()
        )
        stmt = stmt.where(completions < 2)
    ids: list[int] = []
    if isinstance(selection, list):
        found: dict[str, int] = {}
        for chunk in _chunks(selection):
            pairs = session.execute(
                select(Prompt.external_id, Prompt.id).where(
                    Prompt.project_id == project_id, Prompt.external_id.in_(chunk)
                )
            )
            found.update((external_id, pid) for external_id, pid in pairs)
        missing = [e for e in selection if e not in found]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise InvalidInput(f"{len(missing)} prompt id(s) not in project {project_id}: {shown}")
        ids = [found[e] for e in selection]
    else:
        ids = list(session.scalars(stmt))
        if selection == HELDOUT and reward_model is not None:
            trained = trained_prompt_ids(session, reward_model)
            ids = [i for i in ids if i not in trained]
    if limit is not None:
        ids = ids[:limit]
    rows: dict[int, Prompt] = {}
    for chunk in _chunks(ids):
        rows.update((p.id, p) for p in session.scalars(select(Prompt).where(Prompt.id.in_(chunk))))
    return [PromptInput(pid, rows[pid].external_id, _value(rows[pid])) for pid in ids]


def _value(prompt: Prompt) -> PromptValue:
    """Text as is; chat messages as the list of {role, content} the sampler templates."""
    if prompt.text is not None:
        return prompt.text
    return list(prompt.messages or [])


# --- pairing the new samples -------------------------------------------------------------------


def previous_ids(
    existing: Sequence[tuple[int, str]], source: str, parent_source: str | None
) -> list[int]:
    """What new samples of `source` are compared with: the parent policy's completions of the
    prompt when it has any, else those of the newest other source (an upload counts), else
    none. `existing` is (completion id, source) of the prompt's completions, in id order."""
    others = [(cid, src) for cid, src in existing if src != source]
    if not others:
        return []
    wanted = parent_source if any(src == parent_source for _, src in others) else others[-1][1]
    return [cid for cid, src in others if src == wanted]


def pair_with_previous(
    new_ids: Sequence[int], previous: Sequence[int], rng: random.Random
) -> list[tuple[int, int]]:
    """One (previous, new) pair per new sample, the previous ones taken in a seeded
    round-robin so each is used about equally. Pure."""
    if not previous:
        return []
    order = list(previous)
    rng.shuffle(order)
    return [(order[i % len(order)], new) for i, new in enumerate(new_ids)]


def candidate_sets(
    mode: ProjectMode,
    k: int,
    existing: Sequence[tuple[int, str]],
    existing_sets: set[frozenset[int]],
    new_ids: Sequence[int],
    *,
    source: str,
    parent_source: str | None,
    max_pairs: int,
    rng: random.Random,
) -> list[list[int]]:
    """The completion ids of each task to create for one prompt (pure; see the module doc)."""
    if not new_ids:
        return []
    if mode is ProjectMode.ranking:
        ids = sorted({cid for cid, _ in existing} | set(new_ids))
        chosen = pairing.ranking_set(ids, k, rng, prefer=set(new_ids))
        return [chosen] if chosen and frozenset(chosen) not in existing_sets else []
    previous = previous_ids(existing, source, parent_source)
    if previous:
        pairs = pair_with_previous(new_ids, previous, rng)
    else:
        pairs = pairing.pairs_for(list(new_ids), max_pairs, rng)
    return [list(pair) for pair in pairs if frozenset(pair) not in existing_sets]


# --- storing -----------------------------------------------------------------------------------


def store(
    session: Session,
    project_id: int,
    samples: Mapping[int, Sequence[str]],
    *,
    source: str,
    model_version_id: int | None,
    metadata: dict[str, Any],
    rng: random.Random,
    max_pairs: int,
    parent_source: str | None = None,
) -> StoreResult:
    """Store each sampled text its prompt does not have yet, then the tasks that show them.

    `samples` maps prompt id to texts (already deduplicated among themselves by the sampler).
    Prompts deleted meanwhile are skipped. Every task needs the project's
    `judgments_per_task`.
    """
    project = projects.get(session, project_id)
    prompt_ids = sorted(samples)
    live: set[int] = set()
    existing: dict[int, list[tuple[int, str]]] = defaultdict(list)
    texts: dict[int, set[str]] = defaultdict(set)
    existing_sets: dict[int, set[frozenset[int]]] = defaultdict(set)
    for chunk in _chunks(prompt_ids):
        live.update(
            session.scalars(
                select(Prompt.id).where(Prompt.project_id == project.id, Prompt.id.in_(chunk))
            )
        )
        for pid, cid, text, src in session.execute(
            select(Completion.prompt_id, Completion.id, Completion.text, Completion.source)
            .where(Completion.prompt_id.in_(chunk))
            .order_by(Completion.id)
        ):
            existing[pid].append((cid, src))
            texts[pid].add(text)
        for pid, ids in session.execute(
            select(Task.prompt_id, Task.completion_ids).where(Task.prompt_id.in_(chunk))
        ):
            existing_sets[pid].add(frozenset(int(c) for c in ids))

    duplicates = 0
    added: dict[int, list[Completion]] = defaultdict(list)
    for pid in prompt_ids:
        if pid not in live:
            continue
        for text in samples[pid]:
            if text in texts[pid]:
                duplicates += 1
                continue
            texts[pid].add(text)
            added[pid].append(
                Completion(
                    prompt_id=pid,
                    text=text,
                    source=source,
                    model_version_id=model_version_id,
                    metadata_=dict(metadata),
                )
            )
    session.add_all([c for rows in added.values() for c in rows])
    session.flush()

    tasks: list[Task] = []
    for pid in sorted(added):
        sets = candidate_sets(
            project.mode,
            project.candidates_per_task,
            existing[pid],
            existing_sets[pid],
            [c.id for c in added[pid]],
            source=source,
            parent_source=parent_source,
            max_pairs=max_pairs,
            rng=rng,
        )
        tasks.extend(
            Task(
                project_id=project.id,
                prompt_id=pid,
                completion_ids=ids,
                required_judgments=project.judgments_per_task,
                judgment_count=0,
                is_gold=False,
                priority=0,
                state=TaskState.open,
            )
            for ids in sets
        )
    session.add_all(tasks)
    session.flush()
    return StoreResult(
        completions_stored=sum(len(rows) for rows in added.values()),
        existing_duplicates=duplicates,
        tasks_created=len(tasks),
    )
