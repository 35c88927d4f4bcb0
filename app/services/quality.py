"""The quality report of a project: agreement, consensus, source strengths and bias audits.

One pass over the project's judgments in task order (a server-side cursor, so memory holds
one batch, per-annotator counters and one time per judgment for the medians). The math lives
in app.domain (agreement, bias, bt); this module only reads rows and feeds it.

Judgments imported from public preference data (app.services.preference_import) were never
shown to anybody, so they carry no display order and no time: they count for agreement and
source strengths but not for the position and speed audits.
"""

from __future__ import annotations

import math
import random
from array import array
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.domain import agreement, bias, bt
from app.domain.rankings import tied_pairs, to_pairs
from app.models import Completion, Judgment, Task, User
from app.services import export, projects

BATCH_ROWS = 2000
_IN_CHUNK = 500
SEED = 0
EXTERNAL_KEY = "external_annotators"
"""projects.settings key listing the usernames of imported (external) annotators."""


@dataclass
class _Annotator:
    """Running counts for one annotator."""

    username: str
    active: bool
    judgments: int = 0
    agree: int = 0
    compared: int = 0
    first_won: int = 0
    position_n: int = 0
    longer_won: int = 0
    length_n: int = 0
    times: array = field(default_factory=lambda: array("q"))


@dataclass(frozen=True)
class Report:
    """Everything the quality page and ``GET /api/v1/projects/{id}/quality`` show."""

    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.data


def _proportion(p: bias.Proportion) -> dict[str, Any]:
    return {
        "k": p.k,
        "n": p.n,
        "rate": p.rate,
        "low": p.low,
        "high": p.high,
        "null": p.null,
        "p_value": p.p_value,
        "significant": p.significant,
    }


def _source_name(source: str, model_version_id: int | None) -> str:
    return f"model {model_version_id}" if model_version_id is not None else source


def _completion_facts(session: Session, ids: set[int]) -> dict[int, tuple[int, str]]:
    """Per completion id: (length in characters, source name)."""
    ordered = sorted(ids)
    found: dict[int, tuple[int, str]] = {}
    for start in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[start : start + _IN_CHUNK]
        query = select(
            Completion.id,
            func.length(Completion.text),
            Completion.source,
            Completion.model_version_id,
        ).where(Completion.id.in_(chunk))
        for cid, length, source, model_id in session.execute(query):
            found[int(cid)] = (int(length or 0), _source_name(source, model_id))
    return found


def _comparisons(
    ranking: Sequence[Sequence[int]], facts: Mapping[int, tuple[int, str]]
) -> list[bt.Comparison]:
    """A judgment's source comparisons: a win per strict pair, half each way per tie, and
    nothing for two completions from the same source (no information about sources)."""
    found: list[bt.Comparison] = []
    for better, worse, _ in to_pairs(ranking):
        a, b = facts[int(better)][1], facts[int(worse)][1]
        if a != b:
            found.append((a, b, 1.0))
    for x, y in tied_pairs(ranking):
        a, b = facts[int(x)][1], facts[int(y)][1]
        if a != b:
            found += [(a, b, 0.5), (b, a, 0.5)]
    return found


def report(
    session: Session,
    project_id: int,
    *,
    seed: int = SEED,
    fast_ms: int = bias.FAST_MS,
    replicates: int = bt.REPLICATES,
) -> Report:
    """Compute the project's quality report (deterministic for a given `seed`)."""
    project = projects.get(session, project_id)
    external = set((project.settings or {}).get(EXTERNAL_KEY) or [])
    people: dict[int, _Annotator] = {}
    matrix = agreement.Coincidences()
    methods: Counter[str] = Counter()
    signatures: Counter[bt.Signature] = Counter()
    length = bias.LengthCounts()
    agree_total = compared_total = tasks = overlapped = judgments = 0

    stmt = (
        select(
            Judgment.task_id,
            Judgment.user_id,
            export.json_text(Judgment.ranking, "ranking"),
            Judgment.none_acceptable,
            export.json_text(Judgment.display_order, "display_order"),
            Judgment.time_spent_ms,
            export.json_text(Task.completion_ids, "completion_ids"),
            User.username,
            User.active,
        )
        .join(Task, Task.id == Judgment.task_id)
        .join(User, User.id == Judgment.user_id)
        .where(Judgment.project_id == project_id)
        .order_by(Judgment.task_id, Judgment.id)
        .execution_options(yield_per=BATCH_ROWS)
    )
    pending: list[Any] = []
    facts: dict[int, tuple[int, str]] = {}

    def finish_task(group: list[Any]) -> None:
        nonlocal agree_total, compared_total, tasks, overlapped
        tasks += 1
        rankings = [r.ranking for r in group]
        if len(group) >= 2:
            overlapped += 1
            summary = agreement.summarize([(r.user_id, r.ranking) for r in group])
            methods[summary.consensus.method] += 1
            agree_total += summary.agree
            compared_total += summary.compared
            for who, (agree, compared) in summary.with_others.items():
                person = people[int(who)]  # type: ignore[call-overload]
                person.agree += agree
                person.compared += compared
            for unit in agreement.relation_units(rankings):
                matrix.add_relations(unit)
        else:
            methods[agreement.SINGLE] += 1

    current: Hashable = None
    for batch in session.connection().execute(stmt).partitions():
        ids = {int(c) for r in batch for c in r.completion_ids}
        facts = _completion_facts(session, ids)
        for r in batch:
            judgments += 1
            person = people.get(r.user_id)
            if person is None:
                person = people[r.user_id] = _Annotator(r.username, bool(r.active))
            person.judgments += 1
            if r.time_spent_ms is not None:
                person.times.append(int(r.time_spent_ms))
            signature = bt.signature(_comparisons(r.ranking, facts))
            if signature:
                signatures[signature] += 1
            _audit_display(r, facts, person, length)
            if r.task_id != current and pending:
                finish_task(pending)
                pending = []
            current = r.task_id
            pending.append(r)
    if pending:
        finish_task(pending)

    gold = export.gold_accuracy(session, project_id)
    speeds = bias.speed(
        {str(uid): list(p.times) for uid, p in people.items() if p.times}, fast_ms=fast_ms
    )
    position = bias.proportion(
        sum(p.first_won for p in people.values()), sum(p.position_n for p in people.values())
    )
    length_result = length.result()
    strengths = bt.strengths(signatures, rng=random.Random(seed), replicates=replicates)

    annotators = []
    for uid, p in sorted(people.items(), key=lambda item: (-item[1].judgments, item[1].username)):
        right, judged = gold.get(uid, (0, 0))
        position_p = bias.proportion(p.first_won, p.position_n)
        length_p = bias.proportion(p.longer_won, p.length_n)
        speed = speeds.get(str(uid))
        flags = []
        if position_p.significant:
            flags.append("position bias")
        if length_p.significant:
            flags.append("length bias")
        if speed is not None and speed.fast.significant:
            flags.append("too fast")
        annotators.append(
            {
                "user_id": uid,
                "username": p.username,
                "active": p.active,
                "external": p.username in external,
                "judgments": p.judgments,
                "agreement_with_consensus": p.agree / p.compared if p.compared else None,
                "agreement_pairs": p.compared,
                "gold_accuracy": right / judged if judged else None,
                "gold_judged": judged,
                "position_bias": _proportion(position_p),
                "length_bias": _proportion(length_p),
                "median_time_ms": speed.median_ms if speed else None,
                "fast": _proportion(speed.fast) if speed else None,
                "robust_fast": speed.robust_outliers if speed else 0,
                "flags": flags,
            }
        )
    data = {
        "project": {"id": project.id, "name": project.name, "mode": project.mode.value},
        "judgments": judgments,
        "tasks": tasks,
        "tasks_with_overlap": overlapped,
        "significance_level": bias.ALPHA,
        "agreement": {
            "pairwise": agree_total / compared_total if compared_total else None,
            "agree": agree_total,
            "compared": compared_total,
            "krippendorff_alpha_ordinal": matrix.alpha_ordinal(),
            "consensus_methods": dict(sorted(methods.items())),
        },
        "position_bias": _proportion(position),
        "length_bias": {
            "longer_wins": _proportion(length_result.longer_wins),
            "buckets": [{"label": label, **_proportion(p)} for label, p in length_result.buckets],
        },
        "speed": {
            "threshold_ms": fast_ms,
            "robust_z": bias.ROBUST_Z_FAST,
            "fast": sum(s.fast.k for s in speeds.values()),
            "timed": sum(s.n for s in speeds.values()),
        },
        "annotators": annotators,
        "sources": {
            "method": "bradley_terry",
            "seed": seed,
            "replicates": replicates if len(strengths) > 1 else 0,
            "level": bt.LEVEL,
            "strengths": [
                {
                    "source": s.source,
                    "theta": s.theta,
                    "low": s.low,
                    "high": s.high,
                    "win_rate_vs_average": _logistic(s.theta),
                    "win_rate_low": _logistic(s.low),
                    "win_rate_high": _logistic(s.high),
                    "wins": s.wins,
                    "comparisons": s.comparisons,
                }
                for s in strengths
            ],
        },
    }
    return Report(data)


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _audit_display(
    r: Any, facts: Mapping[int, tuple[int, str]], person: _Annotator, length: bias.LengthCounts
) -> None:
    """Position and length observations from the first two candidates as displayed."""
    shown = list(r.display_order or [])
    if r.none_acceptable or len(shown) < 2:
        return
    level = agreement.levels(r.ranking)
    first, second = int(shown[0]), int(shown[1])
    if first not in level or second not in level or level[first] == level[second]:
        return
    first_won = level[first] < level[second]
    person.position_n += 1
    person.first_won += first_won
    a, b = facts[first][0], facts[second][0]
    if a != b:
        person.length_n += 1
        person.longer_won += first_won == (a > b)
        length.add(a, b, first_won)


def external_annotators(session: Session, project_id: int) -> list[str]:
    project = projects.get(session, project_id)
    return sorted((project.settings or {}).get(EXTERNAL_KEY) or [])
