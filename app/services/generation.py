"""Completions sampled from a policy: which prompts get them, storing them, and their tasks.

A `generate` job (worker/runner.py) asks `select_prompts` what to sample for, samples outside
any transaction, then calls `store` in the transaction that finishes the job, so the new
completions and tasks appear exactly when the job succeeded (a retried job cannot store
twice). A completion's `source` names the policy that wrote it ("policy:12", or
"policy:default" for the packaged SmolLM2) and `model_version_id` links it into the lineage.

Tasks put the new samples in front of people where they teach the reward model most:
pairwise, each new sample against the previous policy's answer to the same prompt (the
question "did the new policy improve?") and, when the lineage's first policy differs from the
parent and answered the prompt too, against the first policy's answer ("did the loop improve
on where it started?"; app.services.winrate turns both into win rates); for a prompt with
nothing to compare against, the new samples against each other (capped by
app.domain.pairing). Ranking: one task over up to K candidates, one of the parent's and one of
the first policy's answers kept in, the new ones filling the rest first.
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


def lineage_root(session: Session, policy_id: int | None) -> str | None:
    """The source of the first policy of `policy_id`'s lineage, what its samples are also
    compared with: walking parent links to the top, "policy:default" when the top policy was
    trained from the packaged model (a PPO run records its `base`), else the top policy
    itself (a checkpoint registered by hand starts its own chain). None for the packaged
    model itself."""
    if policy_id is None:
        return None
    seen: set[int] = set()
    model = session.get(ModelVersion, policy_id)
    while model is not None and model.parent_id is not None and model.id not in seen:
        seen.add(model.id)
        parent = session.get(ModelVersion, model.parent_id)
        if parent is None:
            break
        model = parent
    if model is None:
        return None
    return DEFAULT_SOURCE if (model.config or {}).get("base") else source_for(model.id)


def parse_selection(value: Any) -> Selection:
    """A job's `prompts` param: one of SELECTIONS, or a non-empty list of external ids."""
    if isinstance(value, str) and value in SELECTIONS:
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(dict.fromkeys(value))
    raise InvalidInput(
        f"prompts must be one of {', '.join(SELECTIONS)} or a list of prompt ids, not {value!r}"
    )


def policy(session: Session, policy_id: int, *, project_id: int) -> chaining.ModelRef:
    """The policy model version a generate job of `project_id` samples from: one of its own
    project's, never another's (its samples would be stored as this project's)."""
    return chaining.ModelRef.of(
        chaining.model_of_kind(
            session, policy_id, ModelKind.policy, "policy", project_id=project_id
        )
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


def baseline_groups(
    existing: Sequence[tuple[int, str]],
    source: str,
    parent_source: str | None,
    root_source: str | None,
) -> list[list[int]]:
    """The completion ids new samples of `source` are compared with, one group per baseline:
    `previous_ids` first, then the first policy's (`root_source`) when the prompt has some
    and they are not the previous group already."""
    previous = previous_ids(existing, source, parent_source)
    groups = [previous] if previous else []
    if root_source is not None and root_source != source:
        root = [cid for cid, src in existing if src == root_source]
        if root and set(root) != set(previous):
            groups.append(root)
    return groups


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


def _ranking_with_baselines(
    ids: Sequence[int],
    k: int,
    groups: Sequence[Sequence[int]],
    new: set[int],
    rng: random.Random,
) -> list[int]:
    """Up to k of `ids` for one ranking task: one answer of each baseline group (at most
    k - 1 of them, so a new sample fits), then new samples, then the others."""
    keep = [rng.choice(sorted(group)) for group in groups][: max(k - 1, 0)]
    slots = k - len(keep)
    fresh = [cid for cid in ids if cid in new]
    others = [cid for cid in ids if cid not in new and cid not in keep]
    picked = fresh if len(fresh) <= slots else rng.sample(fresh, slots)
    picked += rng.sample(others, min(slots - len(picked), len(others)))
    return sorted(set(keep) | set(picked))


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
    root_source: str | None = None,
) -> list[list[int]]:
    """The completion ids of each task to create for one prompt (pure; see the module doc)."""
    if not new_ids:
        return []
    groups = baseline_groups(existing, source, parent_source, root_source)
    if mode is ProjectMode.ranking:
        ids = sorted({cid for cid, _ in existing} | set(new_ids))
        if not groups:
            chosen = pairing.ranking_set(ids, k, rng, prefer=set(new_ids))
        else:
            chosen = _ranking_with_baselines(ids, k, groups, set(new_ids), rng)
        return [chosen] if len(chosen) >= 2 and frozenset(chosen) not in existing_sets else []
    if groups:
        pairs = [pair for group in groups for pair in pair_with_previous(new_ids, group, rng)]
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
    root_source: str | None = None,
) -> StoreResult:
    """Store each sampled text its prompt does not have yet, then the tasks that show them.

    `samples` maps prompt id to texts (already deduplicated among themselves by the sampler).
    Prompts deleted meanwhile are skipped. Every task needs the project's
    `judgments_per_task`. `root_source` (the lineage's first policy) defaults to what
    `lineage_root()` finds for `model_version_id`, so a caller naming only the parent still
    gets the pairs against the start.
    """
    project = projects.get(session, project_id)
    if root_source is None:
        root_source = lineage_root(session, model_version_id)
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
            root_source=root_source,
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
