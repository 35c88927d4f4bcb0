"""The quality report: hand-computed agreement on a small project, planted biases found on a
synthetic one, source strengths, roles, and the page with its SVG charts."""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.models import Completion, Judgment, Project, Role, Task, TaskState, User
from app.services import quality
from tests.factories import make_project, make_prompt, make_task, make_token, make_user


def verdict(
    db: Session,
    task: Task,
    user: User,
    winner: int | None,
    *,
    shown: list[int] | None = None,
    time_ms: int | None = 8000,
) -> Judgment:
    """A pairwise judgment: `winner` a completion id, or None for a tie; `shown` the display
    order (default: the task's)."""
    a, b = task.completion_ids
    ranking = [[a, b]] if winner is None else [[winner], [b if winner == a else a]]
    judgment = Judgment(
        project_id=task.project_id,
        task_id=task.id,
        user_id=user.id,
        ranking=ranking,
        display_order=shown if shown is not None else [a, b],
        time_spent_ms=time_ms,
    )
    db.add(judgment)
    task.judgment_count += 1
    task.state = TaskState.done
    db.flush()
    return judgment


def sourced_task(
    db: Session, project: Project, texts: tuple[str, str], sources: tuple[str, str]
) -> Task:
    prompt = make_prompt(db, project, list(texts))
    for completion, source in zip(prompt.completions, sources, strict=True):
        completion.source = source
    db.flush()
    return make_task(db, project, prompt)


def test_report_by_hand(db: Session) -> None:
    """Three tasks, alice and bob on each: t1 both prefer the lower id (-1, -1), t2 both the
    higher (1, 1), t3 they split (-1, 1).

    Pairwise agreement 2/3. Krippendorff's alpha (ordinal): o[-1,-1] = o[1,1] = 2,
    o[-1,1] = o[1,-1] = 1; n_-1 = n_1 = 3, n = 6; d(-1,1) = 6 - 3 = 3, d2 = 9;
    observed 2*9 = 18, expected 2*3*3*9 = 162; alpha = 1 - 5*18/162 = 4/9.
    """
    project = make_project(db, judgments_per_task=2)
    alice = make_user(db, username="alice-q")
    bob = make_user(db, username="bob-q")
    t1 = sourced_task(db, project, ("a1", "b1"), ("upload", "model-x"))
    t2 = sourced_task(db, project, ("a2", "b2longer"), ("upload", "model-x"))
    t3 = sourced_task(db, project, ("a3", "b3"), ("upload", "model-x"))
    for task, (w_alice, w_bob) in ((t1, (0, 0)), (t2, (1, 1)), (t3, (0, 1))):
        verdict(db, task, alice, task.completion_ids[w_alice], time_ms=2000)
        verdict(
            db, task, bob, task.completion_ids[w_bob], shown=list(reversed(task.completion_ids))
        )

    q = quality.report(db, project.id, replicates=20).to_json()
    assert (q["judgments"], q["tasks"], q["tasks_with_overlap"]) == (6, 3, 3)
    assert q["agreement"]["pairwise"] == pytest.approx(2 / 3)
    assert (q["agreement"]["agree"], q["agreement"]["compared"]) == (2, 3)
    assert q["agreement"]["krippendorff_alpha_ordinal"] == pytest.approx(4 / 9)
    assert q["agreement"]["consensus_methods"] == {"kemeny": 1, "unanimous": 2}

    people = {a["username"]: a for a in q["annotators"]}
    assert people["alice-q"]["agreement_with_consensus"] == pytest.approx(2 / 3)
    assert people["bob-q"]["agreement_pairs"] == 3
    # alice saw the task order: she picked the first shown on t1 and t3, the second on t2.
    assert (people["alice-q"]["position_bias"]["k"], people["alice-q"]["position_bias"]["n"]) == (
        2,
        3,
    )
    # bob saw them reversed (b first) and picked b on t2 and t3.
    assert people["bob-q"]["position_bias"]["k"] == 2
    # Length: only t2's texts differ in length ("b2longer"); both picked it.
    assert (people["alice-q"]["length_bias"]["k"], people["alice-q"]["length_bias"]["n"]) == (1, 1)
    assert q["length_bias"]["longer_wins"]["k"] == 2
    # Speed: alice took 2 s on each (under the 3 s threshold), bob 8 s.
    assert people["alice-q"]["fast"]["k"] == 3 and people["bob-q"]["fast"]["k"] == 0
    assert people["alice-q"]["median_time_ms"] == 2000
    assert q["speed"] == {"threshold_ms": 3000, "robust_z": -3.5, "fast": 3, "timed": 6}
    # Sources: upload won 3 of 6 comparisons against model-x.
    strengths = {s["source"]: s for s in q["sources"]["strengths"]}
    assert set(strengths) == {"upload", "model-x"}
    assert strengths["upload"]["wins"] == 3 and strengths["upload"]["comparisons"] == 6
    assert strengths["upload"]["theta"] == pytest.approx(0.0, abs=1e-9)
    assert people["alice-q"]["gold_accuracy"] is None


@pytest.mark.parametrize("alternate", [False, True])
def test_alpha_does_not_depend_on_upload_order(db: Session, alternate: bool) -> None:
    """The QA case through the report: 10 tasks of a short and a long answer, uploaded short
    first (the long one always has the higher id) or alternating; alice and bob prefer the
    long one on all 10 and carol on 7. Same judgments, same numbers either way: alice/bob
    alpha 1.0 (it was None for short-first), and with carol the outlier of a 2-vs-1 split."""
    project = make_project(db, judgments_per_task=3)
    alice, bob, carol = (make_user(db, username=f"{n}-order") for n in ("alice", "bob", "carol"))
    tasks = []
    for i in range(10):
        texts = [f"short {i}", f"a much longer answer {i}"]
        task = make_task(
            db, project, make_prompt(db, project, texts[::-1] if alternate and i % 2 else texts)
        )
        tasks.append(task)
    for i, task in enumerate(tasks):
        long_id = max(task.completion_ids, key=lambda c: len(db.get(Completion, c).text))
        short_id = next(c for c in task.completion_ids if c != long_id)
        verdict(db, task, alice, long_id)
        verdict(db, task, bob, long_id)
        verdict(db, task, carol, long_id if i < 7 else short_id)

    q = quality.report(db, project.id, replicates=20).to_json()
    # 10 units of three values; 7 unanimous, 3 of (L, L, S). Symmetrised: n = 30, n_-1 = n_1
    # = 15; observed o[L,S] = 3 units * 2 ordered pairs * 2 / 2 (m - 1 = 2) = 6, split
    # evenly over (-1,1) and (1,-1); d2(-1,1) = (n_-1/2 + n_0 + n_1/2)^2 = 15^2 = 225;
    # alpha = 1 - (n - 1) * sum o d2 / sum n_c n_k d2 = 1 - 29 * 6 * 225 / (2 * 15 * 15 * 225)
    assert q["agreement"]["krippendorff_alpha_ordinal"] == pytest.approx(1 - 29 * 6 / 450)
    people = {a["username"]: a for a in q["annotators"]}
    # the others agree on every task for carol (alice and bob: long), so she is scored on all
    # 10; for alice the others (bob, carol) are split on 3 tasks, which do not count.
    assert (
        people["carol-order"]["agreement_with_consensus"],
        people["carol-order"]["agreement_pairs"],
    ) == (pytest.approx(0.7), 10)
    assert (
        people["alice-order"]["agreement_with_consensus"],
        people["alice-order"]["agreement_pairs"],
    ) == (1.0, 7)


def test_planted_position_bias_speed_and_source_strength(db: Session) -> None:
    """300 tasks of policy-a vs policy-b (a truly wins 75%). 'lefty' picks whatever is shown
    first 90% of the time and answers in 1-2.5 s; 'fair' follows the truth and takes 5-20 s."""
    rng = random.Random(42)
    project = make_project(db, judgments_per_task=2)
    lefty = make_user(db, username="lefty-q")
    fair = make_user(db, username="fair-q")
    for i in range(300):
        task = sourced_task(
            db, project, (f"answer a {i}", f"answer b {i}"), ("policy-a", "policy-b")
        )
        a, b = task.completion_ids
        truth = a if rng.random() < 0.75 else b
        for user in (lefty, fair):
            shown = [a, b] if rng.random() < 0.5 else [b, a]
            if user is lefty and rng.random() < 0.9:
                winner, time_ms = shown[0], rng.randint(1000, 2500)
            elif user is lefty:
                winner, time_ms = truth, rng.randint(1000, 2500)
            else:
                winner, time_ms = truth, rng.randint(5000, 20000)
            verdict(db, task, user, winner, shown=shown, time_ms=time_ms)

    q = quality.report(db, project.id, replicates=50).to_json()
    people = {a["username"]: a for a in q["annotators"]}
    assert people["lefty-q"]["position_bias"]["p_value"] < 0.01
    assert people["lefty-q"]["position_bias"]["significant"]
    assert (
        "position bias" in people["lefty-q"]["flags"] and "too fast" in people["lefty-q"]["flags"]
    )
    assert people["fair-q"]["position_bias"]["p_value"] > 0.01
    assert people["fair-q"]["flags"] == []
    assert people["lefty-q"]["fast"]["p_value"] < 0.01
    strengths = q["sources"]["strengths"]
    assert [s["source"] for s in strengths] == ["policy-a", "policy-b"]
    assert strengths[0]["low"] > 0 > strengths[1]["high"]  # the interval excludes a tie
    assert 0.5 < strengths[0]["win_rate_vs_average"] < 1
    # Same seed, same report.
    assert quality.report(db, project.id, replicates=50).to_json() == q


def test_imported_annotators_are_marked_and_skip_display_audits(db: Session) -> None:
    project = make_project(db)
    ext = make_user(db, username="hh-q")
    project.settings = {quality.EXTERNAL_KEY: ["hh-q"]}
    task = sourced_task(db, project, ("x", "yy"), ("import", "import"))
    verdict(db, task, ext, task.completion_ids[0], shown=[], time_ms=None)
    q = quality.report(db, project.id).to_json()
    (person,) = q["annotators"]
    assert person["external"] is True
    assert person["position_bias"]["n"] == 0 and person["fast"] is None
    assert q["sources"]["strengths"] == []  # one source: nothing to compare


def test_empty_project(db: Session) -> None:
    q = quality.report(db, make_project(db).id).to_json()
    assert q["judgments"] == 0 and q["annotators"] == []
    assert (
        q["agreement"]["pairwise"] is None and q["agreement"]["krippendorff_alpha_ordinal"] is None
    )


@pytest.fixture
def small(db: Session) -> dict[str, Any]:
    project = make_project(db, judgments_per_task=2)
    users = [make_user(db, username=f"q-{n}") for n in ("ann", "bee")]
    for i in range(4):
        task = sourced_task(db, project, (f"left {i}", f"right <b>{i}</b>"), ("upload", "model 7"))
        for user in users:
            verdict(db, task, user, task.completion_ids[i % 2])
    return {"project": project, "users": users}


def test_api_json_and_roles(client, db: Session, small: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    url = f"/api/v1/projects/{small['project'].id}/quality"
    assert client.get(url).status_code == 401
    assert client.get(url, headers=make_token(db, make_user(db, Role.annotator))).status_code == 403
    resp = client.get(url, headers=make_token(db, make_user(db, Role.researcher)))
    assert resp.status_code == 200
    body = resp.json()
    assert body["agreement"]["pairwise"] == 1.0 and body["judgments"] == 8
    assert {a["username"] for a in body["annotators"]} == {"q-ann", "q-bee"}
    admin = make_token(db, make_user(db, Role.admin))
    assert client.get(url, headers=admin, params={"fast_ms": 9000}).json()["speed"]["fast"] == 8
    assert client.get(url, headers=admin, params={"fast_ms": 5}).status_code == 422
    assert client.get("/api/v1/projects/987654/quality", headers=admin).status_code == 404


def test_page_renders_charts(client, db: Session, small: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    url = f"/projects/{small['project'].id}/quality"
    resp = client.get(url, headers=make_token(db, make_user(db, Role.researcher)))
    assert resp.status_code == 200
    page = resp.text
    assert page.count("<svg") == 4  # sources, position, agreement, length
    assert "Krippendorff" in page and "q-ann" in page and "model 7" in page
    assert "100%" in page  # both annotators always agree
    annotator = make_token(db, make_user(db, Role.annotator))
    assert client.get(url, headers=annotator).status_code == 403
