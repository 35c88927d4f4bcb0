"""On-demand scoring through the long-lived scorer process (``worker.score_cli --serve``).

Every test runs real subprocesses and real tiny reward models; the protocol's failure modes
(garbage answers, a child that dies mid-request) are played by small real child scripts
passed as the scorer's interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from app.errors import InvalidInput
from app.models import ModelKind, Role
from app.services import model_registry
from app.services.model_registry import ScorerProcess, ScoringUnavailable
from tests.factories import make_project, make_token, make_user
from worker import reward
from worker.models import tiny_reward_model, tiny_tokenizer

WORDS = [*(f"w{i}" for i in range(30)), "good", "bad"]
PROMPT, COMPLETIONS = "w1 w2 w3", ["w4 good w5", "w4 bad w5", "w6"]
OTHER_PROMPT, OTHER_COMPLETIONS = "w9", ["w10 w11", "bad w12 good", "w13 w14 w15", "w0"]


def save_tiny(path: Path, seed: int) -> Path:
    tokenizer = tiny_tokenizer(WORDS)
    tiny_reward_model(len(tokenizer), seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_shot(model_dir: Path, prompt: str, completions: list[str]) -> list[float]:
    """Scores from the one-shot path (a fresh `python -m worker.score_cli MODEL_DIR`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker.score_cli", str(model_dir)],
        input=json.dumps({"prompt": prompt, "completions": completions}),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    scores: list[float] = json.loads(proc.stdout)["scores"]
    return scores


def wait_until(condition, timeout_s: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("scoring") / "reward", seed=0)


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> dict[str, list[float]]:
    return {
        PROMPT: one_shot(model_dir, PROMPT, COMPLETIONS),
        OTHER_PROMPT: one_shot(model_dir, OTHER_PROMPT, OTHER_COMPLETIONS),
    }


@pytest.fixture(scope="module")
def scorer() -> Iterator[ScorerProcess]:
    """One scorer shared by the tests that leave it running."""
    process = ScorerProcess(idle_exit_s=300)
    yield process
    process.close()


@pytest.fixture
def own_scorer() -> Iterator[ScorerProcess]:
    """A scorer for a test that kills, stops or times out its child."""
    process = ScorerProcess(idle_exit_s=300)
    yield process
    process.close()


def test_second_request_reuses_the_process_and_matches_one_shot(
    scorer: ScorerProcess, model_dir: Path, expected: dict[str, list[float]]
) -> None:
    assert scorer.pid is None  # nothing starts before the first request
    first = model_registry.score_dir(model_dir, PROMPT, COMPLETIONS, scorer=scorer)
    pid = scorer.pid
    assert pid is not None
    second = model_registry.score_dir(model_dir, PROMPT, COMPLETIONS, scorer=scorer)
    other = scorer.score(model_dir, OTHER_PROMPT, OTHER_COMPLETIONS)

    assert scorer.pid == pid
    assert first == second
    assert first == pytest.approx(expected[PROMPT], abs=1e-5)
    assert other == pytest.approx(expected[OTHER_PROMPT], abs=1e-5)
    assert len(set(first)) == 3  # distinct completions, distinct scores: not a constant


def test_bad_requests_get_their_errors_and_the_process_survives(
    scorer: ScorerProcess, model_dir: Path, expected: dict[str, list[float]], tmp_path: Path
) -> None:
    assert scorer.score(model_dir, PROMPT, COMPLETIONS) == pytest.approx(expected[PROMPT], abs=1e-5)
    pid = scorer.pid

    with pytest.raises(InvalidInput, match="no model directory"):
        scorer.score(tmp_path / "missing", PROMPT, COMPLETIONS)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")
    with pytest.raises(ScoringUnavailable, match="the scorer failed: .*model_type"):
        scorer.score(not_a_model, PROMPT, COMPLETIONS)
    # The web-side checks come before the scorer and keep their 422s.
    with pytest.raises(InvalidInput, match="at least one completion"):
        model_registry.score_dir(model_dir, PROMPT, [], scorer=scorer)
    with pytest.raises(InvalidInput, match="at most 64"):
        model_registry.score_dir(model_dir, PROMPT, ["w1"] * 65, scorer=scorer)

    assert scorer.pid == pid
    assert scorer.score(model_dir, PROMPT, COMPLETIONS) == pytest.approx(expected[PROMPT], abs=1e-5)


def test_serve_mode_answers_malformed_lines_and_keeps_serving(model_dir: Path) -> None:
    """The protocol itself: one answer line per request line, whatever the line holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.score_cli", "--serve", "--idle-exit-s", "120"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    good = {"model_dir": str(model_dir), "prompt": PROMPT, "completions": COMPLETIONS}
    lines = [
        "not json",
        "[1, 2]",
        json.dumps({"prompt": PROMPT, "completions": COMPLETIONS}),
        json.dumps({**good, "prompt": 7}),
        json.dumps({**good, "completions": ["a", 1]}),
        json.dumps({**good, "model_dir": str(model_dir / "nope")}),
        json.dumps({**good, "completions": []}),
        json.dumps(good),
    ]
    answers = []
    for line in lines:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        answers.append(json.loads(proc.stdout.readline()))
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0  # stdin closed: it leaves by itself

    assert [a.get("status") for a in answers[:6]] == ["bad_input"] * 6
    assert "'model_dir' must be a non-empty string" in answers[2]["error"]
    assert "'prompt' must be a string" in answers[3]["error"]
    assert "'completions' must be a list of strings" in answers[4]["error"]
    assert "no model directory" in answers[5]["error"]
    assert answers[6] == {"scores": []}
    assert len(answers[7]["scores"]) == 3


def test_serve_mode_exits_after_the_idle_period() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.score_cli", "--serve", "--idle-exit-s", "0.5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    assert proc.wait(timeout=60) == 0
    assert time.monotonic() - started >= 0.5
    assert proc.stdout is not None and proc.stdout.read() == b""
    proc.stdin.close()  # type: ignore[union-attr]
    proc.stdout.close()


def test_idle_exit_is_restarted_transparently(
    model_dir: Path, expected: dict[str, list[float]]
) -> None:
    process = ScorerProcess(idle_exit_s=1)
    try:
        assert process.score(model_dir, PROMPT, COMPLETIONS) == pytest.approx(
            expected[PROMPT], abs=1e-5
        )
        first_pid = process.pid
        assert first_pid is not None
        wait_until(lambda: process.pid is None)  # it left on its own idle timer
        assert process.score(model_dir, PROMPT, COMPLETIONS) == pytest.approx(
            expected[PROMPT], abs=1e-5
        )
        assert process.pid not in (None, first_pid)
    finally:
        process.close()


def test_killed_child_is_restarted_and_timeout_kills_it(
    own_scorer: ScorerProcess, model_dir: Path, expected: dict[str, list[float]]
) -> None:
    assert own_scorer.score(model_dir, PROMPT, COMPLETIONS) == pytest.approx(
        expected[PROMPT], abs=1e-5
    )
    first = own_scorer.pid
    assert first is not None

    os.kill(first, signal.SIGKILL)
    wait_until(lambda: own_scorer.pid is None)
    assert own_scorer.score(model_dir, PROMPT, COMPLETIONS) == pytest.approx(
        expected[PROMPT], abs=1e-5
    )
    second = own_scorer.pid
    assert second not in (None, first)

    # A child that stops answering (SIGSTOP: alive, silent) is killed at the timeout.
    os.kill(second, signal.SIGSTOP)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(ScoringUnavailable, match="longer than 1 s and was stopped"):
        own_scorer.score(model_dir, PROMPT, COMPLETIONS, timeout_s=1)
    assert 1 <= time.monotonic() - started < 10
    assert own_scorer.pid is None and not alive(second)  # type: ignore[arg-type]

    assert own_scorer.score(model_dir, OTHER_PROMPT, OTHER_COMPLETIONS) == pytest.approx(
        expected[OTHER_PROMPT], abs=1e-5
    )
    assert own_scorer.pid not in (None, first, second)


def test_concurrent_requests_are_serialized_and_each_gets_its_answer(
    scorer: ScorerProcess, model_dir: Path, expected: dict[str, list[float]]
) -> None:
    scorer.score(model_dir, PROMPT, COMPLETIONS)  # started and loaded
    pid = scorer.pid
    barrier = threading.Barrier(2)
    results: dict[str, list[list[float]]] = {PROMPT: [], OTHER_PROMPT: []}
    errors: list[BaseException] = []

    def run(prompt: str, completions: list[str]) -> None:
        try:
            barrier.wait()
            for _ in range(10):
                results[prompt].append(scorer.score(model_dir, prompt, completions))
        except BaseException as exc:  # collected, so the main thread fails with it
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(PROMPT, COMPLETIONS)),
        threading.Thread(target=run, args=(OTHER_PROMPT, OTHER_COMPLETIONS)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    for prompt in (PROMPT, OTHER_PROMPT):
        assert len(results[prompt]) == 10
        for scores in results[prompt]:
            assert scores == pytest.approx(expected[prompt], abs=1e-5)
    assert scorer.pid == pid


def test_models_are_cached_by_directory_and_reloaded_when_saved_again(
    model_dir: Path, expected: dict[str, list[float]], tmp_path: Path
) -> None:
    """Cache size 1 with two models alternating: each answer comes from its own model; a
    model saved again into the same directory is served fresh, not from the cache."""
    other_dir = save_tiny(tmp_path / "other", seed=1)
    other_expected = reward.score(other_dir, PROMPT, COMPLETIONS)
    assert other_expected != pytest.approx(expected[PROMPT], abs=1e-5)
    process = ScorerProcess(cache_size=1)
    try:
        for directory, want in [
            (model_dir, expected[PROMPT]),
            (other_dir, other_expected),
            (model_dir, expected[PROMPT]),
            (other_dir, other_expected),
        ]:
            assert process.score(directory, PROMPT, COMPLETIONS) == pytest.approx(want, abs=1e-5)
        pid = process.pid

        time.sleep(0.01)  # a new mtime even on coarse clocks
        save_tiny(other_dir, seed=2)
        resaved = process.score(other_dir, PROMPT, COMPLETIONS)
        assert resaved == pytest.approx(reward.score(other_dir, PROMPT, COMPLETIONS), abs=1e-5)
        assert resaved != pytest.approx(other_expected, abs=1e-5)
        assert process.pid == pid
    finally:
        process.close()


def test_missing_worker_extra_is_a_503_message_and_the_process_survives(model_dir: Path) -> None:
    """`python -S` starts the child without site-packages: no torch, as on a web-only box."""
    process = ScorerProcess(interpreter=(sys.executable, "-S"))
    try:
        pids = []
        for _ in range(2):
            with pytest.raises(ScoringUnavailable) as raised:
                model_registry.score_dir(model_dir, PROMPT, COMPLETIONS, scorer=process)
            assert raised.value.message == model_registry.MISSING_EXTRA_MESSAGE
            assert raised.value.status == 503
            pids.append(process.pid)
        assert pids[0] is not None and pids[0] == pids[1]
    finally:
        process.close()


FAKE_SCORERS = {
    "garbage": "import sys\nfor line in sys.stdin:\n    print('not json', flush=True)",
    "wrong number": (
        "import sys\nfor line in sys.stdin:\n    print('{\"scores\": [1.0]}', flush=True)"
    ),
    "crash": "import sys\nsys.stdin.readline()\nprint('boom: out of memory', file=sys.stderr)\n"
    "sys.exit(1)",
}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage", "not a score list"),
        ("wrong number", "wrong number of scores"),
        ("crash", "the scorer failed: boom: out of memory"),
    ],
)
def test_a_misbehaving_scorer_is_a_503(kind: str, message: str, model_dir: Path) -> None:
    """Real child processes that break the protocol (the scorer's arguments follow the -c
    script, which ignores them)."""
    process = ScorerProcess(interpreter=(sys.executable, "-c", FAKE_SCORERS[kind]))
    try:
        with pytest.raises(ScoringUnavailable, match=message):
            model_registry.score_dir(model_dir, PROMPT, ["a", "b"], scorer=process)
    finally:
        process.close()


def test_a_forked_process_starts_its_own_scorer(
    model_dir: Path, expected: dict[str, list[float]]
) -> None:
    """A forking server's worker must not write into its parent's pipes, nor keep the
    parent's child alive by holding its stdin open."""
    process = ScorerProcess(idle_exit_s=300)
    try:
        process.score(model_dir, PROMPT, COMPLETIONS)
        parent_child = process.pid
        read_end, write_end = os.pipe()
        forked = os.fork()
        if forked == 0:  # the forked "web worker"
            code = 1
            try:
                os.close(read_end)
                before = process.pid
                scores = process.score(model_dir, PROMPT, COMPLETIONS)
                report = {"before": before, "after": process.pid, "scores": scores}
                os.write(write_end, json.dumps(report).encode())
                process.close()
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            report = json.loads(reader.read() or b"{}")
        assert os.waitpid(forked, 0)[1] == 0
        assert report["before"] is None
        assert report["after"] not in (None, parent_child)
        assert report["scores"] == pytest.approx(expected[PROMPT], abs=1e-5)
        assert process.pid == parent_child  # the parent's child still serves the parent
        assert process.score(model_dir, OTHER_PROMPT, OTHER_COMPLETIONS) == pytest.approx(
            expected[OTHER_PROMPT], abs=1e-5
        )
    finally:
        process.close()
    assert parent_child is not None
    wait_until(lambda: not alive(parent_child))  # closing stdin ended it: no fork holds it


def test_api_scores_twice_with_one_process(client, db: Session, model_dir: Path, expected) -> None:  # type: ignore[no-untyped-def]
    headers = make_token(db, make_user(db, Role.admin))
    model = model_registry.register(
        db, kind=ModelKind.reward, artifact_path=model_dir, project_id=make_project(db).id
    )
    body = {"prompt": PROMPT, "completions": COMPLETIONS}
    answers, pids = [], []
    for _ in range(2):
        response = client.post(f"/api/v1/models/{model.id}/score", json=body, headers=headers)
        assert response.status_code == 200, response.text
        answers.append(response.json()["scores"])
        pids.append(model_registry.default_scorer().pid)
    assert answers[0] == answers[1] == pytest.approx(expected[PROMPT], abs=1e-5)
    assert pids[0] is not None and pids[0] == pids[1]

    missing = client.post(
        f"/api/v1/models/{model.id}/score",
        json={"prompt": PROMPT, "completions": ["w1"] * 65},
        headers=headers,
    )
    assert missing.status_code == 422
    assert model_registry.default_scorer().pid == pids[0]


GATED_SCORER = """
import json, pathlib, sys, time
gate = pathlib.Path(sys.argv[1])
for line in sys.stdin:
    gate.with_suffix(".started").touch()
    while not gate.exists():
        time.sleep(0.01)
    request = json.loads(line)
    print(json.dumps({"scores": [0.5] * len(request["completions"])}), flush=True)
"""


def test_scoring_holds_no_transaction_while_the_model_runs(  # type: ignore[no-untyped-def]
    backend_settings, committed_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The score route ends its transaction before it waits for the scorer: while a (gated)
    scorer works, another writer commits at once. On SQLite the request's transaction holds
    the write lock (BEGIN IMMEDIATE), so without that a label would wait for the model."""
    from fastapi.testclient import TestClient
    from sqlalchemy import text

    from app.main import create_app

    script, gate = tmp_path / "gated.py", tmp_path / "gate"
    script.write_text(GATED_SCORER)
    gated = ScorerProcess()
    gated.command = [sys.executable, str(script), str(gate)]
    monkeypatch.setattr(model_registry, "_SCORER", gated)
    with committed_factory() as s, s.begin():
        model = model_registry.register(
            s, kind=ModelKind.reward, artifact_path=tmp_path, project_id=make_project(s).id
        )
        headers = make_token(s, make_user(s, Role.researcher))
        model_id = model.id
    app = create_app(backend_settings)
    answers: list[object] = []
    try:
        with TestClient(app) as client:
            body = {"prompt": "p", "completions": ["a", "b"]}
            request = threading.Thread(
                target=lambda: answers.append(
                    client.post(f"/api/v1/models/{model_id}/score", json=body, headers=headers)
                )
            )
            request.start()
            deadline = time.monotonic() + 60
            while not gate.with_suffix(".started").exists():
                assert time.monotonic() < deadline and request.is_alive()
                time.sleep(0.01)
            try:
                with app.state.engine.connect() as conn:  # a writer while the scorer works
                    if backend_settings.is_sqlite:
                        conn.exec_driver_sql("PRAGMA busy_timeout = 0")  # fail, do not wait
                    conn.execute(text("UPDATE projects SET instructions = 'written meanwhile'"))
                    conn.commit()
            finally:
                gate.touch()
                request.join(timeout=60)
    finally:
        gated.close()
        app.state.engine.dispose()
    [response] = answers
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    assert response.json() == {"scores": [0.5, 0.5]}  # type: ignore[attr-defined]
