"""The project monitor: task states, activity per day, annotators' gold accuracy and speed,
open leases (service values on both backends), and its page and JSON API with their roles."""

from __future__ import annotations

import itertools
import random
import re
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from app.models import Project, Role, Task, TaskState, User, utcnow
from app.services import gold, judgments, monitoring, tasks
from app.services import users as users_service
from tests.factories import make_project, make_prompt, make_task, make_token

T0 = datetime(2026, 4, 10, 8, 30, tzinfo=UTC)
_names = itertools.count(1)


def make_user(db: Session, role: Role = Role.annotator, name: str | None = None) -> User:
    return users_service.create(db, name or f"mon-{role.value}{next(_names)}", role, None)


def pair(db: Session, project: Project, external_id: str | None = None, **fields) -> Task:  # type: ignore[no-untyped-def]
    prompt = make_prompt(db, project, ["one", "two"], external_id=external_id)
    return make_task(db, project, prompt, **fields)


def judge(db: Session, task: Task, user: User, at: datetime, ms: int | None = None, **verdict):  # type: ignore[no-untyped-def]
    verdict = verdict or {"choice": "tie"}
    judgments.record(db, task.id, user, now=at, time_spent_ms=ms, **verdict)


def scenario(db: Session, at: datetime) -> dict:  # type: ignore[type-arg]
    """Two days of work by alice and bob, a retired task, a gold task, and carol's live lease."""
    project = make_project(db, judgments_per_task=2, gold_rate=0.0)
    alice, bob, carol = make_user(db), make_user(db), make_user(db)
    done = pair(db, project)
    partly = pair(db, project, external_id="<img src=x onerror=alert(1)>")
    untouched = pair(db, project)
    pair(db, project, state=TaskState.retired)
    golden = gold.mark(db, pair(db, project).id, "tie")
    day1, day2 = at - timedelta(days=2), at - timedelta(days=1)
    judge(db, done, alice, day1, 1000)
    judge(db, done, bob, day1 + timedelta(minutes=5), 2000)
    judge(db, partly, alice, day2, 3000)
    judge(db, golden, alice, day2, 10_000)  # a tie: correct
    judge(db, golden, bob, day2, 4000, choice=golden.completion_ids[0])  # wrong
    tasks.claim_next(db, project.id, carol, now=at, rng=random.Random(0), lease_seconds=90)
    return {
        "project": project,
        "alice": alice,
        "bob": bob,
        "carol": carol,
        "untouched": untouched,
        "partly": partly,
        "golden": golden,
        "day1": day1.date(),
        "day2": day2.date(),
    }


def test_task_states_activity_annotators_and_leases(db):
    s = scenario(db, T0)
    project = s["project"]
    o = monitoring.overview(db, project.id, now=T0, days=3)

    assert o.tasks == monitoring.TaskStates(
        open=2, in_progress=1, done=1, retired=1, leased=1, gold=1
    )
    assert o.tasks.total == 4

    assert o.activity.days == [s["day1"], s["day2"], T0.date()]
    names = dict(o.activity.users)
    assert {names[u]: c for u, c in o.activity.counts.items()} == {
        s["alice"].username: [1, 2, 0],
        s["bob"].username: [1, 1, 0],
    }
    assert o.activity.totals == [2, 3, 0]

    rows = {a.username: a for a in o.annotators}
    alice, bob = rows[s["alice"].username], rows[s["bob"].username]
    assert (alice.judgments, alice.gold_judged, alice.gold_correct) == (2, 1, 1)
    assert (bob.judgments, bob.gold_judged, bob.gold_correct) == (1, 1, 0)
    assert (alice.gold_accuracy, bob.gold_accuracy) == (1.0, 0.0)
    assert alice.median_seconds == pytest.approx(3.0)  # of 1, 3 and 10 s
    assert bob.median_seconds == pytest.approx(3.0)  # of 2 and 4 s: the mean of the middle two
    assert alice.last_judgment_at is not None and alice.last_judgment_at.date() == s["day2"]
    assert [a.username for a in o.annotators][0] == s["alice"].username  # busiest first

    assert o.leases.count == 1
    (lease,) = o.leases.rows
    # carol was given the partly judged task: finishing tasks comes first
    assert (lease.username, lease.task_id) == (s["carol"].username, s["partly"].id)
    assert lease.expires_in_s == 90.0 and lease.expires_at == T0 + timedelta(seconds=90)
    later = monitoring.open_leases(db, project.id, now=T0 + timedelta(seconds=60))
    assert later.rows[0].expires_in_s == 30.0
    assert monitoring.open_leases(db, project.id, now=T0 + timedelta(seconds=91)).count == 0

    assert [(g.task_id, g.judged, g.correct) for g in o.gold_tasks] == [(s["golden"].id, 2, 1)]


def test_activity_window_and_missing_project(db):
    s = scenario(db, T0)
    one_day = monitoring.activity(db, s["project"].id, now=T0, days=1)
    assert one_day.days == [T0.date()] and one_day.counts == {} and one_day.totals == [0]
    with pytest.raises(Exception, match="no project"):
        monitoring.overview(db, 999_999, now=T0)


def test_monitor_json_for_admins_only(client, db):
    s = scenario(db, utcnow())
    project = s["project"]
    admin = make_token(db, make_user(db, Role.admin))
    resp = client.get(f"/api/v1/projects/{project.id}/monitor?days=3", headers=admin)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["tasks"] == {
        "open": 2,
        "in_progress": 1,
        "done": 1,
        "retired": 1,
        "leased": 1,
        "gold": 1,
        "total": 4,
    }
    assert [date.fromisoformat(d) for d in body["activity"]["days"]][-1] == utcnow().date()
    assert body["activity"]["counts"][s["alice"].username] == [1, 2, 0]
    alice = next(a for a in body["annotators"] if a["username"] == s["alice"].username)
    assert alice["gold_accuracy"] == 1.0 and alice["median_seconds"] == pytest.approx(3.0)
    assert body["leases"]["count"] == 1
    lease = body["leases"]["leases"][0]
    assert lease["username"] == s["carol"].username and 80 < lease["expires_in_s"] <= 90
    assert body["gold_tasks"][0]["judged"] == 2

    for path in ("annotators", "leases", "activity", "gold"):
        ok = client.get(f"/api/v1/projects/{project.id}/{path}", headers=admin)
        assert ok.status_code == 200, path
    assert len(client.get(f"/api/v1/projects/{project.id}/annotators", headers=admin).json()) == 2
    assert client.get(f"/api/v1/projects/{project.id}/leases", headers=admin).json()["count"] == 1

    for role in (Role.annotator, Role.researcher):
        other = make_token(db, make_user(db, role))
        denied = client.get(f"/api/v1/projects/{project.id}/monitor", headers=other)
        assert denied.status_code == 403, role
    assert client.get("/api/v1/projects/999999/monitor", headers=admin).status_code == 404
    bad_days = client.get(f"/api/v1/projects/{project.id}/monitor?days=0", headers=admin)
    assert bad_days.status_code == 422


def test_admin_page_shows_every_table_escaped(client, db):
    s = scenario(db, utcnow())
    project = s["project"]
    admin = make_token(db, make_user(db, Role.admin))
    page = client.get(f"/projects/{project.id}/admin", headers=admin)
    assert page.status_code == 200
    html = page.text
    assert "<html" in html and 'id="activity-chart"' in html
    stats = re.search(r'id="task-states">(.*?)</div>\s*</div>', html, re.S).group(1)  # type: ignore[union-attr]
    assert "<b>1</b>not started" in stats and "<b>1</b>partly judged" in stats
    annot = html.split('id="annotators-table"', 1)[1].split("</table>", 1)[0]
    assert s["alice"].username in annot and "100% (1/1)" in annot and "0% (0/1)" in annot
    leases = html.split('id="leases-table"', 1)[1].split("</table>", 1)[0]
    assert s["carol"].username in leases
    assert "&lt;img src=x onerror=alert(1)&gt;" in leases and "<img src=x" not in html
    assert f"#{s['golden'].id}" in html.split('id="gold-table"', 1)[1]

    live = client.get(f"/projects/{project.id}/admin", headers={**admin, "HX-Request": "true"})
    assert live.status_code == 200 and "<html" not in live.text
    assert live.text.lstrip().startswith('<div id="live"') and 'id="leases-table"' in live.text

    annotator = make_token(db, make_user(db))
    assert client.get(f"/projects/{project.id}/admin", headers=annotator).status_code == 403


def test_admin_page_with_no_activity(client, db):
    project = make_project(db)
    admin = make_token(db, make_user(db, Role.admin))
    html = client.get(f"/projects/{project.id}/admin", headers=admin).text
    assert "Nobody has judged here yet." in html and "No open leases" in html


def test_pause_and_resume_from_the_admin_page(client, db):
    s = scenario(db, utcnow())
    project, bob = s["project"], s["bob"]
    admin = make_token(db, make_user(db, Role.admin))
    url = f"/projects/{project.id}/admin/users/{bob.id}/active"
    resp = client.post(url, data={"active": "false"}, headers=admin, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].endswith("/admin#annotators")
    db.refresh(bob)
    assert bob.active is False
    html = client.get(f"/projects/{project.id}/admin", headers=admin).text
    row = re.search(rf'data-user-id="{bob.id}">.*?</tr>', html, re.S).group(0)  # type: ignore[union-attr]
    assert "paused" in row and ">Resume<" in row
    client.post(url, data={"active": "true"}, headers=admin)
    db.refresh(bob)
    assert bob.active is True


def test_gold_form_on_the_admin_page(client, db):
    s = scenario(db, utcnow())
    project, task = s["project"], s["untouched"]
    admin = make_token(db, make_user(db, Role.admin))
    url = f"/projects/{project.id}/admin/gold"
    ok = client.post(
        url, data={"task_id": task.id, "answer": " tie "}, headers=admin, follow_redirects=False
    )
    assert ok.status_code == 303
    db.refresh(task)
    assert task.is_gold and task.gold_answer == [sorted(task.completion_ids)]
    winner = task.completion_ids[1]
    client.post(url, data={"task_id": task.id, "answer": f"[{winner}]"}, headers=admin)
    db.refresh(task)
    assert task.gold_answer == [[winner]]
    bad = client.post(url, data={"task_id": task.id, "answer": "[1,"}, headers=admin)
    assert bad.status_code == 422 and "JSON ranking" in bad.text
    elsewhere = make_project(db)
    wrong = client.post(
        f"/projects/{elsewhere.id}/admin/gold",
        data={"task_id": task.id, "answer": "tie"},
        headers=admin,
    )
    assert wrong.status_code == 404
    client.post(url, data={"task_id": task.id, "answer": ""}, headers=admin)
    db.refresh(task)
    assert not task.is_gold
