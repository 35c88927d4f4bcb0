"""The worker process: claim queued jobs, run them, heartbeat, record the outcome.

    python -m worker.main [--once] [--poll-interval 2] [--job ID] [--progress-bar]

(`prefloop worker` and `prefloop train reward --wait` exec this.) Each poll it requeues jobs
whose worker stopped heartbeating, schedules reward retraining for projects that asked for it
every N judgments, then claims the oldest queued job. The job runs in this process; a
heartbeat thread writes the latest progress (step, loss, ETA) into the job row every few
seconds and notices when the job was cancelled or taken over.

SIGTERM / SIGINT stop the run after the current optimizer step: nothing half-written is left
behind and the job goes back to the queue without counting as a failed attempt.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker
from transformers.utils import logging as hf_logging

from app.db import make_engine, make_sessionmaker, read_only, transaction
from app.errors import DomainError
from app.models import JobState, utcnow
from app.services import chaining, jobs, webhooks
from app.settings import Settings
from worker import runner

log = logging.getLogger("prefloop.worker")

HEARTBEAT_EVERY_S = 5.0
STALE_AFTER_S = 120.0
"""A running job not heartbeated for this long is presumed dead (24 missed heartbeats)."""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class RunState:
    """What the training thread and the heartbeat thread share about one running job."""

    progress: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    """Set when the job is no longer ours: cancelled, or requeued and claimed elsewhere."""

    def update(self, progress: dict[str, Any]) -> None:
        with self.lock:
            self.progress = {**self.progress, **progress}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.progress)


def _heartbeat_loop(
    factory: sessionmaker[Session], job_id: int, me: str, state: RunState, every_s: float
) -> None:
    while not state.done.wait(every_s):
        try:
            with transaction(factory) as session:
                ours = jobs.heartbeat(session, job_id, me, state.snapshot(), utcnow())
        except Exception:  # a database hiccup: keep training, try again next beat
            log.warning("heartbeat for job %s failed", job_id, exc_info=True)
            continue
        if not ours:
            log.info("job %s was cancelled or taken over; stopping after this step", job_id)
            state.lost.set()
            return


def _error_text(exc: BaseException) -> str:
    """The error line first (what the job page shows), then the traceback for debugging."""
    trace = "".join(traceback.format_exception(exc))
    return f"{type(exc).__name__}: {exc}\n\n{trace[-4000:]}"


def process(
    settings: Settings,
    factory: sessionmaker[Session],
    job: runner.JobSpec,
    stop: threading.Event,
    *,
    heartbeat_every_s: float = HEARTBEAT_EVERY_S,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Run one claimed job and record how it ended; returns the outcome for logs and tests:
    succeeded, failed, queued (retry or shutdown), cancelled, or lost."""
    state = RunState()
    beat = threading.Thread(
        target=_heartbeat_loop,
        args=(factory, job.id, job.worker_id, state, heartbeat_every_s),
        name=f"heartbeat-{job.id}",
        daemon=True,
    )
    beat.start()

    def report(progress: dict[str, Any]) -> None:
        state.update(progress)
        if on_progress is not None:
            on_progress(progress)

    def should_stop() -> bool:
        return stop.is_set() or state.lost.is_set()

    def should_save() -> bool:
        """Shutting down with the job still ours: it goes back to the queue and its next
        attempt resumes (a cancelled or taken-over job must not write into its work dir)."""
        return stop.is_set() and not state.lost.is_set()

    log.info("job %s (%s) started", job.id, job.kind)
    try:
        runner.run(
            settings,
            factory,
            job,
            report=report,
            should_stop=should_stop,
            should_save=should_save,
        )
        outcome = JobState.succeeded.value
    except runner.Interrupted as exc:
        with transaction(factory) as session:
            back = jobs.requeue(session, job.id, job.worker_id, progress=state.snapshot())
            current = jobs.get(session, job.id).state.value
        outcome = current if back is None else JobState.queued.value
        log.info("job %s interrupted (%s); now %s", job.id, exc, outcome)
    except Exception as exc:
        retryable = not isinstance(exc, runner.JobError | DomainError)
        with transaction(factory) as session:
            row = jobs.fail(
                session, job.id, _error_text(exc), retryable=retryable, worker_id=job.worker_id
            )
            outcome = row.state.value
        log.warning("job %s failed (%s): %s", job.id, outcome, exc)
    finally:
        state.done.set()
        beat.join()
    log.info("job %s: %s", job.id, outcome)
    return outcome


def _schedule(factory: sessionmaker[Session]) -> None:
    """Enqueue reward retraining where a project's every-N-judgments threshold was reached
    (with the project's loop `reward_params`)."""
    with transaction(factory) as session:
        project_ids = jobs.scheduled_projects(read_only(session))
    for project_id in project_ids:
        with transaction(factory) as session:
            job = chaining.schedule_reward(session, project_id)
            if job is not None:
                log.info("scheduled reward job %s for project %s", job.id, project_id)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (finish the step, then requeue) instead of killing us.

    Only the main thread may install handlers; elsewhere (tests) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        log.info("%s received: stopping after the current step", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(
    settings: Settings,
    *,
    once: bool = False,
    poll_interval: float = 2.0,
    kinds: Sequence[str] | None = None,
    job_id: int | None = None,
    heartbeat_every_s: float = HEARTBEAT_EVERY_S,
    stale_after_s: float = STALE_AFTER_S,
    stop: threading.Event | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[str]:
    """The worker loop; returns the outcome of every job it ran.

    `once` processes at most one job and returns (also when the queue is empty); `job_id`
    runs that one queued job only (what `prefloop train reward --wait` does).
    """
    engine = make_engine(settings)
    factory = make_sessionmaker(engine)
    me = worker_id()
    stop = stop or threading.Event()
    outcomes: list[str] = []
    log.info("worker %s polling every %.1f s", me, poll_interval)
    try:
        with stop_on_signals(stop):
            while not stop.is_set():
                with transaction(factory) as session:
                    for job in jobs.requeue_stale(session, utcnow(), stale_after_s):
                        log.warning("job %s had a stale heartbeat: now %s", job.id, job.state.value)
                if job_id is None:
                    _schedule(factory)
                    with transaction(factory) as session:
                        webhooks.emit_new_judgments(session)
                    webhooks.run_due(factory, utcnow(), worker_id=me)
                with transaction(factory) as session:
                    claimed = jobs.claim(
                        session, me, utcnow(), kinds or jobs.TRAINING_KINDS, job_id=job_id
                    )
                    spec = runner.JobSpec.of(claimed) if claimed is not None else None
                if spec is None:
                    if once or job_id is not None:
                        break
                    stop.wait(poll_interval)
                    continue
                outcomes.append(
                    process(
                        settings,
                        factory,
                        spec,
                        stop,
                        heartbeat_every_s=heartbeat_every_s,
                        on_progress=on_progress,
                    )
                )
                if once or job_id is not None:
                    break
    finally:
        engine.dispose()
    return outcomes


def _progress_bar() -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    """A rich progress bar fed by the trainer's progress dicts: (update, close)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    task = bar.add_task("reward", total=None, loss="-")
    started = False

    def update(progress: dict[str, Any]) -> None:
        nonlocal started
        if not started:  # drawn from the first progress on, so a worker that finds nothing
            bar.start()  # to do (or loses the claim) leaves no empty bar behind
            started = True
        fields: dict[str, Any] = {"description": str(progress.get("stage", "reward"))}
        if progress.get("total_steps"):
            fields["total"] = progress["total_steps"]
        if progress.get("step") is not None:
            fields["completed"] = progress["step"]
        if isinstance(progress.get("loss"), float):
            fields["loss"] = f"{progress['loss']:.4f}"
        bar.update(task, **fields)

    def close() -> None:
        if started:
            bar.stop()

    return update, close


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefloop worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="seconds between polls")
    parser.add_argument("--job", type=int, default=None, help="run this queued job only")
    parser.add_argument(
        "--kind", action="append", choices=jobs.TRAINING_KINDS, help="only these kinds"
    )
    parser.add_argument("--progress-bar", action="store_true", help="draw a progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    hf_logging.disable_progress_bar()  # weight-loading bars would interleave with the logs
    update: Callable[[dict[str, Any]], None] | None = None
    close: Callable[[], None] = lambda: None  # noqa: E731
    if args.progress_bar:
        update, close = _progress_bar()
    try:
        outcomes = main(
            Settings(),
            once=args.once,
            poll_interval=args.poll_interval,
            kinds=args.kind,
            job_id=args.job,
            on_progress=update,
        )
        if update is not None and outcomes:
            update({"stage": outcomes[0]})
    finally:
        close()
    if args.job is not None:
        if not outcomes:
            log.error("job %s is not queued (another worker may have taken it)", args.job)
            return 1
        return 0 if outcomes[0] == JobState.succeeded.value else 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
