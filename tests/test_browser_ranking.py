"""A real browser ranks by keyboard and by drag-and-drop (with ties), keeps a short lease alive
by heartbeat, loses an abandoned one to another annotator, and fits a phone-width screen.

One database, one live server and one Chromium serve the whole module (each test makes its
own project and users), which keeps the module to a few seconds plus the lease waits.
Leases here are 2-3 s with a 1 s heartbeat, so expiry is observed in real time.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, transaction
from app.main import create_app
from app.models import Judgment, Lease, Project, ProjectMode, Role, Task, utcnow
from tests.conftest import migrated_settings
from tests.factories import PASSWORD, make_project, make_prompt, make_task, make_user
from tests.live_server import serve
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, SWAPPED

pytestmark = pytest.mark.browser
_seq = itertools.count(1)


@dataclass
class Env:
    base: str
    sessions: sessionmaker[Session]
    browser: Any

    def seed(self, build: Callable[[Session], Any]) -> Any:
        with transaction(self.sessions) as s:
            return build(s)

    def read(self, query: Callable[[Session], Any]) -> Any:
        with self.sessions() as s:
            return query(s)

    def page(self, username: str, **context: Any) -> Any:
        """A fresh browser context (its own cookies), logged in as `username`."""
        ctx = self.browser.new_context(**context)
        page = ctx.new_page()
        page.set_default_timeout(8_000)
        page.goto(f"{self.base}/login")
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", PASSWORD)
        with page.expect_navigation():
            page.press("input[name=password]", "Enter")
        return page


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (CI installs it)")
    from playwright.sync_api import sync_playwright

    tmp: Path = tmp_path_factory.mktemp("browser-ranking")
    settings = migrated_settings("postgres", tmp, "prefloop_browser_ranking")
    settings = settings.model_copy(update={"heartbeat_interval_s": 1})
    engine = make_engine(settings)
    app = create_app(settings)
    try:
        with serve(app) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            yield Env(base, make_sessionmaker(engine), browser)
            browser.close()
    finally:
        app.state.engine.dispose()
        engine.dispose()


def annotator(s: Session) -> str:
    return make_user(s, Role.annotator, f"rank-annotator-{next(_seq)}").username


def ranking_project(s: Session, k: int, n_tasks: int = 1, **fields: Any) -> Project:
    project = make_project(
        s, name=f"ranking-{next(_seq)}", mode=ProjectMode.ranking, candidates_per_task=k, **fields
    )
    for i in range(n_tasks):
        texts = [f"Answer {i}-{j}: " + "words " * (j + 1) for j in range(k)]
        make_task(s, project, make_prompt(s, project, texts, text=f"Rank these ({i})"))
    return project


def shown(page: Any) -> list[tuple[str, str, str]]:
    """(label, completion id, rank select value) of each item, top to bottom."""
    return page.eval_on_selector_all(
        "#ranking-list .rank-item",
        "items => items.map(li => [li.querySelector('.item-label').textContent,"
        " li.dataset.completionId, li.querySelector('select').value])",
    )


def ids_by_label(page: Any) -> dict[str, int]:
    return {label: int(cid) for label, cid, _ in shown(page)}


def judgments_of(env: Env, project_id: int) -> list[Judgment]:
    return env.read(
        lambda s: s.scalars(
            select(Judgment).where(Judgment.project_id == project_id).order_by(Judgment.id)
        ).all()
    )


def submit_and_wait(page: Any) -> None:
    task_id = page.input_value("input[name=task_id]")
    page.keyboard.press("Enter")
    page.wait_for_function(SWAPPED, arg=task_id)


def test_rank_four_by_keyboard_with_ties(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=4, n_tasks=2))
    user = env.seed(annotator)
    page = env.page(user)
    page.goto(f"{env.base}/label/{project.id}")
    page.evaluate("window.__samePage = 1")
    ids = ids_by_label(page)
    assert [label for label, _, _ in shown(page)] == ["A", "B", "C", "D"]

    page.keyboard.press("ArrowDown")  # focus A
    page.keyboard.press("2")  # A: rank 2
    page.keyboard.press("ArrowDown")  # B (unranked items follow the ranked ones)
    page.keyboard.press("1")  # B: rank 1
    assert [lbl for lbl, _, _ in shown(page)] == ["B", "A", "C", "D"]
    page.keyboard.press("ArrowDown")  # A
    page.keyboard.press("ArrowDown")  # C
    page.keyboard.press("3")
    page.keyboard.press("ArrowDown")  # D
    page.keyboard.press("3")  # C and D tie at 3
    assert page.locator("#item-D.tied").count() == 1
    page.keyboard.press("t")  # untie: D gets its own rank below C
    assert [(lbl, v.split(":")[1]) for lbl, _, v in shown(page)] == [
        ("B", "1"),
        ("A", "2"),
        ("C", "3"),
        ("D", "4"),
    ]
    page.keyboard.press("Alt+ArrowUp")  # D moves above C
    page.keyboard.press("Shift+ArrowUp")  # and above A
    assert [lbl for lbl, _, _ in shown(page)] == ["B", "D", "A", "C"]
    assert page.evaluate("document.activeElement.id") == "item-D"
    page.keyboard.press("ArrowDown")  # A
    page.keyboard.press("ArrowDown")  # C
    page.keyboard.press("t")  # C ties with A
    assert [(lbl, v.split(":")[1]) for lbl, _, v in shown(page)] == [
        ("B", "1"),
        ("D", "2"),
        ("A", "3"),
        ("C", "3"),
    ]
    page.keyboard.press("n")  # none is acceptable
    assert page.is_checked("input[name=none_acceptable]")
    submit_and_wait(page)
    assert page.locator("#ranking-list .rank-item").count() == 4  # the second task is up
    assert page.evaluate("window.__samePage") == 1

    (row,) = judgments_of(env, project.id)
    assert row.ranking == [[ids["B"]], [ids["D"]], sorted([ids["A"], ids["C"]])]
    assert row.none_acceptable is True
    assert row.display_order == [ids[x] for x in "ABCD"]
    assert row.time_spent_ms is not None and row.time_spent_ms > 0
    page.context.close()


def test_enter_with_unranked_items_submits_nothing(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=3))
    page = env.page(env.seed(annotator))
    page.goto(f"{env.base}/label/{project.id}")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    assert "Give every answer a rank" in page.inner_text("#lease-notice")
    assert page.evaluate("document.activeElement.id") == "item-B"  # the first unranked
    assert judgments_of(env, project.id) == []
    page.context.close()


def test_rank_three_by_drag_and_drop(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=3))
    page = env.page(env.seed(annotator))
    page.goto(f"{env.base}/label/{project.id}")
    ids = ids_by_label(page)
    top_edge = {"x": 40, "y": 4}
    page.locator("#item-C").drag_to(page.locator("#item-A"), target_position=top_edge)
    assert [(lbl, v.split(":")[1]) for lbl, _, v in shown(page)] == [
        ("C", "1"),
        ("A", "2"),
        ("B", "3"),
    ]
    page.locator("#item-B").drag_to(page.locator("#item-A"), target_position=top_edge)
    assert [lbl for lbl, _, _ in shown(page)] == ["C", "B", "A"]
    page.locator("#item-A").focus()
    page.keyboard.press("t")  # and a tie by keyboard after dragging
    task_id = page.input_value("input[name=task_id]")
    page.click("button.primary")
    page.wait_for_function(SWAPPED, arg=task_id)
    assert page.locator("#all-done").count() == 1

    (row,) = judgments_of(env, project.id)
    assert row.ranking == [[ids["C"]], sorted([ids["B"], ids["A"]])]
    page.context.close()


def lease_of(env: Env, project_id: int) -> Lease | None:
    """The (only) lease on the project's tasks, read fresh from the database."""
    in_project = select(Task.id).where(Task.project_id == project_id)
    return env.read(lambda s: s.scalar(select(Lease).where(Lease.task_id.in_(in_project))))


def test_heartbeat_keeps_a_short_lease_alive(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=3, lease_seconds=3))
    page = env.page(env.seed(annotator))
    page.goto(f"{env.base}/label/{project.id}")
    first = lease_of(env, project.id)
    assert first is not None
    with page.expect_response(lambda r: r.url.endswith("/heartbeat") and r.status == 200):
        pass
    time.sleep(1.2)
    moved = lease_of(env, project.id)
    assert moved.id == first.id and moved.expires_at > first.expires_at
    deadline = first.expires_at.timestamp() + 1.0
    time.sleep(max(0.0, deadline - time.time()))  # past the first expiry
    still = lease_of(env, project.id)
    assert still.id == first.id and still.expires_at > utcnow()
    page.context.close()


def test_an_abandoned_lease_goes_to_another_annotator(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=3, lease_seconds=2))
    alice, bob = env.seed(annotator), env.seed(annotator)
    page_a = env.page(alice)
    page_a.goto(f"{env.base}/label/{project.id}")
    task_id = page_a.input_value("input[name=task_id]")
    page_b = env.page(bob)
    page_b.goto(f"{env.base}/label/{project.id}")
    assert page_b.locator("#all-done").count() == 1  # alice holds the only task

    page_a.context.close()  # the tab is gone: no more heartbeats
    lease = lease_of(env, project.id)
    time.sleep(max(0.0, lease.expires_at.timestamp() - time.time()) + 0.3)
    page_b.goto(f"{env.base}/label/{project.id}")
    assert page_b.input_value("input[name=task_id]") == task_id
    page_b.keyboard.press("ArrowDown")
    for key in ("1", "ArrowDown", "2", "ArrowDown", "3"):
        page_b.keyboard.press(key)
    submit_and_wait(page_b)
    (row,) = judgments_of(env, project.id)
    assert str(row.task_id) == task_id and row.user_id != lease.user_id
    page_b.context.close()


LONG = "\n".join(f"line {i}: " + "lorem ipsum " * 3 for i in range(150))


def test_phone_width_and_pair_panes_scroll_together(env: Env):
    def build(s: Session) -> tuple[Project, Project]:
        pairs = make_project(s, name=f"pairs-{next(_seq)}")
        make_task(s, pairs, make_prompt(s, pairs, [LONG, LONG + "\nshort tail"], text="Long?"))
        return pairs, ranking_project(s, k=5)

    pairs, ranks = env.seed(build)
    user = env.seed(annotator)
    phone = env.page(user, viewport={"width": 375, "height": 740})
    for project in (pairs, ranks):
        phone.goto(f"{env.base}/label/{project.id}")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 375, project.name
    phone.context.close()

    wide = env.page(user, viewport={"width": 1280, "height": 800})
    wide.goto(f"{env.base}/label/{pairs.id}")
    assert wide.evaluate("document.documentElement.scrollWidth") <= 1280
    wide.eval_on_selector("#candidate-A", "el => { el.scrollTop = 600; }")
    wide.wait_for_function("document.getElementById('candidate-B').scrollTop > 0")
    a, b = wide.evaluate(
        "['candidate-A', 'candidate-B'].map(id => { const e = document.getElementById(id);"
        " return e.scrollTop / (e.scrollHeight - e.clientHeight); })"
    )
    assert b == pytest.approx(a, abs=0.02)
    wide.context.close()
