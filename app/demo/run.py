"""`prefloop demo`: set up, start the web app and the worker, optionally simulate annotators,
and narrate the loop until Ctrl-C (or until `iterations` iterations are done).

The web app and the worker run as subprocesses (`python -m app.cli serve`, `python -m
worker.main`), exactly as `make run` starts them, in sessions of their own: Ctrl-C reaches only
this process, which then stops the annotators, asks the worker to stop (SIGTERM: it finishes
its optimizer step and requeues the job) and stops the web app. Their logs go to files under
the artifact directory, so the terminal shows only the loop's stages.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, read_only, transaction
from app.demo import annotators, setup, watch
from app.settings import Settings

STOP_GRACE_S = 90.0
"""How long the worker may take to finish its current step after SIGTERM (a CPU PPO step)."""
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Options:
    simulate: int = 0  # simulated annotators
    iterations: int | None = None  # exit after this many; None: serve until Ctrl-C
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None  # torch threads of the worker (OMP_NUM_THREADS)
    reset: bool = False
    timeout_s: float | None = None  # give up (exit 1) after this long
    poll_s: float = 1.0
    think_s: float = 0.3


def clock(seconds: float) -> str:
    """M:SS (H:MM:SS past an hour)."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def migrate(settings: Settings) -> None:
    from alembic import command as alembic_command

    from app.cli import alembic_config

    cfg = alembic_config(settings.database_url)
    cfg.attributes["configure_logger"] = False
    if settings.is_sqlite:
        path = settings.database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    alembic_command.upgrade(cfg, "head")


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Service:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = log_path.open("ab")
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        with self.log_path.open("r", encoding="utf-8", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def stop(self, grace_s: float) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def wait_healthy(url: str, web: Service, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not web.alive():
            return False
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def run(settings: Settings, config: setup.DemoConfig, options: Options, console: Console) -> int:
    """The whole command; returns the exit code."""
    started = time.monotonic()

    def say(text: str) -> None:
        console.print(f"[dim]\\[{clock(time.monotonic() - started)}][/dim] {text}", highlight=False)

    if options.simulate < 0:
        console.print("[red]error:[/red] --simulate must be 0 or more")
        return 2
    if options.iterations is not None and options.iterations < 1:
        console.print("[red]error:[/red] --iterations must be at least 1")
        return 2
    config.sizes  # noqa: B018 - an unknown preset fails here, before anything is written
    if not port_free(options.host, options.port):
        console.print(
            f"[red]error:[/red] {options.host}:{options.port} is in use (another `prefloop "
            "serve`?); stop it or pass --port"
        )
        return 1

    migrate(settings)
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        admin, annotator = setup.ensure_accounts(session, settings)
        made = setup.prepare(session, settings, config, reset=options.reset)
        tokens = setup.simulated_tokens(session, options.simulate)
    url = f"http://{options.host}:{options.port}"
    say(
        f"project [bold]{config.project_name}[/bold] (id {made.project_id}, "
        f"{'created' if made.created else 'reused'}): {made.prompts} prompts, "
        f"{len(made.train_ids)} to label and {len(made.heldout_ids)} held out for the win rate"
    )
    sizes = config.sizes
    say(
        f"loop: a reward model every {sizes.reward_every} judgments -> PPO "
        f"({sizes.ppo.get('total_steps')} steps) -> the new policy answers the held-out prompts"
    )
    if made.queued_job_ids:
        say(f"queued the first generate jobs {', '.join(map(str, made.queued_job_ids))}")

    logs = Path(settings.artifact_dir) / "demo-logs"
    env = child_env(options.threads)
    worker = Service(
        "worker",
        [sys.executable, "-m", "worker.main", "--poll-interval", str(options.poll_s)],
        logs / "worker.log",
        env,
    )
    web = Service(
        "web",
        [
            sys.executable,
            "-m",
            "app.cli",
            "serve",
            "--host",
            options.host,
            "--port",
            str(options.port),
        ],
        logs / "web.log",
        env,
    )
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        if not wait_healthy(url, web):
            console.print(f"[red]error:[/red] the web app did not start:\n{web.tail()}")
            return 1
        console.print()
        console.print(
            f"  Prefloop demo: [bold]{url}/[/bold]  (labelling: {url}/label/{made.project_id})"
        )
        console.print(
            f"  iterations (win rate, predicted, KL): {url}/projects/{made.project_id}/iterations"
        )
        _print_account(console, "admin", admin)
        _print_account(console, "annotator", annotator)
        console.print(f"  logs: {logs}/worker.log, {logs}/web.log")
        console.print()
        if tokens:
            keywords = setup.keywords_by_id()
            simulated = [
                annotators.SimulatedAnnotator(
                    username=name,
                    token=token,
                    base_url=url,
                    project_id=made.project_id,
                    keywords=keywords,
                    seed=config.seed,
                    think_s=options.think_s,
                )
                for name, token in tokens
            ]
            threads = annotators.start(
                simulated,
                stop,
                on_error=lambda name, exc: say(f"[red]annotator {name} stopped: {exc}[/red]"),
            )
            say(
                f"{len(simulated)} simulated annotators labelling through the API "
                f"({', '.join(name for name, _ in tokens)}); rule: app/demo/preference.py"
            )
        return _watch(factory, made, options, worker, started, say)
    except KeyboardInterrupt:
        say("stopping (the worker finishes its current step first)...")
        return 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=35)
        worker.stop(STOP_GRACE_S)
        web.stop(15)
        engine.dispose()


def _print_account(console: Console, role: str, account: setup.Account) -> None:
    password = (
        account.password if account.password else "(it existed before the demo: use its password)"
    )
    console.print(f"  {role}: [bold]{account.username}[/bold]  password: [bold]{password}[/bold]")


def _watch(
    factory: sessionmaker[Session],
    made: setup.DemoSetup,
    options: Options,
    worker: Service,
    started: float,
    say: Callable[[str], None],
) -> int:
    """Narrate until `options.iterations` iterations are done (never, when None)."""
    narrator = watch.Narrator()
    reported: set[int] = set()
    skip = {made.base_policy_id} if made.base_policy_id is not None else set()
    first_poll = True  # what is finished at the first look was finished by an earlier run
    failed_before: set[int] = set()
    while True:
        now = time.monotonic()
        with transaction(factory) as session:
            read_only(session)  # SQLite: polling must never hold the write lock
            loop = watch.view(session, made.project_id, skip_policies=skip)
        for line in narrator.update(loop, now):
            say(line)
        for policy_id in loop.policies:
            if policy_id in reported:
                continue
            with transaction(factory) as session:
                read_only(session)
                progress = watch.pairs_progress(session, made.project_id, policy_id)
                if not progress.finished:
                    break
                result = watch.policy_result(session, made.project_id, policy_id)
            reported.add(policy_id)
            if result is not None:
                for line in watch.result_lines(result):
                    say(line)
            when = "before this run" if first_poll else f"in {clock(now - started)}"
            say(f"[bold]iteration {len(reported)} finished {when}[/bold]")
        failed = {j.id for j in loop.jobs if j.state == "failed"}
        if first_poll:
            failed_before = failed
        first_poll = False
        if options.iterations is not None and len(reported) >= options.iterations:
            return 0
        if not worker.alive():
            say(f"[red]the worker exited[/red]:\n{worker.tail()}")
            return 1
        if options.iterations is not None and failed - failed_before:
            say(f"[red]a job failed; see {worker.log_path}[/red]")
            return 1
        if options.timeout_s is not None and now - started > options.timeout_s:
            say(f"[red]gave up after {clock(now - started)}[/red]")
            return 1
        time.sleep(options.poll_s)
