"""Win rates per policy, the worse-than-parent rule, the lineage graph, their API and page.

A small loop built from real rows (both backends): packaged-default candidates on 12 prompts,
a reward model and its held-out partner, policy 1 (which people judge worse than the default
on all 12 prompts, while its reward model thinks it better), policy 2 trained from the
default again because policy 1 is rejected, and policy 3 from policy 2, whose samples are
paired against both its parent and the first policy. Generated completions and tasks come
from app.services.generation.store, the code path the generate job uses.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain import winrate as stats
from app.models import (
    Completion,
    CompletionScore,
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
from app.services import chaining, generation, lineage, model_registry, winrate
from tests.factories import login, make_project, make_prompt, make_token, make_user

BASE = {"base": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what a PPO run from the default records


# --- pairing against the parent and the first policy (pure) -------------------------------------


def test_new_samples_pair_with_the_parent_and_with_the_first_policy() -> None:
    existing = [(1, "upload"), (2, "policy:default"), (3, "policy:4"), (4, "policy:4")]
    common = {"source": "policy:9", "max_pairs": 16}
    sets = generation.candidate_sets(
        ProjectMode.pairwise,
        2,
        existing,
        set(),
        [10, 11],
        parent_source="policy:4",
        root_source="policy:default",
        rng=random.Random(0),
        **common,
    )
    # each new sample once against a parent answer, once against the first policy's
    assert sorted(s[1] for s in sets) == [10, 10, 11, 11]
    assert sorted(s[0] for s in sets if s[0] == 2) == [2, 2]
    assert {s[0] for s in sets if s[0] != 2} <= {3, 4} and len(sets) == 4
    # The first policy is the parent: no second set of pairs.
    sets = generation.candidate_sets(
        ProjectMode.pairwise,
        2,
        existing,
        set(),
        [10],
        parent_source="policy:default",
        root_source="policy:default",
        rng=random.Random(0),
        **common,
    )
    assert sets == [[2, 10]]
    assert generation.baseline_groups(existing, "policy:9", "policy:4", "policy:default") == [
        [3, 4],
        [2],
    ]
    assert generation.baseline_groups(existing, "policy:9", "policy:7", "policy:default") == [
        [3, 4],  # no parent answer: the newest other source, as before
        [2],
    ]
    assert generation.baseline_groups(existing, "policy:9", None, None) == [[3, 4]]
    # Ranking: one answer of each baseline stays in, the new ones fill the rest first.
    for seed in range(5):
        (chosen,) = generation.candidate_sets(
            ProjectMode.ranking,
            4,
            existing,
            set(),
            [10, 11, 12],
            parent_source="policy:4",
            root_source="policy:default",
            rng=random.Random(seed),
            **common,
        )
        assert len(chosen) == 4 and 2 in chosen and len({3, 4} & set(chosen)) == 1
        assert len({10, 11, 12} & set(chosen)) == 2


# --- the loop, built from rows ------------------------------------------------------------------


def _register(db: Session, kind: ModelKind, path: Path, project: Project, **fields: Any):
    return model_registry.register(
        db, kind=kind, artifact_path=path, project_id=project.id, **fields
    )


def _job(db: Session, project: Project, kind: str, **params: Any) -> Job:
    job = Job(project_id=project.id, kind=kind, params=params, state=JobState.succeeded)
    db.add(job)
    db.flush()
    return job


def _generate(
    db: Session, project: Project, policy: ModelVersion | None, prompt_ids: list[int], tag: str
) -> Job:
    """What a generate job stores: one sample per prompt, its tasks made by the real code."""
    job = _job(db, project, "generate", policy_id=policy.id if policy else None, prompts="heldout")
    generation.store(
        db,
        project.id,
        {pid: [f"{tag} answer to {pid}"] for pid in prompt_ids},
        source=generation.source_for(policy.id if policy else None),
        model_version_id=policy.id if policy else None,
        metadata={"job_id": job.id},
        rng=random.Random(0),
        max_pairs=16,
        parent_source=generation.source_for(policy.parent_id) if policy else None,
    )
    job.metrics = {"prompts": len(prompt_ids), "selection": "heldout"}
    db.flush()
    return job


def _tasks_of(db: Session, source: str) -> list[tuple[Task, dict[int, str]]]:
    """The tasks showing a completion of `source`, each with its completions' sources."""
    found = []
    for task in db.scalars(select(Task).order_by(Task.id)):
        sources = {
            c.id: c.source
            for c in db.scalars(select(Completion).where(Completion.id.in_(task.completion_ids)))
        }
        if source in sources.values():
            found.append((task, sources))
    return found


def _judge(db: Session, task: Task, user_id: int, ranking: list[list[int]]) -> Judgment:
    judgment = Judgment(
        project_id=task.project_id,
        task_id=task.id,
        user_id=user_id,
        ranking=ranking,
        display_order=list(task.completion_ids),
    )
    db.add(judgment)
    task.judgment_count += 1
    db.flush()
    return judgment


def _verdicts(
    db: Session, source: str, user_id: int, results: dict[str, str], *, first: str | None = None
) -> int:
    """Judge every task of `source`: "win", "loss" or "tie" by the baseline's source (the
    first task gets `first` instead, when given). Returns how many were judged."""
    tasks = _tasks_of(db, source)
    for i, (task, sources) in enumerate(tasks):
        new = next(c for c, s in sources.items() if s == source)
        old = next(c for c, s in sources.items() if s != source)
        result = first if i == 0 and first else results[sources[old]]
        ranking = {"win": [[new], [old]], "loss": [[old], [new]], "tie": [sorted([new, old])]}
        _judge(db, task, user_id, ranking[result])
    return len(tasks)


@pytest.fixture
def loop(db: Session, tmp_path: Path) -> dict[str, Any]:
    project = make_project(db, mode=ProjectMode.pairwise)
    annotator = make_user(db, Role.annotator)
    prompts = [make_prompt(db, project, [], text=f"question {i}").id for i in range(12)]
    default_job = _generate(db, project, None, prompts, "default")  # the demo's first step
    reward = _register(
        db,
        ModelKind.reward,
        tmp_path,
        project,
        job_id=_job(db, project, "reward").id,
        config={"data": {"max_judgment_id": 0, "judgments": 0, "prompts": 0}},
        metrics={"eval": {"accuracy": 0.75, "pairs": 8}},
    )
    partner = _register(
        db,
        ModelKind.reward,
        tmp_path,
        project,
        config={"role": "heldout", "pair_of": reward.id, "data": {"max_judgment_id": 0}},
    )
    first = _register(
        db,
        ModelKind.policy,
        tmp_path,
        project,
        reward_model_id=reward.id,
        job_id=_job(db, project, "ppo").id,
        config={**BASE, "heldout_reward_model_id": partner.id},
        metrics={"reward_mean": 1.5, "heldout_reward_mean": 0.2, "kl": 0.08},
    )
    gen1 = _generate(db, project, first, prompts, "one")
    # People prefer the default's answer on 11 prompts and tie on one ...
    source = f"policy:{first.id}"
    assert _verdicts(db, source, annotator.id, {"policy:default": "loss"}, first="tie") == 12
    # ... while the reward model it was optimised against scores it higher everywhere.
    for c in db.scalars(select(Completion)):
        score = 2.0 if c.source == f"policy:{first.id}" else 0.0
        db.add(CompletionScore(model_version_id=reward.id, completion_id=c.id, score=score))
    db.flush()
    return {
        "project": project,
        "annotator": annotator,
        "prompts": prompts,
        "reward": reward,
        "partner": partner,
        "first": first,
        "default_job": default_job,
        "gen1": gen1,
        "tmp_path": tmp_path,
    }


def test_a_policy_people_judge_worse_is_rejected_and_skipped(
    db: Session, loop: dict[str, Any]
) -> None:
    project, first, reward = loop["project"], loop["first"], loop["reward"]
    (report,) = winrate.policy_report(db, project.id)
    assert (report.iteration, report.policy_id, report.parent_id) == (1, first.id, None)
    assert (report.reward_model_id, report.samples) == (reward.id, 12)
    assert (report.parent_source, report.first_source) == ("policy:default", "policy:default")
    vs = report.vs_parent
    assert (vs.wins, vs.losses, vs.ties, vs.n) == (0, 11, 1, 12)
    assert vs.rate == pytest.approx(0.5 / 12)
    assert (vs.low, vs.high) == pytest.approx((0.0044, 0.3013), abs=1e-4)
    assert vs.verdict is stats.Verdict.worse and report.worse_than_parent
    assert report.vs_first == vs  # the first policy is its parent
    # Proxy up, people down: the reward model predicts a win on every judged pair.
    assert report.predicted_vs_parent.rate == pytest.approx(stats.sigmoid(2.0))
    assert (report.predicted_vs_parent.scored, report.predicted_vs_parent.pairs) == (12, 12)
    assert report.predicted_vs_parent_all.rate == pytest.approx(stats.sigmoid(2.0))
    assert (report.reward_mean, report.heldout_reward_mean, report.kl) == (1.5, 0.2, 0.08)

    # The next PPO run starts from the default again, rejected or not yet marked.
    assert first.state == "ready"
    assert chaining.ppo_inputs(db, project.id).parent is None
    assert chaining.ppo_inputs(db, project.id, parent_policy_id=first.id).parent.id == first.id  # type: ignore[union-attr]

    # Marking is idempotent: the second pass writes nothing new.
    marked = winrate.refresh_marks(db, project.id)
    assert [e.state for e in marked] == ["rejected"]
    db.refresh(first)
    assert first.state == "rejected"
    rejection = first.metrics["rejection"]
    assert rejection["rule"] == winrate.REJECTION_RULE
    assert "worse than its parent (policy:default)" in rejection["reason"]
    assert "win rate 0.04, 95% interval 0.00-0.30 on 12 judgments" in rejection["reason"]
    assert first.metrics["kl"] == 0.08  # the PPO metrics stay
    before = dict(first.metrics)
    winrate.refresh_marks(db, project.id)
    db.refresh(first)
    assert (first.state, first.metrics) == ("rejected", before)


def test_the_next_generation_and_pairs_against_the_first_policy(
    db: Session, loop: dict[str, Any]
) -> None:
    project, annotator, prompts = loop["project"], loop["annotator"], loop["prompts"]
    tmp_path, reward = loop["tmp_path"], loop["reward"]
    second = _register(
        db, ModelKind.policy, tmp_path, project, reward_model_id=reward.id, config=BASE,
        metrics={"reward_mean": 0.9, "kl": 0.02},
    )  # fmt: skip
    _generate(db, project, second, prompts[:6], "two")
    assert _verdicts(db, f"policy:{second.id}", annotator.id, {"policy:default": "win"}) == 6
    assert chaining.ppo_inputs(db, project.id).parent.id == second.id  # type: ignore[union-attr]

    third = _register(
        db, ModelKind.policy, tmp_path, project, reward_model_id=reward.id, parent_id=second.id,
        config=BASE, metrics={"kl": 0.05},
    )  # fmt: skip
    _generate(db, project, third, prompts[:4], "three")
    # Each of its 4 samples against policy 2's answer and against the default's: 8 tasks.
    tasks = _tasks_of(db, f"policy:{third.id}")
    baselines = sorted(next(v for v in s.values() if v != f"policy:{third.id}") for _, s in tasks)
    assert baselines == sorted([f"policy:{second.id}"] * 4 + ["policy:default"] * 4)
    judged = _verdicts(
        db,
        f"policy:{third.id}",
        annotator.id,
        {f"policy:{second.id}": "loss", "policy:default": "win"},
    )
    assert judged == 8

    first_eval, second_eval, third_eval = winrate.policy_report(db, project.id)
    assert [e.iteration for e in (first_eval, second_eval, third_eval)] == [1, 2, 3]
    assert second_eval.vs_parent.verdict is stats.Verdict.better
    assert (second_eval.vs_parent.wins, second_eval.vs_parent.n) == (6, 6)
    assert second_eval.predicted_vs_parent.scored == 0  # no scores of its samples yet
    assert second_eval.predicted_vs_parent.rate is None
    assert (third_eval.parent_source, third_eval.first_source) == (
        f"policy:{second.id}",
        "policy:default",
    )
    assert (third_eval.vs_parent.losses, third_eval.vs_parent.n) == (4, 4)
    # All 4 lost against the parent, but 4 judgments are under the minimum: not rejected.
    assert third_eval.vs_parent.high < 0.5
    assert third_eval.vs_parent.verdict is stats.Verdict.undecided
    assert (third_eval.vs_first.wins, third_eval.vs_first.n) == (4, 4)
    assert not third_eval.worse_than_parent
    assert chaining.ppo_inputs(db, project.id).parent.id == third.id  # type: ignore[union-attr]

    # A reward job's chain step refreshes the marks (the worker's transaction).
    chaining.after_success(
        db, kind="reward", project_id=project.id, model_version_id=reward.id, job_id=1
    )
    states = {m.id: m.state for m in db.scalars(select(ModelVersion))}
    assert (states[loop["first"].id], states[second.id], states[third.id]) == (
        "rejected",
        "ready",
        "ready",
    )
    # A rule rejection the evidence no longer supports is lifted.
    second.state = "rejected"
    second.metrics = {**second.metrics, "rejection": {"rule": winrate.REJECTION_RULE}}
    winrate.refresh_marks(db, project.id)
    db.refresh(second)
    assert second.state == "ready" and "rejection" not in second.metrics


def test_ppo_inputs_walk_back_past_several_rejected_policies(
    db: Session, loop: dict[str, Any]
) -> None:
    project, annotator, prompts = loop["project"], loop["annotator"], loop["prompts"]
    tmp_path, reward, first = loop["tmp_path"], loop["reward"], loop["first"]
    # A policy trained (by hand) from the rejected one, also worse than its parent.
    child = _register(
        db, ModelKind.policy, tmp_path, project, reward_model_id=reward.id, parent_id=first.id,
        config=BASE,
    )  # fmt: skip
    _generate(db, project, child, prompts, "child")
    losses = {f"policy:{first.id}": "loss", "policy:default": "loss"}
    assert _verdicts(db, f"policy:{child.id}", annotator.id, losses) == 24
    report = winrate.policy_report(db, project.id)
    assert [e.worse_than_parent for e in report] == [True, True]
    assert report[1].vs_parent.n == 12 and report[1].vs_first.n == 12
    assert chaining.ppo_inputs(db, project.id).parent is None  # past both, to the default


def test_lineage_graph_nodes_and_edges(db: Session, loop: dict[str, Any]) -> None:
    project, reward, partner, first = (
        loop["project"],
        loop["reward"],
        loop["partner"],
        loop["first"],
    )
    gen1, default_job = loop["gen1"], loop["default_job"]
    first_judgment = min(db.scalars(select(Judgment.id)))
    last_judgment = max(db.scalars(select(Judgment.id)))
    retrained = _register(
        db,
        ModelKind.reward,
        loop["tmp_path"],
        project,
        config={"data": {"max_judgment_id": last_judgment, "judgments": 12, "prompts": 12}},
    )
    graph = lineage.graph(db, project.id)
    ids = [n.id for n in graph.nodes]
    expected = {
        "data:0",
        f"reward:{reward.id}",
        f"heldout:{partner.id}",
        "policy:default",
        f"policy:{first.id}",
        f"generate:{default_job.id}",
        f"generate:{gen1.id}",
        f"judgments:{gen1.id}",
        f"data:{last_judgment}",
        f"reward:{retrained.id}",
    }
    assert set(ids) == expected and len(ids) == len(expected)
    # Oldest first: the cut-off before its reward model, the policy before its candidates.
    assert ids.index("data:0") < ids.index(f"reward:{reward.id}") < ids.index(f"policy:{first.id}")
    assert ids.index(f"policy:{first.id}") < ids.index(f"generate:{gen1.id}")
    assert ids.index(f"generate:{gen1.id}") < ids.index(f"judgments:{gen1.id}")
    edges = {(e.source, e.target, e.relation) for e in graph.edges}
    assert edges == {
        ("data:0", f"reward:{reward.id}", "trained_on"),
        ("data:0", f"heldout:{partner.id}", "trained_on"),
        (f"reward:{reward.id}", f"heldout:{partner.id}", "partner"),
        (f"reward:{reward.id}", f"policy:{first.id}", "optimized_against"),
        (f"heldout:{partner.id}", f"policy:{first.id}", "guarded"),
        ("policy:default", f"policy:{first.id}", "parent"),
        ("policy:default", f"generate:{default_job.id}", "generated"),
        (f"policy:{first.id}", f"generate:{gen1.id}", "generated"),
        (f"generate:{gen1.id}", f"judgments:{gen1.id}", "judged"),
        (f"judgments:{gen1.id}", f"data:{last_judgment}", "trained_into"),
        (f"data:{last_judgment}", f"reward:{retrained.id}", "trained_on"),
    }
    generated = graph.node(f"generate:{gen1.id}")
    assert generated.details["candidates"] == 12 and generated.details["tasks"] == 12
    assert generated.links == {"job": f"/jobs/{gen1.id}", "metrics": f"/api/v1/jobs/{gen1.id}"}
    # A task belongs to the job that made it: the default's samples had nothing to pair with.
    assert graph.node(f"generate:{default_job.id}").details == {
        "candidates": 12,
        "tasks": 0,
        "prompts": 12,
        "selection": "heldout",
    }
    judged = graph.node(f"judgments:{gen1.id}")
    assert judged.details == {
        "judgments": 12,
        "tasks": 12,
        "first_judgment_id": first_judgment,
        "last_judgment_id": last_judgment,
    }
    assert judged.links["export"] == f"/api/v1/projects/{project.id}/export?shape=raw&format=jsonl"
    policy = graph.node(f"policy:{first.id}")
    assert policy.artifact_path == first.artifact_path
    assert policy.links["files"] == f"/api/v1/models/{first.id}/download"
    assert policy.links["metrics"] == f"/api/v1/models/{first.id}"
    assert policy.links["job"] == f"/jobs/{first.job_id}"
    assert policy.details["kl"] == 0.08
    assert graph.node(f"reward:{reward.id}").details["eval_accuracy"] == 0.75


def test_judgments_flow_into_the_snapshot_a_reward_model_trained_on(
    db: Session, loop: dict[str, Any]
) -> None:
    """Reward jobs train on snapshots: the judged candidates link to the snapshot that
    contains them, and the snapshot to the model, with no cut-off-only node between."""
    from app.services import snapshots

    project, gen1 = loop["project"], loop["gen1"]
    snapshot = snapshots.create(db, project.id, {}, created_by=None)
    retrained = _register(
        db,
        ModelKind.reward,
        loop["tmp_path"],
        project,
        snapshot_id=snapshot.id,
        config={"data": {"max_judgment_id": snapshot.max_judgment_id, "snapshot_id": snapshot.id}},
    )
    graph = lineage.graph(db, project.id)
    edges = {(e.source, e.target, e.relation) for e in graph.edges}
    assert (f"judgments:{gen1.id}", f"snapshot:{snapshot.id}", "trained_into") in edges
    assert (f"snapshot:{snapshot.id}", f"reward:{retrained.id}", "trained_on") in edges
    assert f"data:{snapshot.max_judgment_id}" not in {n.id for n in graph.nodes}


def test_iterations_and_lineage_api(client, db: Session, loop: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    project, first = loop["project"], loop["first"]
    researcher = make_token(db, make_user(db, Role.researcher))
    resp = client.get(f"/api/v1/projects/{project.id}/iterations", headers=researcher)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["min_judgments"] == 10
    (entry,) = body["iterations"]
    assert entry["policy_id"] == first.id and entry["state"] == "rejected"
    assert entry["worse_than_parent"] is True
    assert entry["vs_parent"]["n"] == 12 and entry["vs_parent"]["verdict"] == "worse"
    assert entry["vs_parent"]["high"] == pytest.approx(0.3013, abs=1e-4)
    assert entry["predicted_vs_parent"]["rate"] == pytest.approx(0.8808, abs=1e-4)
    assert entry["kl"] == 0.08
    # Serving the report marked it, and the models API shows it.
    model = client.get(f"/api/v1/models/{first.id}", headers=researcher).json()
    assert model["state"] == "rejected" and "rejection" in model["metrics"]

    graph = client.get(f"/api/v1/projects/{project.id}/lineage", headers=researcher).json()
    assert graph["project_id"] == project.id
    assert {"id", "kind", "label", "links", "artifact_path"} <= set(graph["nodes"][0])
    assert {"source": f"policy:{first.id}", "target": f"generate:{loop['gen1'].id}",
            "relation": "generated"} in graph["edges"]  # fmt: skip

    annotator = make_token(db, make_user(db, Role.annotator))
    for path in ("iterations", "lineage"):
        assert (
            client.get(f"/api/v1/projects/{project.id}/{path}", headers=annotator).status_code
            == 403
        )
        assert client.get(f"/api/v1/projects/999999/{path}", headers=researcher).status_code == 404


def test_iterations_page_shows_the_numbers_and_the_timeline(
    client, db: Session, loop: dict[str, Any]
) -> None:  # type: ignore[no-untyped-def]
    project, first, reward = loop["project"], loop["first"], loop["reward"]
    user = make_user(db, Role.researcher)
    login(client, user.username)
    detail = client.get(f"/projects/{project.id}")
    assert f'href="/projects/{project.id}/iterations"' in detail.text
    # The project page itself shows the three curves side by side.
    assert detail.text.count("<svg") == 3
    assert "People's win rate" in detail.text and "KL from the reference" in detail.text
    page = client.get(f"/projects/{project.id}/iterations")
    assert page.status_code == 200, page.text
    html = page.text
    assert html.count("<svg") == 3  # people, reward model, KL
    row = html.split(f'id="policy-{first.id}"', 1)[1].split("</tr>", 1)[0]
    assert "4%" in row and "0–30%" in row and "0/11/1 W/L/T" in row and "n=12" in row
    assert "88%" in row  # the reward model's prediction
    assert "0.0800" in row  # KL
    assert "worse than parent" in row and "rejected" in row
    assert f'id="node-policy-{first.id}"' in html and f'id="node-reward-{reward.id}"' in html
    assert first.artifact_path in html
    assert f'href="/api/v1/models/{first.id}/download"' in html
    assert f"/api/v1/projects/{project.id}/export?shape=raw&amp;format=jsonl" in html
    models = client.get("/models")
    assert "rejected" in models.text and "worse than its parent" in models.text

    annotator = make_user(db, Role.annotator)
    client.cookies.clear()
    login(client, annotator.username)
    assert client.get(f"/projects/{project.id}/iterations").status_code == 403
    assert "<svg" not in client.get(f"/projects/{project.id}").text  # annotators see no curves


def test_an_empty_project_has_no_iterations(client, db: Session) -> None:  # type: ignore[no-untyped-def]
    project = make_project(db)
    assert winrate.policy_report(db, project.id) == []
    assert lineage.graph(db, project.id).to_json() == {
        "project_id": project.id,
        "nodes": [],
        "edges": [],
    }
    user = make_user(db, Role.admin)
    login(client, user.username)
    page = client.get(f"/projects/{project.id}/iterations")
    assert page.status_code == 200 and "No policy yet" in page.text


def test_ranking_judgments_count_as_pairwise_outcomes(db: Session, tmp_path: Path) -> None:
    project = make_project(db, mode=ProjectMode.ranking, candidates_per_task=3)
    annotator = make_user(db, Role.annotator)
    prompts = [make_prompt(db, project, [], text=f"q{i}").id for i in range(2)]
    _generate(db, project, None, prompts, "default")
    policy = _register(db, ModelKind.policy, tmp_path, project, config=BASE)
    job = _job(db, project, "generate", policy_id=policy.id)
    generation.store(
        db,
        project.id,
        {pid: [f"new a {pid}", f"new b {pid}"] for pid in prompts},
        source=f"policy:{policy.id}",
        model_version_id=policy.id,
        metadata={"job_id": job.id},
        rng=random.Random(0),
        max_pairs=16,
        parent_source="policy:default",
    )
    tasks = _tasks_of(db, f"policy:{policy.id}")
    assert len(tasks) == 2
    for task, sources in tasks:
        # Each ranking task keeps the default's answer next to the two new samples.
        assert sorted(sources.values()) == sorted(["policy:default"] + [f"policy:{policy.id}"] * 2)
        old = next(c for c, s in sources.items() if s == "policy:default")
        a, b = sorted(c for c in sources if c != old)
        _judge(db, task, annotator.id, [[a], [old], [b]])  # one new above, one below
    (report,) = winrate.policy_report(db, project.id)
    vs = report.vs_parent
    assert (vs.wins, vs.losses, vs.ties, vs.n, vs.rate) == (2, 2, 0, 4, 0.5)
    assert report.vs_first == vs
