"""Watching the demo's loop from the database: what to print, and when an iteration is over.

The web app, the worker and the simulated annotators each write their own rows; the demo only
reads them (`view`, one short read-only transaction per poll, marked by the caller) and turns the difference
between two polls into lines for the terminal (`Narrator`, pure). An iteration is over when a
policy's generated pairs (its answers against its parent's on the held-out prompts) are all
judged; its result is app.services.winrate's report for that policy: the human win rate vs
the parent with its 95% interval, and the reward model's predicted win rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import (
    Completion,
    Job,
    Judgment,
    ModelKind,
    ModelVersion,
    Prompt,
    Task,
    TaskState,
)
from app.services import generation, jobs, winrate

PROGRESS_EVERY_S = 15.0
"""A running job's progress line is repeated at most this often (a new stage prints at once)."""
LABELS_EVERY_S = 5.0


@dataclass(frozen=True)
class JobView:
    id: int
    kind: str
    state: str
    params: dict[str, Any]
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None


@dataclass(frozen=True)
class LoopView:
    """The demo project's loop at one moment."""

    jobs: list[JobView]
    judgments: int
    open_tasks: int
    done_tasks: int
    policies: list[int]  # trained policy ids, oldest first (a `--policy` base left out)


def view(session: Session, project_id: int, *, skip_policies: Iterable[int] = ()) -> LoopView:
    rows = session.scalars(
        select(Job).where(Job.project_id == project_id, Job.kind.in_(jobs.TRAINING_KINDS))
    )
    job_views = sorted(
        (
            JobView(
                j.id,
                j.kind,
                j.state.value,
                dict(j.params or {}),
                dict(j.progress or {}),
                dict(j.metrics or {}),
                j.error,
            )
            for j in rows
        ),
        key=lambda j: j.id,
    )
    judged = session.scalar(
        select(func.count()).select_from(Judgment).where(Judgment.project_id == project_id)
    )
    counts = dict(
        session.execute(
            select(Task.state, func.count())
            .where(Task.project_id == project_id)
            .group_by(Task.state)
        ).all()
    )
    skip = set(skip_policies)
    policies = [
        pid
        for pid in session.scalars(
            select(ModelVersion.id)
            .where(ModelVersion.project_id == project_id, ModelVersion.kind == ModelKind.policy)
            .order_by(ModelVersion.id)
        )
        if pid not in skip
    ]
    return LoopView(
        jobs=job_views,
        judgments=int(judged or 0),
        open_tasks=int(counts.get(TaskState.open, 0)),
        done_tasks=int(counts.get(TaskState.done, 0)),
        policies=policies,
    )


# --- an iteration's end and result --------------------------------------------------------------


@dataclass(frozen=True)
class PairsProgress:
    """How far people got judging a policy's generated pairs."""

    generated: bool  # its generate job succeeded
    tasks: int
    done: int

    @property
    def finished(self) -> bool:
        return self.generated and self.done >= self.tasks


def pairs_progress(session: Session, project_id: int, policy_id: int) -> PairsProgress:
    """The policy's own pairs (tasks that show one of its answers and none of a newer
    policy's: a child's pairs show the parent's answers too), and how many are fully judged."""
    generated = any(
        (j.params or {}).get("policy_id") == policy_id and j.state.value == "succeeded"
        for j in session.scalars(
            select(Job).where(Job.project_id == project_id, Job.kind == jobs.GENERATE)
        )
    )
    newer = {
        generation.source_for(pid)
        for pid in session.scalars(
            select(ModelVersion.id).where(
                ModelVersion.project_id == project_id,
                ModelVersion.kind == ModelKind.policy,
                ModelVersion.id > policy_id,
            )
        )
    }
    own: set[int] = set()
    later: set[int] = set()
    for cid, source in session.execute(
        select(Completion.id, Completion.source)
        .join(Prompt, Prompt.id == Completion.prompt_id)
        .where(
            Prompt.project_id == project_id,
            Completion.source.in_([generation.source_for(policy_id), *newer]),
        )
    ):
        (later if source in newer else own).add(cid)
    total = done = 0
    for ids, state, count, required in session.execute(
        select(Task.completion_ids, Task.state, Task.judgment_count, Task.required_judgments).where(
            Task.project_id == project_id, Task.is_gold.is_(False)
        )
    ):
        shown = {int(c) for c in ids}
        if not shown & own or shown & later:
            continue
        total += 1
        if state == TaskState.done or count >= required:
            done += 1
    return PairsProgress(generated, total, done)


def policy_result(session: Session, project_id: int, policy_id: int) -> winrate.PolicyEval | None:
    return next(
        (e for e in winrate.policy_report(session, project_id) if e.policy_id == policy_id), None
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def result_lines(result: winrate.PolicyEval) -> list[str]:
    """The win-rate report of one iteration, as printed."""
    human = result.vs_parent
    if human.n:
        people = (
            f"human win rate vs parent ({result.parent_source}): {_pct(human.rate)} "
            f"(95% CI {_pct(human.low)}-{_pct(human.high)}; {human.wins} wins, "
            f"{human.losses} losses, {human.ties} ties of {human.n}) -> {human.verdict.value}"
        )
    else:
        people = f"human win rate vs parent ({result.parent_source}): no judged pairs"
    predicted = result.predicted_vs_parent
    model = (
        f"reward model {result.reward_model_id}'s predicted win rate on the same pairs: "
        f"{_pct(predicted.rate)} ({predicted.scored} of {predicted.pairs} pairs scored)"
    )
    drift = "n/a" if result.kl is None else f"{result.kl:.3f} nats"
    lines = [
        f"policy {result.policy_id}: {people}",
        f"  {model}",
        f"  KL from the reference: {drift}",
    ]
    if result.worse_than_parent:
        lines.append("  people judged it worse than its parent: the next PPO run starts elsewhere")
    return lines


# --- narrating ----------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ".3f") -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return format(value, fmt)


def _eta(progress: dict[str, Any]) -> str:
    text = jobs.eta_text(progress)
    return f", eta {text}" if text else ""


def why(job: JobView) -> str:
    trigger = job.params.get("trigger")
    if trigger == "auto":
        return "every-N-judgments schedule"
    if trigger == "chain":
        return f"loop, after job {job.params.get('after_job')}"
    policy = job.params.get("policy_id")
    return f"demo setup, policy {policy or 'packaged SmolLM2'}"


def progress_text(job: JobView) -> str:
    p = job.progress
    stage = p.get("stage", "starting")
    if job.kind == jobs.GENERATE and stage == "generating":
        return (
            f"generating {p.get('samples_done', 0)}/{p.get('samples_total', '?')} answers{_eta(p)}"
        )
    if job.kind == jobs.REWARD and stage == "training":
        return f"training step {p.get('step', 0)}/{p.get('total_steps', '?')}, loss {_num(p.get('loss'))}{_eta(p)}"
    if job.kind == jobs.PPO and stage == "training":
        return (
            f"PPO step {p.get('step', 0)}/{p.get('total_steps', '?')}, reward "
            f"{_num(p.get('reward_mean'))}, KL {_num(p.get('kl'))}, response length "
            f"{_num(p.get('response_length'), '.1f')}{_eta(p)}"
        )
    return str(stage)


def summary_text(job: JobView) -> str:
    m = job.metrics
    if job.kind == jobs.GENERATE:
        return (
            f"{m.get('completions_stored', 0)} answers stored on {m.get('prompts', 0)} prompts, "
            f"{m.get('tasks_created', 0)} pairs to label ({_num(m.get('generate_time_s'), '.0f')} s)"
        )
    if job.kind == jobs.REWARD:
        held_out = m.get("eval") or {}
        data = m.get("data") or {}
        return (
            f"reward model {m.get('model_version_id')} trained on {data.get('judgments', '?')} "
            f"judgments: accuracy {_num(held_out.get('accuracy'), '.2f')} on "
            f"{held_out.get('pairs', '?')} held-out pairs"
        )
    if job.kind == jobs.PPO:
        return (
            f"policy {m.get('model_version_id')}: best step {m.get('best_step')} of "
            f"{m.get('steps')}, reward {_num(m.get('reward_mean'))}, KL {_num(m.get('kl'))} "
            f"({_num(m.get('train_time_s'), '.0f')} s)"
        )
    return "done"


@dataclass
class Narrator:
    """Turns successive LoopViews into terminal lines (remembers what it already said)."""

    states: dict[int, str] = field(default_factory=dict)
    said_progress: dict[int, tuple[str, str, float]] = field(default_factory=dict)
    judgments: int = -1
    labels_at: float = float("-inf")

    def update(self, loop: LoopView, now: float) -> list[str]:
        lines: list[str] = []
        for job in loop.jobs:
            before = self.states.get(job.id)
            name = f"{job.kind} job {job.id}"
            if before is None:
                lines.append(f"{name} queued ({why(job)})")
            if job.state != before:
                self.states[job.id] = job.state
                if job.state == "running":
                    lines.append(f"{name} started")
                elif job.state == "succeeded":
                    lines.append(f"{name} done: {summary_text(job)}")
                elif job.state in ("failed", "cancelled"):
                    error = (job.error or "").split("\n", 1)[0]
                    lines.append(f"{name} {job.state.upper()}: {error}")
            if job.state == "running":
                stage, text = str(job.progress.get("stage", "")), progress_text(job)
                said = self.said_progress.get(job.id)
                if stage and (
                    said is None
                    or stage != said[0]
                    or (text != said[1] and now - said[2] >= PROGRESS_EVERY_S)
                ):
                    lines.append(f"{name}: {text}")
                    self.said_progress[job.id] = (stage, text, now)
        if loop.judgments != self.judgments and now - self.labels_at >= LABELS_EVERY_S:
            lines.append(
                f"labels: {loop.judgments} judgments so far, {loop.open_tasks} tasks open, "
                f"{loop.done_tasks} done"
            )
            self.judgments, self.labels_at = loop.judgments, now
        return lines
