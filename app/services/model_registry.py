"""The model registry: trained artifacts, their lineage, archives and on-demand scoring.

A ``model_versions`` row points at a ``save_pretrained`` directory under the artifact
directory and records what produced it (job, snapshot, config) and how well it did (metrics).
The web process never imports torch: scoring runs ``python -m worker.score_cli --serve`` in
a long-lived subprocess (`ScorerProcess`: one per web process, started on the first scoring
request, models kept loaded), so a web server without the worker extra still serves the
registry and answers scoring with a clear 503.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import selectors
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import DomainError, InvalidInput, NotFound
from app.models import ModelKind, ModelVersion
from app.services import webhooks

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent.parent
SCORE_TIMEOUT_S = 120.0
MAX_SCORE_COMPLETIONS = 64
_ARCHIVE_CHUNK = 1 << 20


class ScoringUnavailable(DomainError):
    """The worker extra (torch, transformers) is missing, or the scorer failed or timed out."""

    status = 503
    code = "scoring_unavailable"


def register(
    session: Session,
    *,
    kind: ModelKind,
    artifact_path: str | Path,
    project_id: int | None = None,
    job_id: int | None = None,
    snapshot_id: int | None = None,
    parent_id: int | None = None,
    reward_model_id: int | None = None,
    name: str = "",
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Record a finished artifact. Call it in the same transaction that finishes the job,
    so a model version exists exactly when its job succeeded."""
    path = Path(artifact_path)
    if not path.is_dir():
        raise InvalidInput(f"artifact directory {path} does not exist")
    model = ModelVersion(
        kind=kind,
        project_id=project_id,
        job_id=job_id,
        snapshot_id=snapshot_id,
        parent_id=parent_id,
        reward_model_id=reward_model_id,
        name=name or path.name,
        artifact_path=str(path.resolve()),
        config=dict(config or {}),
        metrics=dict(metrics or {}),
        state="ready",
    )
    session.add(model)
    session.flush()
    if project_id is not None:
        webhooks.emit(
            session,
            project_id,
            "model.ready",
            {
                "model_id": model.id,
                "kind": kind.value,
                "parent_id": parent_id,
                "reward_model_id": reward_model_id,
                "snapshot_id": snapshot_id,
            },
        )
    return model


def get(session: Session, model_id: int) -> ModelVersion:
    model = session.get(ModelVersion, model_id)
    if model is None:
        raise NotFound(f"no model {model_id}")
    return model


def list_models(
    session: Session,
    *,
    project_id: int | None = None,
    kind: ModelKind | None = None,
    limit: int = 200,
) -> list[ModelVersion]:
    """Newest first."""
    stmt = select(ModelVersion).order_by(ModelVersion.id.desc()).limit(limit)
    if project_id is not None:
        stmt = stmt.where(ModelVersion.project_id == project_id)
    if kind is not None:
        stmt = stmt.where(ModelVersion.kind == kind)
    return list(session.scalars(stmt))


def latest(session: Session, project_id: int, kind: ModelKind) -> ModelVersion | None:
    stmt = (
        select(ModelVersion)
        .where(ModelVersion.project_id == project_id, ModelVersion.kind == kind)
        .order_by(ModelVersion.id.desc())
        .limit(1)
    )
    return session.scalar(stmt)


def _artifact_dir(model: ModelVersion) -> Path:
    path = Path(model.artifact_path)
    if not path.is_dir():
        raise NotFound(f"model {model.id}'s artifact directory is missing on this server")
    return path


def archive(session: Session, model_id: int) -> tuple[str, Iterator[bytes]]:
    """The model's directory as a .tar.gz: a file name and the bytes, in chunks.

    Built into a temporary file (a model can be hundreds of megabytes, so not in memory)
    when the response starts sending, and deleted when it is done.
    """
    model = get(session, model_id)
    directory = _artifact_dir(model)
    top = f"{model.kind.value}-{model.id}"

    def chunks() -> Iterator[bytes]:
        with tempfile.TemporaryFile() as tmp:
            with tarfile.open(fileobj=tmp, mode="w:gz") as tar:
                tar.add(directory, arcname=top)
            tmp.seek(0)
            while block := tmp.read(_ARCHIVE_CHUNK):
                yield block

    return f"{top}.tar.gz", chunks()


def _worker_extra_installed() -> bool:
    """Cheap check (no import) that this interpreter could run the scorer at all."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


MISSING_EXTRA_MESSAGE = (
    "scoring needs the worker extra (torch, transformers): pip install 'prefloop[worker]'"
)
SCORER_IDLE_EXIT_S = 600.0
"""The scorer process exits after this long without a request (the next one restarts it)."""
SCORER_CACHE_SIZE = 2
"""Reward models the scorer process keeps loaded (least recently used goes first)."""
SCORER_THREADS = 1
"""torch CPU threads of the scorer process. It sits beside the web server, and on-demand
requests are a few completions: measured on a loaded 2-core machine, one thread answered
MiniLM requests of 2 to 64 completions as fast as two or faster (bench/README.md, Scoring)."""
_STDERR_TAIL = 20


def _scorer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


class ScorerProcess:
    """One long-lived ``python -m worker.score_cli --serve`` child, reused across requests.

    Starting a scorer means importing torch and loading the model: seconds, against
    milliseconds to score. So the child starts on the first request, keeps its models loaded
    and answers every later one; requests are serialized by a lock (the child answers one
    line at a time). It is started again when it has exited (idle exit, crash, kill), and
    killed when a request runs past its timeout. A forked web worker never talks through its
    parent's pipes: it forgets them and starts its own child.
    """

    def __init__(
        self,
        *,
        idle_exit_s: float = SCORER_IDLE_EXIT_S,
        cache_size: int = SCORER_CACHE_SIZE,
        threads: int = SCORER_THREADS,
        interpreter: Sequence[str] = (sys.executable,),
    ) -> None:
        self.command = [
            *interpreter,
            "-m",
            "worker.score_cli",
            "--serve",
            "--idle-exit-s",
            str(idle_exit_s),
            "--cache-size",
            str(cache_size),
            "--threads",
            str(threads),
        ]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        self._pending = b""
        self._stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL)
        self._drainer: threading.Thread | None = None
        os.register_at_fork(after_in_child=functools.partial(_forget_after_fork, weakref.ref(self)))

    @property
    def pid(self) -> int | None:
        """The child's process id while one is running (None before the first request)."""
        proc = self._proc
        if proc is None or self._owner != os.getpid() or proc.poll() is not None:
            return None
        return proc.pid

    def score(
        self,
        directory: Path,
        prompt: str,
        completions: Sequence[str],
        *,
        timeout_s: float = SCORE_TIMEOUT_S,
    ) -> list[float]:
        """The child's scores for one request; errors as the domain exceptions of `score_dir`.

        `timeout_s` bounds the request once it holds the child (model loading included);
        waiting for another request to finish is bounded by it too, but kills nothing.
        """
        if self._owner != os.getpid():
            self._forget()
        line = json.dumps(
            {
                "model_dir": str(Path(directory).resolve()),
                "prompt": prompt,
                "completions": list(completions),
            }
        ).encode("utf-8")
        if not self._lock.acquire(timeout=timeout_s):
            raise ScoringUnavailable(
                f"the scorer stayed busy with other requests for {timeout_s:.0f} s"
            )
        try:
            response = self._exchange(line, timeout_s)
        finally:
            self._lock.release()
        if "scores" in response and isinstance(response["scores"], list):
            try:
                return [float(s) for s in response["scores"]]
            except (TypeError, ValueError):
                pass
        status, error = response.get("status"), str(response.get("error", ""))
        if status == "bad_input":
            raise InvalidInput(error)
        if status == "missing_extra":
            raise ScoringUnavailable(MISSING_EXTRA_MESSAGE)
        if status == "failed":
            raise ScoringUnavailable(f"the scorer failed: {error}")
        raise ScoringUnavailable("the scorer returned something that is not a score list")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the child: close its stdin (it exits by itself), kill it if it lingers."""
        if self._owner != os.getpid():
            return
        got_lock = self._lock.acquire(timeout=timeout_s)  # at exit, don't wait forever
        try:
            self._stop(graceful_s=timeout_s)
        finally:
            if got_lock:
                self._lock.release()

    # -- under the lock ------------------------------------------------------------------

    def _exchange(self, line: bytes, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        for attempt in (1, 2):
            proc = self._running()
            try:
                self._send(proc, line + b"\n", deadline)
                reply = self._receive(proc, deadline)
            except BrokenPipeError:
                reply = None
            except TimeoutError:
                self._stop(graceful_s=0)
                raise ScoringUnavailable(
                    f"scoring took longer than {timeout_s:.0f} s and was stopped"
                ) from None
            if reply is not None:
                try:
                    response = json.loads(reply)
                except ValueError:
                    response = None
                if not isinstance(response, dict):
                    self._stop(graceful_s=0)  # out of step with the protocol: start afresh
                    raise ScoringUnavailable(
                        "the scorer returned something that is not a score list"
                    )
                return response
            # The child is gone. It may have left on its idle timer just as this request
            # came (a clean exit, status 0): the request was never read, so start a new one
            # and send it again, once. A crash is reported: retrying could crash it again.
            returncode = self._reap(deadline)
            if returncode != 0 or attempt == 2:
                logger.warning(
                    "scorer process exited (status %s): %s",
                    returncode,
                    "\n".join(self._stderr_tail),
                )
                if returncode < 0:
                    raise ScoringUnavailable(f"the scorer was killed (signal {-returncode})")
                tail = list(self._stderr_tail)[-1:] or [f"exit status {returncode}"]
                raise ScoringUnavailable(f"the scorer failed: {tail[0]}")
        raise AssertionError("unreachable")

    def _running(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return proc
        if proc is not None:
            self._stop(graceful_s=0)
        self._stderr_tail = deque(maxlen=_STDERR_TAIL)
        self._pending = b""
        try:
            proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,  # raw pipes: no buffer lock that a fork could inherit held
                env=_scorer_env(),
                cwd=str(ROOT),
                start_new_session=True,  # Ctrl-C on the server's terminal: not mid-score
            )
        except OSError as exc:
            raise ScoringUnavailable(f"could not start the scorer: {exc}") from None
        assert proc.stdin is not None and proc.stderr is not None
        os.set_blocking(proc.stdin.fileno(), False)
        self._drainer = threading.Thread(
            target=_drain, args=(proc.stderr, self._stderr_tail), daemon=True, name="scorer-stderr"
        )
        self._drainer.start()
        self._proc = proc
        return proc

    def _send(self, proc: subprocess.Popen[bytes], data: bytes, deadline: float) -> None:
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        view = memoryview(data)
        while view:
            if not _wait(fd, writable=True, deadline=deadline):
                raise TimeoutError
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue

    def _receive(self, proc: subprocess.Popen[bytes], deadline: float) -> bytes | None:
        """One answer line, or None when the child closed its stdout (it is gone)."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while b"\n" not in self._pending:
            if not _wait(fd, writable=False, deadline=deadline):
                raise TimeoutError
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._pending += chunk
        reply, self._pending = self._pending.split(b"\n", 1)
        return reply

    def _reap(self, deadline: float) -> int:
        proc = self._proc
        assert proc is not None
        try:
            returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        if self._drainer is not None:
            self._drainer.join(timeout=1.0)  # its last lines say why it ended
        self._stop(graceful_s=0)
        return returncode

    def _stop(self, graceful_s: float) -> None:
        proc, self._proc = self._proc, None
        self._pending = b""
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()  # the child reads end of input and exits by itself
        if graceful_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=graceful_s)
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    def _forget(self) -> None:
        """In a forked child: drop the parent's scorer without touching it. Closing our copies
        of its pipes matters: while any process holds its stdin open, it never sees the end."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._owner = os.getpid()
        self._pending = b""
        self._drainer = None  # threads do not survive a fork
        proc, self._proc = self._proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            proc.returncode = 0  # not ours to wait for


def _forget_after_fork(ref: weakref.ref[ScorerProcess]) -> None:
    scorer = ref()
    if scorer is not None:
        scorer._forget()


def _wait(fd: int, *, writable: bool, deadline: float) -> bool:
    """Whether `fd` is ready before `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_WRITE if writable else selectors.EVENT_READ)
        return bool(selector.select(remaining))


def _drain(stream: IO[bytes], tail: deque[str]) -> None:
    """Read the child's stderr to its end, so a chatty child never blocks on a full pipe;
    the last lines explain a crash."""
    pending = b""
    with stream:
        while chunk := stream.read(1 << 14):
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                text = raw.decode("utf-8", "replace").rstrip()
                if text:
                    tail.append(text)
                    logger.debug("scorer: %s", text)


_SCORER = ScorerProcess()
"""This web process's scorer (a forked worker gets its own on its first request)."""
atexit.register(_SCORER.close)


def default_scorer() -> ScorerProcess:
    """The process-wide scorer that `score_dir` uses unless told otherwise."""
    return _SCORER


def scorable_dir(session: Session, model_id: int) -> Path:
    """The directory of a reward model that can score, or the reason it cannot."""
    model = get(session, model_id)
    if model.kind is not ModelKind.reward:
        raise InvalidInput(
            f"model {model_id} is a {model.kind.value} model; only reward models score"
        )
    return _artifact_dir(model)


def score_dir(
    directory: Path,
    prompt: str,
    completions: Sequence[str],
    *,
    timeout_s: float = SCORE_TIMEOUT_S,
    scorer: ScorerProcess | None = None,
) -> list[float]:
    """One reward per completion from the model in `directory`, computed in the scorer
    subprocess (`scorer`, by default this process's own, started on first use).

    Needs no database session: callers that can should close their transaction first, since
    the first request for a model loads it, which takes seconds (and on SQLite an open
    transaction blocks writers).
    """
    if not completions:
        raise InvalidInput("send at least one completion")
    if len(completions) > MAX_SCORE_COMPLETIONS:
        raise InvalidInput(f"at most {MAX_SCORE_COMPLETIONS} completions per request")
    if not _worker_extra_installed():
        raise ScoringUnavailable(MISSING_EXTRA_MESSAGE)
    scorer = scorer or _SCORER
    scores = scorer.score(directory, prompt, completions, timeout_s=timeout_s)
    if len(scores) != len(completions):
        raise ScoringUnavailable("the scorer returned the wrong number of scores")
    return scores


def curve(metrics: dict[str, Any]) -> list[float]:
    """The training-loss curve stored in a model's metrics, as plain finite floats.

    Trainers store it as ``train_curve`` (a list of numbers or of dicts with a ``loss``) or
    as ``history`` (per-step or per-epoch dicts); whichever is there is used.
    """
    for key in ("train_curve", "history"):
        raw = metrics.get(key)
        if not isinstance(raw, list):
            continue
        values = []
        for point in raw:
            value = point.get("loss", point.get("train_loss")) if isinstance(point, dict) else point
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                values.append(float(value))
        if values:
            return values
    return []


def svg_polyline(values: Sequence[float], width: int = 240, height: int = 60, pad: int = 3) -> str:
    """SVG ``points`` for a line plot of `values` scaled into the box (pure, numbers only)."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = len(values)
    step = (width - 2 * pad) / max(n - 1, 1)
    points = []
    for i, v in enumerate(values):
        x = pad + i * step
        y = pad + (hi - v) / span * (height - 2 * pad)
        points.append(f"{x:.1f},{y:.1f}")
    return " ".join(points)
