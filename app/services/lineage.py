"""The project's lineage graph: data → reward model → policy → generated candidates → judgments.

Each node is one thing the loop made, with links to where a person reads its metrics, fetches
its files and exports its data; each edge says how one led to the next:

    snapshot / data cut-off ──trained_on──▶ reward model ──partner──▶ held-out reward model
    reward model ──optimized_against──▶ policy ◀──parent── parent policy (or the packaged one)
    held-out reward model ──guarded──▶ policy
    policy ──generated──▶ generate job (its candidates) ──judged──▶ judgments on them
    judgments ──trained_into──▶ the first data cut-off that includes them

Reward models record the judgments they trained on as a cut-off (`config["data"]`: every
judgment up to `max_judgment_id`); one that trained on a snapshot names it (`snapshot_id`).
Generated completions carry their generate job's id in their metadata; a task belongs to
the newest job among its completions (the one whose store made it), which ties each judgment
to the job whose candidates it was made to judge. The export has no filter by completion or
source, so a judgments node links to the raw export of the project (every judgment, with its
task's completion ids) rather than to a filtered one.

Nodes come oldest first (by creation time, then kind), so the list is also the timeline.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import (
    Completion,
    Job,
    Judgment,
    ModelKind,
    ModelVersion,
    Prompt,
    Snapshot,
    Task,
)
from app.services import chaining, generation, jobs, projects

_CHUNK = 500
_KIND_ORDER = {
    "snapshot": 0,
    "data": 1,
    "reward": 2,
    "heldout": 3,
    "policy": 4,
    "generate": 5,
    "judgments": 6,
}


@dataclass
class Node:
    id: str
    kind: str  # snapshot | data | reward | heldout | policy | generate | judgments
    label: str
    at: datetime | None = None
    state: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    artifact_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "label": self.label,
            "at": self.at.isoformat() if self.at else None,
            "state": self.state,
            "details": self.details,
            "links": self.links,
            "artifact_path": self.artifact_path,
        }


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    relation: str

    def to_json(self) -> dict[str, str]:
        return {"source": self.source, "target": self.target, "relation": self.relation}


@dataclass(frozen=True)
class Lineage:
    project_id: int
    nodes: list[Node]
    edges: list[Edge]

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "project_id": self.project_id,
            "nodes": [n.to_json() for n in self.nodes],
            "edges": [e.to_json() for e in self.edges],
        }


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def raw_export_link(project_id: int) -> str:
    return f"/api/v1/projects/{project_id}/export?shape=raw&format=jsonl"


def model_node_id(model: ModelVersion) -> str:
    if model.kind is ModelKind.policy:
        return f"policy:{model.id}"
    return f"{'heldout' if chaining.is_heldout(model) else 'reward'}:{model.id}"


def _model_links(model: ModelVersion) -> dict[str, str]:
    links = {
        "metrics": f"/api/v1/models/{model.id}",
        "page": f"/models#model-{model.id}",
        "files": f"/api/v1/models/{model.id}/download",
    }
    if model.job_id is not None:
        links["job"] = f"/jobs/{model.job_id}"
    return links


def _metric_summary(model: ModelVersion) -> dict[str, Any]:
    metrics = model.metrics or {}
    keys = ("reward_mean", "heldout_reward_mean", "kl", "best_step", "steps")
    summary = {k: metrics[k] for k in keys if k in metrics}
    evaluation = metrics.get("eval")
    if isinstance(evaluation, dict):
        summary.update(
            {f"eval_{k}": evaluation[k] for k in ("accuracy", "loss", "pairs") if k in evaluation}
        )
    if "rejection" in metrics:
        summary["rejection"] = metrics["rejection"].get("reason")
    return summary


def graph(session: Session, project_id: int) -> Lineage:
    """The project's lineage (see the module doc). Reads only."""
    projects.get(session, project_id)
    nodes: dict[str, Node] = {}
    edges: list[Edge] = []

    def edge(source: str, target: str, relation: str) -> None:
        if source in nodes and target in nodes:
            edges.append(Edge(source, target, relation))

    for snapshot in session.scalars(
        select(Snapshot).where(Snapshot.project_id == project_id).order_by(Snapshot.id)
    ):
        nodes[f"snapshot:{snapshot.id}"] = Node(
            id=f"snapshot:{snapshot.id}",
            kind="snapshot",
            label=f"Snapshot {snapshot.id} · {snapshot.row_count} pairs",
            at=snapshot.created_at,
            details={
                "max_judgment_id": snapshot.max_judgment_id,
                "row_count": snapshot.row_count,
                "sha256": snapshot.sha256,
            },
            links={
                "metrics": f"/api/v1/snapshots/{snapshot.id}",
                "export": f"/api/v1/snapshots/{snapshot.id}/export",
                "page": f"/projects/{project_id}/snapshots",
            },
        )

    models = list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.project_id == project_id)
            .order_by(ModelVersion.id)
        )
    )
    rewards = [m for m in models if m.kind is ModelKind.reward]
    policies = [m for m in models if m.kind is ModelKind.policy]

    # Data cut-offs and reward models.
    for model in rewards:
        node_id = model_node_id(model)
        config = model.config or {}
        stored = config.get("data")
        data: dict[str, Any] = stored if isinstance(stored, dict) else {}
        nodes[node_id] = Node(
            id=node_id,
            kind="heldout" if chaining.is_heldout(model) else "reward",
            label=f"{'Held-out reward' if chaining.is_heldout(model) else 'Reward'} model "
            f"{model.id}",
            at=model.created_at,
            state=model.state,
            details={**_metric_summary(model), "judgments": data.get("judgments")},
            links=_model_links(model),
            artifact_path=model.artifact_path,
        )
        if model.snapshot_id is not None and f"snapshot:{model.snapshot_id}" in nodes:
            edge(f"snapshot:{model.snapshot_id}", node_id, "trained_on")
            continue
        cutoff = data.get("max_judgment_id")
        if not isinstance(cutoff, int):
            continue
        data_id = f"data:{cutoff}"
        if data_id not in nodes:
            nodes[data_id] = Node(
                id=data_id,
                kind="data",
                label=f"Judgments up to #{cutoff}",
                at=model.created_at,
                details={"max_judgment_id": cutoff, "prompts": data.get("prompts")},
                links={"export": raw_export_link(project_id)},
            )
        edge(data_id, node_id, "trained_on")
    for model in rewards:
        pair_of = (model.config or {}).get("pair_of")
        if chaining.is_heldout(model) and isinstance(pair_of, int):
            edge(f"reward:{pair_of}", model_node_id(model), "partner")

    # Policies, from the packaged default down.
    default_id = generation.DEFAULT_SOURCE
    generate_jobs = [
        j
        for j in session.scalars(
            select(Job)
            .where(Job.project_id == project_id, Job.kind == jobs.GENERATE)
            .order_by(Job.id)
        )
    ]
    wants_default = any(p.parent_id is None for p in policies) or any(
        (j.params or {}).get("policy_id") is None for j in generate_jobs
    )
    if wants_default:
        nodes[default_id] = Node(
            id=default_id,
            kind="policy",
            label="Packaged default policy",
            details={"model": "SmolLM2-135M-Instruct (packaged)"},
        )
    for model in policies:
        node_id = model_node_id(model)
        nodes[node_id] = Node(
            id=node_id,
            kind="policy",
            label=f"Policy {model.id}",
            at=model.created_at,
            state=model.state,
            details=_metric_summary(model),
            links=_model_links(model),
            artifact_path=model.artifact_path,
        )
        parent = f"policy:{model.parent_id}" if model.parent_id is not None else default_id
        edge(parent, node_id, "parent")
        if model.reward_model_id is not None:
            reward = session.get(ModelVersion, model.reward_model_id)
            if reward is not None:
                edge(model_node_id(reward), node_id, "optimized_against")
        guard = (model.config or {}).get("heldout_reward_model_id")
        if isinstance(guard, int):
            edge(f"heldout:{guard}", node_id, "guarded")

    # Generate jobs, their candidates and the judgments on them.
    completions_of: dict[int, set[int]] = defaultdict(set)
    job_ids = {j.id for j in generate_jobs}
    sources = {generation.source_for(p.id) for p in policies} | {default_id}
    prompts_of: dict[int, set[int]] = defaultdict(set)
    if job_ids:
        for cid, pid, metadata in session.execute(
            select(Completion.id, Completion.prompt_id, Completion.metadata_)
            .join(Prompt, Prompt.id == Completion.prompt_id)
            .where(Prompt.project_id == project_id, Completion.source.in_(sorted(sources)))
        ):
            job_id = (metadata or {}).get("job_id")
            if job_id in job_ids:
                completions_of[job_id].add(cid)
                prompts_of[job_id].add(pid)
    job_of = {cid: job_id for job_id, ids in completions_of.items() for cid in ids}
    tasks_of: dict[int, set[int]] = defaultdict(set)
    task_job: dict[int, int] = {}
    all_prompts = sorted({p for ps in prompts_of.values() for p in ps})
    for chunk in _chunks(all_prompts):
        for tid, ids in session.execute(
            select(Task.id, Task.completion_ids).where(
                Task.project_id == project_id, Task.prompt_id.in_(chunk)
            )
        ):
            # A task belongs to the job that made it: the newest job among its completions.
            made_by = [job_of[int(c)] for c in ids if int(c) in job_of]
            if made_by:
                task_job[tid] = max(made_by)
                tasks_of[task_job[tid]].add(tid)
    judgments_of: dict[int, list[int]] = defaultdict(list)
    judged_tasks: dict[int, set[int]] = defaultdict(set)
    for chunk in _chunks(sorted(task_job)):
        for jid, tid in session.execute(
            select(Judgment.id, Judgment.task_id).where(Judgment.task_id.in_(chunk))
        ):
            judgments_of[task_job[tid]].append(jid)
            judged_tasks[task_job[tid]].add(tid)
    # What judgments can flow into: data cut-offs and snapshots, by their cut-off (a snapshot
    # before a cut-off-only node of the same id, as reward jobs now train on snapshots).
    data_cutoffs = sorted(
        (int(n.details["max_judgment_id"]), _KIND_ORDER[n.kind], n.id)
        for n in nodes.values()
        if n.kind in ("data", "snapshot")
    )

    for job in generate_jobs:
        node_id = f"generate:{job.id}"
        policy_id = (job.params or {}).get("policy_id")
        metrics = job.metrics or {}
        nodes[node_id] = Node(
            id=node_id,
            kind="generate",
            label=f"Generate job {job.id} · {len(completions_of[job.id])} candidates",
            at=job.created_at,
            state=job.state.value,
            details={
                "candidates": len(completions_of[job.id]),
                "tasks": len(tasks_of[job.id]),
                "prompts": metrics.get("prompts"),
                "selection": metrics.get("selection") or (job.params or {}).get("prompts"),
            },
            links={"job": f"/jobs/{job.id}", "metrics": f"/api/v1/jobs/{job.id}"},
        )
        edge(f"policy:{policy_id}" if policy_id is not None else default_id, node_id, "generated")
        judged = sorted(judgments_of[job.id])
        if not judged:
            continue
        judged_id = f"judgments:{job.id}"
        nodes[judged_id] = Node(
            id=judged_id,
            kind="judgments",
            label=f"{len(judged)} judgments on {len(judged_tasks[job.id])} tasks",
            at=job.finished_at or job.created_at,
            details={
                "judgments": len(judged),
                "tasks": len(judged_tasks[job.id]),
                "first_judgment_id": judged[0],
                "last_judgment_id": judged[-1],
            },
            links={"export": raw_export_link(project_id)},
        )
        edge(node_id, judged_id, "judged")
        into = next((target for cutoff, _, target in data_cutoffs if cutoff >= judged[0]), None)
        if into is not None:
            edge(judged_id, into, "trained_into")

    ordered = sorted(
        nodes.values(),
        key=lambda n: (n.at.timestamp() if n.at else 0.0, _KIND_ORDER[n.kind], n.id),
    )
    return Lineage(project_id, ordered, edges)
