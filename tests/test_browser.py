"""A real browser labels three pairs with the keyboard only, against the real app on Postgres;
each submit swaps the next task in without a page load.

Chromium comes from Debian (`apt-get install chromium`) and is launched by path, because
Playwright's own browser download cannot work on these machines.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db import make_engine, make_sessionmaker, transaction
from app.main import create_app
from app.models import Judgment, Role, Task, TaskState
from app.settings import Settings
from tests.conftest import migrated_settings
from tests.factories import PASSWORD, make_project, make_prompt, make_task, make_user
from tests.live_server import serve

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
BOLD = "<b>bold</b> claims & more"
SWAPPED = """(previous) => {
  const field = document.querySelector("input[name=task_id]");
  return !field || field.value !== previous;
}"""
COMPLETIONS = [
    [BOLD, "A plain, careful answer."],
    ["def f(x):\n    return x  # indented", "Second prompt, second answer."],
    ["Third prompt, answer one.", "Third prompt, answer two."],
]


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[tuple[Settings, int, int, dict[str, int]]]:
    """A database of its own, migrated, with an annotator and a project of three pairs."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (CI installs it)")
    settings = migrated_settings("postgres", tmp_path, "prefloop_browser")
    settings = settings.model_copy(update={"heartbeat_interval_s": 1})
    engine = make_engine(settings)
    with transaction(make_sessionmaker(engine)) as s:
        user = make_user(s, Role.annotator, "browser-annotator")
        project = make_project(s, name="Browser pairs", instructions="Pick the better answer.")
        ids = {}
        for i, texts in enumerate(COMPLETIONS):
            prompt = make_prompt(s, project, texts, text=f"Prompt number {i}")
            make_task(s, project, prompt)
            ids.update({c.text: c.id for c in prompt.completions})
        user_id, project_id = user.id, project.id
    engine.dispose()
    yield settings, user_id, project_id, ids


def test_label_three_pairs_with_the_keyboard(seeded):
    from playwright.sync_api import sync_playwright

    settings, user_id, project_id, ids = seeded
    app = create_app(settings)
    keys = ["1", "ArrowRight", "2"]  # A wins, then B, then B
    expected: list[tuple[int, list[int]]] = []  # (winner id, display order) per task
    try:
        with serve(app) as base, sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            page = browser.new_page()
            page.set_default_timeout(10_000)

            page.goto(f"{base}/login")
            page.fill("input[name=username]", "browser-annotator")
            page.fill("input[name=password]", PASSWORD)
            with page.expect_navigation():
                page.press("input[name=password]", "Enter")
            assert page.url.endswith("/label")

            page.goto(f"{base}/label/{project_id}")
            assert "Pick the better answer." in page.inner_text(".instructions")
            with page.expect_response(lambda r: r.url.endswith("/heartbeat")) as beat:
                pass  # label.js beats every second here; the CSRF header must be accepted
            assert beat.value.status == 200
            page.evaluate("window.__samePage = 1")

            saw_bold = False
            for key in keys:
                left = page.inner_text("#candidate-A pre")
                right = page.inner_text("#candidate-B pre")
                saw_bold = saw_bold or BOLD in (left, right)
                assert page.locator(".completion pre b").count() == 0  # shown, not rendered
                order = [ids[left], ids[right]]
                page.keyboard.press(key)
                checked = page.locator("input[name=choice]:checked")
                assert checked.get_attribute("value") == str(order[0 if key == "1" else 1])
                expected.append((order[0 if key == "1" else 1], order))
                task_id = page.input_value("input[name=task_id]")
                page.keyboard.press("Enter")  # posted by fetch; the next task is swapped in
                page.wait_for_function(SWAPPED, arg=task_id)

            assert saw_bold
            assert page.evaluate("window.__samePage") == 1  # never a full page load
            assert "All done" in page.inner_text("#all-done")
            assert "judged 3 tasks" in page.inner_text("#progress-line")
            browser.close()
    finally:
        app.state.engine.dispose()

    engine = make_engine(settings)
    try:
        with make_sessionmaker(engine)() as s:
            rows = s.scalars(select(Judgment).order_by(Judgment.id)).all()
            assert len(rows) == 3 and {r.user_id for r in rows} == {user_id}
            for row, (winner, order) in zip(rows, expected, strict=True):
                loser = order[1] if winner == order[0] else order[0]
                assert row.ranking == [[winner], [loser]]
                assert row.display_order == order
                assert row.client_key and row.time_spent_ms is not None

            assert {t.state for t in s.scalars(select(Task))} == {TaskState.done}
    finally:
        engine.dispose()
