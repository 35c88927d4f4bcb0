"""`prefloop train reward --wait` and `prefloop worker`, run as the real commands.

--wait follows the job to its end whoever runs it: a `prefloop worker` already running (as
`make run` always starts one) usually claims the job first, and then the command follows the
job row; with no worker, it runs the job itself. Each test starts the real command (and,
where it says so, a real background worker) as subprocesses on the committed database and
trains a tiny reward model on the planted "good beats bad" preference.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from app.cli import cli
from app.db import transaction
from app.models import JobState, ModelVersion
from app.services import jobs
from app.settings import Settings
from tests.factories import make_project
from tests.test_worker import WORDS, enqueue, job_row, seed_planted, tiny_params
from worker.models import tiny_reward_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "backbone"
    tokenizer = tiny_tokenizer(WORDS)
    tiny_reward_model(len(tokenizer), seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def env(backend_settings: Settings, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PREFLOOP_DATABASE_URL": backend_settings.database_url,
        "PREFLOOP_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


def train_args(project_id: int, backbone: Path, **overrides: object) -> list[str]:
    """`prefloop train reward PROJECT --wait` with the tiny backbone's trainer params."""
    args = [sys.executable, "-m", "app.cli", "train", "reward", str(project_id), "--wait"]
    for key, value in tiny_params(backbone, **overrides).items():
        args += ["-p", f"{key}={value}"]
    return args


class Proc:
    """A subprocess whose stdout and stderr are collected line by line as they come."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.popen = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((self.popen.stdout, self.out), (self.popen.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Iterator[str], into: list[str]) -> None:
        for line in stream:
            into.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.popen.poll() is None, f"exited before {what}:\n{self.stdout}{self.stderr}"
            assert time.monotonic() < deadline, f"no {what}:\n{self.stdout}{self.stderr}"
            time.sleep(0.1)

    def finish(self, timeout: float = 300) -> int:
        code = self.popen.wait(timeout=timeout)
        for reader in self._readers:
            reader.join()
        return code

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
def background_worker(env: dict[str, str], tmp_path: Path) -> Iterator[Proc]:
    """A `prefloop worker` polling every 0.2 s, up and polling before the test goes on."""
    worker = Proc(
        [sys.executable, "-m", "app.cli", "worker", "--poll-interval", "0.2"], env, tmp_path
    )
    try:
        worker.wait_for(lambda: "polling every" in worker.stderr, "worker start")
        yield worker
    finally:
        worker.stop()


def job_id_of(output: str) -> int:
    found = re.search(r"queued reward job (\d+)", output)
    assert found, output
    return int(found.group(1))


def succeeded_line(factory: sessionmaker[Session], job_id: int) -> str:
    """What --wait prints for a succeeded job, from its row and its model version's."""
    job = job_row(factory, job_id)
    with transaction(factory) as session:
        model = session.query(ModelVersion).filter_by(job_id=job_id).one()
    held_out = model.metrics["eval"]
    assert job.metrics["model_version_id"] == model.id
    return (
        f"job {job_id} succeeded: reward model {model.id}, "
        f"held-out accuracy {held_out['accuracy']:.3f} on {held_out['pairs']} pairs"
    )


def test_wait_follows_the_job_a_running_worker_took(
    committed_factory: sessionmaker[Session],
    backbone: Path,
    env: dict[str, str],
    tmp_path: Path,
    background_worker: Proc,
) -> None:
    project_id, _, _ = seed_planted(committed_factory, 64)
    # Long enough (seconds) that the job is still running when --wait first reads it.
    args = train_args(project_id, backbone, epochs=100, batch_size=4)

    cli_run = Proc(args, env, tmp_path)
    code = cli_run.finish()

    out, err = cli_run.stdout, cli_run.stderr
    assert code == 0, out + err
    job_id = job_id_of(out)
    job = job_row(committed_factory, job_id)
    worker = f"{HOST}:{background_worker.popen.pid}"
    assert (job.state, job.worker_id, job.attempts) == (JobState.succeeded, worker, 0)
    assert f"job {job_id} is running on worker {worker}; following it" in out
    # The bar's last frame, drawn from the row's progress: every step done, the final loss.
    total = job.progress["total_steps"]
    assert (
        "succeeded " in out and f" {total}/{total} loss {job.progress['loss']:.4f} eta 0 s" in out
    )
    assert succeeded_line(committed_factory, job_id) in out
    assert job.metrics["eval"]["accuracy"] >= 0.8
    assert "is not queued" not in err and "ERROR" not in err


def test_wait_runs_the_job_here_when_no_worker_is_running(
    committed_factory: sessionmaker[Session], backbone: Path, env: dict[str, str], tmp_path: Path
) -> None:
    project_id, _, _ = seed_planted(committed_factory, 64)

    cli_run = Proc(train_args(project_id, backbone), env, tmp_path)
    code = cli_run.finish()

    out, err = cli_run.stdout, cli_run.stderr
    assert code == 0, out + err
    job_id = job_id_of(out)
    job = job_row(committed_factory, job_id)
    assert job.state is JobState.succeeded and job.worker_id is not None
    assert f"job {job_id} ({jobs.REWARD}) started" in err  # the worker subprocess ran it
    assert "following it" not in out
    total = job.progress["total_steps"]
    assert f" {total}/{total} loss {job.progress['loss']:.4f}" in out  # the worker's own bar
    assert succeeded_line(committed_factory, job_id) in out


def test_wait_exits_non_zero_with_the_jobs_error(
    committed_factory: sessionmaker[Session], backbone: Path, env: dict[str, str], tmp_path: Path
) -> None:
    with transaction(committed_factory) as session:
        empty = make_project(session).id

    cli_run = Proc(train_args(empty, backbone), env, tmp_path)
    code = cli_run.finish()

    assert code == 1, cli_run.stdout + cli_run.stderr
    job_id = job_id_of(cli_run.stdout)
    job = job_row(committed_factory, job_id)
    assert job.state is JobState.failed
    assert (
        f"error: job {job_id} failed after 1 attempt(s): JobError: project {empty} has no "
        "judgments with a preference to train on"
    ) in cli_run.stderr
    assert "Traceback" not in cli_run.stderr


def test_ctrl_c_while_following_leaves_the_job_running(
    committed_factory: sessionmaker[Session],
    backbone: Path,
    env: dict[str, str],
    tmp_path: Path,
    backend: str,
    background_worker: Proc,
) -> None:
    if backend == "postgres":
        pytest.skip("the signal path is the same on both backends; run it once")
    project_id, _, _ = seed_planted(committed_factory, 40)
    long_run = train_args(project_id, backbone, epochs=500, batch_size=1)  # far past the test

    cli_run = Proc(long_run, env, tmp_path)
    try:
        cli_run.wait_for(lambda: "following it" in cli_run.stdout, "following")
        cli_run.popen.send_signal(signal.SIGINT)
        code = cli_run.finish(timeout=60)
    finally:
        cli_run.stop()

    job_id = job_id_of(cli_run.stdout)
    job = job_row(committed_factory, job_id)
    worker = f"{HOST}:{background_worker.popen.pid}"
    assert code == 130, cli_run.stdout + cli_run.stderr
    assert (job.state, job.worker_id) == (JobState.running, worker)  # untouched, still going
    assert (
        f"interrupted: stopped waiting for job {job_id}, which keeps running in the background "
        f"on worker {worker}."
    ) in cli_run.stderr
    assert (
        f"curl -X POST -H 'Authorization: Bearer TOKEN' "
        f"http://127.0.0.1:8000/api/v1/jobs/{job_id}/cancel"
    ) in cli_run.stderr
    with transaction(committed_factory) as session:
        jobs.cancel(session, job_id)  # the background worker stops at its next heartbeat


def test_ctrl_c_while_running_here_requeues_the_job(
    committed_factory: sessionmaker[Session],
    backbone: Path,
    env: dict[str, str],
    tmp_path: Path,
    backend: str,
) -> None:
    if backend == "postgres":
        pytest.skip("the signal path is the same on both backends; run it once")
    project_id, _, _ = seed_planted(committed_factory, 40)
    long_run = train_args(project_id, backbone, epochs=500, batch_size=1)

    cli_run = Proc(long_run, env, tmp_path)
    try:
        cli_run.wait_for(lambda: " started" in cli_run.stderr, "a started job")
        time.sleep(1.0)  # into the training loop
        # SIGINT to the command alone (a terminal would signal both): it passes it on.
        cli_run.popen.send_signal(signal.SIGINT)
        code = cli_run.finish(timeout=120)
    finally:
        cli_run.stop()

    job_id = job_id_of(cli_run.stdout)
    job = job_row(committed_factory, job_id)
    assert code == 130, cli_run.stdout + cli_run.stderr
    assert (job.state, job.attempts, job.worker_id) == (JobState.queued, 0, None)
    assert "stopping: the worker finishes its current step and requeues the job" in cli_run.stderr
    assert (
        f"interrupted: stopped waiting for job {job_id}, which is queued; the next worker to "
        "poll (`prefloop worker`) runs it."
    ) in cli_run.stderr
    assert f"/api/v1/jobs/{job_id}/cancel" in cli_run.stderr


def test_worker_draws_a_progress_bar_when_asked(
    committed_factory: sessionmaker[Session],
    backbone: Path,
    env: dict[str, str],
    tmp_path: Path,
    backend: str,
) -> None:
    if backend == "postgres":
        pytest.skip("a terminal option: one backend is enough")
    assert "--progress-bar" in CliRunner().invoke(cli, ["worker", "--help"]).output
    project_id, _, _ = seed_planted(committed_factory, 40)
    job_id = enqueue(committed_factory, project_id, "reward", tiny_params(backbone))

    worker = Proc(
        [sys.executable, "-m", "app.cli", "worker", "--once", "--progress-bar"], env, tmp_path
    )
    code = worker.finish()

    assert code == 0, worker.stdout + worker.stderr
    job = job_row(committed_factory, job_id)
    total = job.progress["total_steps"]
    assert job.state is JobState.succeeded
    assert re.search(
        rf"^succeeded .* {total}/{total} loss {job.progress['loss']:.4f}", worker.stdout, re.M
    )
