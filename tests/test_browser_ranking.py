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
from app.models import Judgment, Lease, Project, ProjectMode, Role, Task, TaskState, utcnow
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


def ranks(page: Any) -> list[tuple[str, str]]:
    """(label, rank or "" while unranked) of each item, top to bottom."""
    return [(label, value.partition(":")[2]) for label, _, value in shown(page)]


def tied(page: Any) -> list[str]:
    """Labels of the items marked "= tied with the one above" (the marker is visible)."""
    return page.eval_on_selector_all(
        "#ranking-list .rank-item .tie-mark",
        "marks => marks.filter(m => m.checkVisibility())"
        ".map(m => m.closest('.rank-item').querySelector('.item-label').textContent)",
    )


def focused(page: Any) -> str:
    return page.evaluate("document.activeElement.id")


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
    assert page.inner_text("#rank-notice") == (
        "Give every answer a rank first (equal ranks are ties); B, C have none yet."
    )
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
    assert ranks(page) == [("C", "1"), ("A", ""), ("B", "")]  # only the dragged one is ranked
    page.locator("#item-B").drag_to(page.locator("#item-A"), target_position=top_edge)
    assert ranks(page) == [("C", "1"), ("B", "2"), ("A", "")]  # below the ranked ones
    page.locator("#item-A").focus()
    page.keyboard.press("t")  # and a tie by keyboard after dragging
    task_id = page.input_value("input[name=task_id]")
    page.click("button.primary")
    page.wait_for_function(SWAPPED, arg=task_id)
    assert page.locator("#all-done").count() == 1

    (row,) = judgments_of(env, project.id)
    assert row.ranking == [[ids["C"]], sorted([ids["B"], ids["A"]])]
    page.context.close()


def test_t_ties_with_the_one_above_keeps_it_below_and_again_unties(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=4))
    page = env.page(env.seed(annotator))
    page.goto(f"{env.base}/label/{project.id}")
    ids = ids_by_label(page)
    for key in ("ArrowDown", "ArrowDown", "1", "ArrowDown", "2"):  # B = 1, then A = 2
        page.keyboard.press(key)
    assert ranks(page) == [("B", "1"), ("A", "2"), ("C", ""), ("D", "")]
    page.keyboard.press("t")  # A ties with B and stays below it, marked as the tied one
    assert ranks(page) == [("B", "1"), ("A", "1"), ("C", ""), ("D", "")]
    assert tied(page) == ["A"] and focused(page) == "item-A"
    page.keyboard.press("t")  # again: A unties, back to its own rank right below B
    assert ranks(page) == [("B", "1"), ("A", "2"), ("C", ""), ("D", "")]
    assert tied(page) == [] and focused(page) == "item-A"

    page.keyboard.press("ArrowDown")  # C, unranked: t ranks it with A, the one above
    page.keyboard.press("t")
    assert ranks(page) == [("B", "1"), ("A", "2"), ("C", "2"), ("D", "")]
    assert tied(page) == ["C"]
    page.keyboard.press("t")  # C unties (it used to be tied to another answer instead)
    assert ranks(page) == [("B", "1"), ("A", "2"), ("C", "3"), ("D", "")]
    page.keyboard.press("t")
    assert tied(page) == ["C"]

    page.keyboard.press("ArrowDown")  # D: the one above it is C, so t ties D with C
    page.keyboard.press("t")
    assert ranks(page) == [("B", "1"), ("A", "2"), ("C", "2"), ("D", "2")]
    assert tied(page) == ["C", "D"]
    page.keyboard.press("ArrowUp")  # C, in the middle of the tie, leaves it for below it
    page.keyboard.press("t")
    assert ranks(page) == [("B", "1"), ("A", "2"), ("D", "2"), ("C", "3")]
    assert tied(page) == ["D"] and focused(page) == "item-C"

    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")  # B, at the top: nothing to tie with
    page.keyboard.press("t")
    assert ranks(page) == [("B", "1"), ("A", "2"), ("D", "2"), ("C", "3")]
    assert page.inner_text("#rank-notice") == "The top answer has nothing above it to tie with."
    submit_and_wait(page)
    (row,) = judgments_of(env, project.id)
    assert row.ranking == [[ids["B"]], sorted([ids["A"], ids["D"]]), [ids["C"]]]
    page.context.close()


def test_only_answers_the_annotator_touched_get_a_rank(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=4, n_tasks=2))
    page = env.page(env.seed(annotator), viewport={"width": 1280, "height": 900})
    page.goto(f"{env.base}/label/{project.id}")
    for key in ("ArrowDown", "ArrowDown", "1", "ArrowDown", "2", "t"):  # B = 1, A = 2, tie
        page.keyboard.press(key)
    assert ranks(page) == [("B", "1"), ("A", "1"), ("C", ""), ("D", "")]
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("t")  # D cannot tie with C, which has no rank
    assert ranks(page) == [("B", "1"), ("A", "1"), ("C", ""), ("D", "")]
    assert page.inner_text("#rank-notice") == "Give answer C a rank first; T then ties D with it."
    page.keyboard.press("Enter")  # refused: C and D were never ranked
    assert page.inner_text("#rank-notice") == (
        "Give every answer a rank first (equal ranks are ties); C, D have none yet."
    )
    assert page.locator(".rank-item.missing").evaluate_all("items => items.map(li => li.id)") == [
        "item-C",
        "item-D",
    ]
    assert focused(page) == "item-C"
    assert judgments_of(env, project.id) == []
    page.keyboard.press("3")  # C = 3: the notice and C's mark follow what is left
    assert page.inner_text("#rank-notice").endswith("D has none yet.")
    assert page.locator(".rank-item.missing").count() == 1
    page.keyboard.press("ArrowDown")
    page.keyboard.press("t")  # D ties with C
    assert page.inner_text("#rank-notice") == ""
    assert page.locator(".rank-item.missing").count() == 0
    ids = ids_by_label(page)
    submit_and_wait(page)
    (row,) = judgments_of(env, project.id)
    assert row.ranking == [sorted([ids["B"], ids["A"]]), sorted([ids["C"], ids["D"]])]

    # The second task: a drag ranks the dragged answer only, where it was dropped.
    ids = ids_by_label(page)
    top_edge = {"x": 40, "y": 4}
    page.locator("#item-D").drag_to(page.locator("#item-A"), target_position=top_edge)
    assert ranks(page) == [("D", "1"), ("A", ""), ("B", ""), ("C", "")]
    page.locator("#item-C").focus()
    page.keyboard.press("Shift+ArrowUp")  # an unranked answer moved joins the ranking's bottom
    assert ranks(page) == [("D", "1"), ("C", "2"), ("A", ""), ("B", "")]
    page.keyboard.press("Alt+ArrowUp")  # and moves on from there
    assert ranks(page) == [("C", "1"), ("D", "2"), ("A", ""), ("B", "")]
    page.keyboard.press("Alt+ArrowDown")
    page.keyboard.press("Alt+ArrowDown")  # the bottom of the ranking: it stays above the unranked
    assert ranks(page) == [("D", "1"), ("C", "2"), ("A", ""), ("B", "")]
    page.locator("#item-B").drag_to(page.locator("#item-D"), target_position=top_edge)
    assert ranks(page) == [("B", "1"), ("D", "2"), ("C", "3"), ("A", "")]
    page.locator("#item-A").focus()
    page.keyboard.press("Enter")  # refused: A has no rank
    assert len(judgments_of(env, project.id)) == 1
    page.keyboard.press("4")
    submit_and_wait(page)
    row = judgments_of(env, project.id)[-1]
    assert row.ranking == [[ids["B"]], [ids["D"]], [ids["C"]], [ids["A"]]]
    page.context.close()


def in_view(page: Any, selector: str) -> bool:
    return page.eval_on_selector(
        selector,
        "el => { const r = el.getBoundingClientRect();"
        " return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight; }",
    )


def test_a_refused_submit_is_said_where_the_annotator_looks(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=5))
    page = env.page(env.seed(annotator), viewport={"width": 1280, "height": 900})
    page.goto(f"{env.base}/label/{project.id}")
    for key in ("ArrowDown", "1", "ArrowDown", "2", "ArrowDown", "3", "ArrowDown", "4"):
        page.keyboard.press(key)  # A-D ranked, E not
    page.click("button.primary")  # Submit, scrolled to by the click
    assert focused(page) == "item-E"
    assert page.inner_text("#item-E .need-rank") == "needs a rank"
    assert in_view(page, "#item-E .need-rank") and in_view(page, "#rank-notice")
    notice = page.locator("#rank-notice").bounding_box()
    assert notice["y"] < page.locator("button.primary").bounding_box()["y"]  # above Submit
    assert page.get_attribute("#rank-notice", "role") == "status"  # read out as well

    page.locator("#item-A").focus()
    page.keyboard.press("0")  # A loses its rank and joins E below the ranked answers
    assert ranks(page) == [("B", "2"), ("C", "3"), ("D", "4"), ("A", ""), ("E", "")]
    page.click("button.primary")
    assert focused(page) == "item-A"
    assert in_view(page, "#item-A .need-rank") and in_view(page, "#item-E .need-rank")
    assert page.inner_text("#rank-notice").endswith("A, E have none yet.")
    assert judgments_of(env, project.id) == []
    page.context.close()


def test_a_task_gone_meanwhile_says_so_in_sentences(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=3))
    page = env.page(env.seed(annotator))
    page.goto(f"{env.base}/label/{project.id}")
    task_id = int(page.input_value("input[name=task_id]"))

    def retire(s: Session) -> None:
        s.get(Task, task_id).state = TaskState.retired

    env.seed(retire)
    for key in ("ArrowDown", "1", "ArrowDown", "2", "ArrowDown", "3", "Enter"):
        page.keyboard.press(key)
    page.wait_for_function("document.getElementById('lease-notice').textContent !== ''")
    message = page.inner_text("#lease-notice")
    assert message.startswith(f"Task {task_id} no longer needs a judgment")
    assert message.endswith("please continue with the next task. Loading the next task…")
    page.wait_for_selector("#all-done")
    page.context.close()


def visible_text(page: Any, selector: str) -> str:
    return " ".join(page.inner_text(selector).split())


def test_help_reads_well_on_a_phone_and_without_javascript(env: Env):
    project = env.seed(lambda s: ranking_project(s, k=4))
    user = env.seed(annotator)
    plain = (
        "Order the answers best first: pick each answer's rank (1 = best) from its menu."
        " Every answer needs a rank; equal ranks are ties."
    )

    wide = env.page(user, viewport={"width": 1280, "height": 900})
    wide.goto(f"{env.base}/label/{project.id}")
    assert visible_text(wide, "#rank-help") == (
        "Order the answers best first. Drag them, or focus one (↑/↓) and press its rank 1–4;"
        ' Alt/Shift+↑/↓ moves it; T ties it with the one above (again unties); N toggles "none'
        ' is acceptable". Every answer needs a rank; equal ranks are ties.'
    )
    assert wide.locator("label kbd:visible, .key-hint:visible").count() == 2  # N, Enter submits
    wide.context.close()

    phone = env.page(user, viewport={"width": 375, "height": 740})
    phone.goto(f"{env.base}/label/{project.id}")
    assert visible_text(phone, "#rank-help") == plain
    assert phone.locator("kbd:visible, .key-hint:visible").count() == 0
    assert phone.locator(".none-ok").inner_text().strip() == "None of these is acceptable"
    phone.context.close()

    no_js = env.page(user, java_script_enabled=False, viewport={"width": 1280, "height": 900})
    no_js.goto(f"{env.base}/label/{project.id}")
    assert visible_text(no_js, "#rank-help") == plain
    assert no_js.locator("kbd:visible, .key-hint:visible").count() == 0
    no_js.context.close()


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
