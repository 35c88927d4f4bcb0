"""Annotation engine benchmark: many annotators over HTTP against the real app on Postgres,
against the same claim + judgment SQL issued directly through psycopg.

    .venv/bin/python bench/annotate.py --annotators 200 --judgments 20000

What runs, in one process tree, on one machine (the load generator shares its cores):

1. A fresh Postgres database (`--db-name`, dropped and recreated), migrated to head; one
   annotator user with its own bearer token per simulated annotator; three pairwise projects
   (one per phase) whose tasks need `--overlap` distinct annotators each, with just enough
   tasks for the phase's judgments, so the run ends with every task exactly full.
2. The app under `uvicorn --workers N` in a subprocess.
3. **saturate**: every annotator loops `GET tasks/next` -> `POST judgments` (with a fresh
   `client_key`) with no pause, until the target is reached. This gives the throughput
   (judgments/s) compared with the baseline. Latencies here are queueing time: with no
   think time, a closed loop of N clients waits about N / throughput per request.
4. **paced**: the same, with an exponential think time (mean `--think-s`) between getting a
   task and submitting it, as people do, and arrivals spread over the first mean think time;
   these are the latencies an annotator feels.
5. **baseline**: the server is stopped; the same number of threads run the service's own SQL
   statements (the claim with its `FOR UPDATE SKIP LOCKED` and re-checks, then the judgment
   insert) through psycopg, sharing as many connections as the web workers' pools hold.
   What it leaves out is exactly our overhead: HTTP, auth, FastAPI, SQLAlchemy ORM.
6. Integrity, per phase, from the database: every judgment the client saw created is stored
   exactly once (by client_key) and nothing else is; no task has more judgments than required
   and every counter equals the real count; no annotator judged a task twice.

The web workers' RSS (the sum over worker processes) is sampled through the saturate phase;
`--judgments 100000` shows whether it stays flat over a long run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from app.cli import alembic_config  # noqa: E402
from app.db import make_engine, make_sessionmaker, transaction  # noqa: E402
from app.domain import assignment  # noqa: E402
from app.models import Role  # noqa: E402
from app.services import projects, prompts, users  # noqa: E402
from app.settings import Settings  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
SECRET = "bench-secret-key-0123456789abcdef"
POOL_PER_WORKER = 30  # app.db.make_engine: pool_size 10 + max_overflow 20


# --- setup ------------------------------------------------------------------------------------


def fresh_database(admin_url: str, name: str) -> str:
    """Drop and create `name`, migrate it to head; returns its SQLAlchemy URL."""
    assert re.fullmatch(r"[a-z0-9_]+", name), name
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    from alembic import command

    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    command.upgrade(cfg, "head")
    return url


@dataclass(frozen=True)
class Annotator:
    user_id: int
    token: str


def seed(
    settings: Settings, n_users: int, phases: dict[str, int], overlap: int
) -> tuple[list[Annotator], dict[str, int]]:
    """Annotators with tokens, and one project per phase with ceil(judgments / overlap) pairs,
    imported through the app's own upload path."""
    engine = make_engine(settings)
    with transaction(make_sessionmaker(engine)) as s:
        people = []
        for i in range(n_users):
            user = users.create(s, f"bench-annotator-{i}", Role.annotator, None)
            people.append(Annotator(user.id, users.create_token(s, user, "bench")))
        project_ids = {}
        for phase, judgments in phases.items():
            project = projects.create(
                s, name=f"bench-{phase}", judgments_per_task=overlap, lease_seconds=600
            )
            n_tasks = math.ceil(judgments / overlap)
            rows = "\n".join(
                json.dumps(
                    {
                        "id": f"{phase}-{i}",
                        "prompt": f"Question {i}: which answer is more helpful?",
                        "completions": [f"First answer to {i}.", f"Second answer to {i}."],
                    }
                )
                for i in range(n_tasks)
            )
            result = prompts.import_upload(
                s,
                project.id,
                f"{phase}.jsonl",
                rows.encode(),
                upsert=False,
                rng=random.Random(1),
                settings=settings.model_copy(update={"max_upload_bytes": 1 << 30}),
            )
            assert result.tasks_created == n_tasks, result
            project_ids[phase] = project.id
    engine.dispose()
    return people, project_ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(port: int, workers: int) -> None:
    """`prefloop serve --workers N` as the server subprocess runs it: on a TCP listener
    (app.serving.tcp_listener), quiet, with long keep-alive."""
    from app import serving

    serving.run(
        "127.0.0.1", port, workers, log_level="warning", access_log=False, timeout_keep_alive=120
    )


def start_server(url: str, workers: int, listener: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PREFLOOP_DATABASE_URL": url,
        "PREFLOOP_SECRET_KEY": SECRET,
        "PREFLOOP_ENV": "dev",
    }
    if listener == "tcp":
        code = "import sys; sys.path[:0] = ['bench']; import annotate; "
        code += f"annotate.serve({port}, {workers})"
        cmd = [sys.executable, "-c", code]
    else:  # uvicorn's own listener, as `uvicorn --workers N` binds it
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
            "--timeout-keep-alive",
            "120",  # above httpx's 5 s idle expiry, so the two never race to close a connection
        ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            up = httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            up = False
        if up and len(worker_processes(proc)) >= workers:  # all up before the clock starts
            return proc, base
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the web server did not start")


def worker_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """uvicorn's worker processes (with --workers 1 the server process is the worker)."""
    parent = psutil.Process(proc.pid)
    return parent.children() or [parent]


def workers_rss_mib(proc: subprocess.Popen[bytes]) -> list[float]:
    return [worker.memory_info().rss / 2**20 for worker in worker_processes(proc)]


def workers_cpu_s(proc: subprocess.Popen[bytes]) -> float:
    return sum(sum(worker.cpu_times()[:2]) for worker in worker_processes(proc))


class StandInAutovacuum:
    """VACUUM (ANALYZE) the tables a labeling run churns once a minute, when the server has
    autovacuum off (this machine's Postgres does; Postgres's default is on).

    Every claim inserts a lease and every judgment deletes one and updates its task, so
    without vacuum the dead rows pile up in the indexes the claim scans: throughput fell from
    about 7,000 to 1,800 judgments a minute over 12 minutes of a 100,000-judgment run, and
    went back to 5,500 right after one manual VACUUM. Autovacuum with its defaults would
    vacuum these tables about once a minute (autovacuum_naptime) under this load, so this
    stands in for it, for the HTTP phases and the baseline alike. It prints nothing when
    autovacuum is on.
    """

    TABLES = "leases, tasks, judgments"

    def __init__(self, url: str, every_s: float = 60.0) -> None:
        self.dsn = url.replace("postgresql+psycopg://", "postgresql://")
        self.every_s = every_s
        self.stop = threading.Event()
        with psycopg.connect(self.dsn) as conn:
            setting = conn.execute("SHOW autovacuum").fetchone()
        self.needed = setting is not None and setting[0] == "off"
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        if self.needed:
            print(
                f"  (autovacuum is off on this server: VACUUM (ANALYZE) {self.TABLES} "
                f"every {self.every_s:g} s stands in for it)"
            )
            self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.needed:
            self.thread.join()

    def _loop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.wait(self.every_s):
                conn.execute(f"VACUUM (ANALYZE) {self.TABLES}")


# --- load over HTTP ---------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw in one phase."""

    target: int
    next_s: list[float] = field(default_factory=list)
    submit_s: list[float] = field(default_factory=list)
    created_keys: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    empty: int = 0  # 204: nothing left for this annotator right now
    replays: int = 0
    wall_s: float = 0.0
    rss_mib: list[tuple[int, float]] = field(default_factory=list)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def done(self) -> int:
        return len(self.created_keys)


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams, one connection per simulated
    annotator. httpx's async stack spent about 11 ms of CPU per request here, as much as the
    server, on the two cores it shares with the server; this spends a fraction of that, so
    the measurement disturbs less what it measures. `--client httpx` uses httpx instead."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, token: str, body: Any = None
    ) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + data)
            status_line = await self.reader.readuntil(b"\r\n")
            headers = await self.reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await self.close()
            raise
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        for line in headers.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length) if length else b""
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, None  # e.g. a plain-text 500 page

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


class HttpxClient:
    """The same interface over a shared httpx.AsyncClient."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(
        self, method: str, path: str, token: str, body: Any = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        resp = await self.client.request(method, path, json=body, headers=headers)
        return resp.status_code, resp.json() if resp.content else None

    async def close(self) -> None:
        pass


CLIENT_ERRORS = (OSError, asyncio.IncompleteReadError, httpx.HTTPError, ValueError)


async def annotate(
    client: RawHttp | HttpxClient,
    who: Annotator,
    project_id: int,
    tally: Tally,
    think_s: float,
    rng: random.Random,
) -> None:
    """One annotator: next -> (think) -> submit, until the phase's target is reached.

    With think time, annotators arrive spread over one mean think time, as people do; all
    200 asking for their first task in the same millisecond would measure a burst that
    never happens, not the steady state.
    """
    if think_s:
        await asyncio.sleep(rng.uniform(0, think_s))
    empty_in_a_row = 0
    while tally.done < tally.target:
        t0 = time.perf_counter()
        try:
            status, task = await client.request(
                "GET", f"/api/v1/projects/{project_id}/tasks/next", who.token
            )
        except CLIENT_ERRORS as exc:
            tally.errors[f"next: {type(exc).__name__}"] += 1
            continue
        tally.next_s.append(time.perf_counter() - t0)
        if status == 204:
            tally.empty += 1
            empty_in_a_row += 1
            if empty_in_a_row >= 3:
                break  # the rest is leased by or done for others
            await asyncio.sleep(0.5)
            continue
        if status != 200:
            tally.errors[f"next: HTTP {status}"] += 1
            continue
        empty_in_a_row = 0
        if think_s:
            await asyncio.sleep(rng.expovariate(1 / think_s))
        key = uuid.uuid4().hex
        body = {"choice": task["candidates"][rng.randrange(2)]["id"], "client_key": key}
        t0 = time.perf_counter()
        try:
            status, _ = await client.request(
                "POST", f"/api/v1/tasks/{task['task_id']}/judgments", who.token, body
            )
        except CLIENT_ERRORS as exc:
            tally.errors[f"submit: {type(exc).__name__}"] += 1
            continue
        tally.submit_s.append(time.perf_counter() - t0)
        if status == 201:
            tally.created_keys.append(key)
        elif status == 200:
            tally.replays += 1
        else:
            tally.errors[f"submit: HTTP {status}"] += 1
    await client.close()


async def sample_rss(proc: subprocess.Popen[bytes], tally: Tally, every_s: float) -> None:
    """Sample the web workers' RSS; on a long run (the memory check) also print it once a
    minute, so a run stopped early still shows its trend."""
    start, shown = time.monotonic(), 0
    while True:
        tally.rss_mib.append((tally.done, sum(workers_rss_mib(proc))))
        if tally.target >= 20_000 and time.monotonic() - start >= 60 * (shown + 1):
            shown += 1
            done, mib = tally.rss_mib[-1]
            print(f"  ... {done} judgments after {shown} min, web workers' RSS {mib:.0f} MiB")
        await asyncio.sleep(every_s)


async def http_phase(
    base: str,
    people: list[Annotator],
    project_id: int,
    target: int,
    think_s: float,
    proc: subprocess.Popen[bytes],
    seed: int,
    client_kind: str,
) -> Tally:
    tally = Tally(target=target)
    limits = httpx.Limits(
        max_connections=len(people) + 8, max_keepalive_connections=len(people) + 8
    )
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as shared:
        clients = [RawHttp(base) if client_kind == "raw" else HttpxClient(shared) for _ in people]
        sampler = asyncio.create_task(sample_rss(proc, tally, 2.0))
        cpu0, client0 = workers_cpu_s(proc), time.process_time()
        start = time.perf_counter()
        await asyncio.gather(
            *(
                annotate(client, who, project_id, tally, think_s, random.Random(seed * 10_000 + i))
                for i, (client, who) in enumerate(zip(clients, people, strict=True))
            )
        )
        tally.wall_s = time.perf_counter() - start
        tally.server_cpu_s = workers_cpu_s(proc) - cpu0
        tally.client_cpu_s = time.process_time() - client0
        sampler.cancel()
        tally.rss_mib.append((tally.done, sum(workers_rss_mib(proc))))
    return tally


# --- the direct-SQL baseline ------------------------------------------------------------------

OWN_LEASES = """SELECT l.id, l.task_id, l.expires_at, t.state FROM leases l
JOIN tasks t ON t.id = l.task_id WHERE l.user_id = %(u)s AND t.project_id = %(p)s
ORDER BY l.created_at, l.id"""
WINDOW = """SELECT w.id, w.judgment_count, w.priority,
  w.judgment_count + (SELECT count(*) FROM leases l WHERE l.task_id = w.id
      AND l.user_id != %(u)s AND l.expires_at > %(now)s) < w.required_judgments
  AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.prompt_id = w.prompt_id AND s.user_id = %(u)s)
FROM (SELECT id, judgment_count, priority, required_judgments, prompt_id FROM tasks t
      WHERE project_id = %(p)s AND state = 'open' AND is_gold IS false
        AND judgment_count < required_judgments AND id != ALL(%(tried)s)
        AND (judgment_count = 0 OR (SELECT count(*) FROM judgments j
                                    WHERE j.task_id = t.id AND j.user_id = %(u)s) = 0)
      ORDER BY judgment_count DESC, priority DESC, id DESC LIMIT 200) w
ORDER BY w.judgment_count DESC, w.priority DESC, w.id DESC"""
RECHECK = """SELECT (SELECT count(*) FROM leases WHERE task_id = %(t)s AND user_id != %(u)s
    AND expires_at > %(now)s),
  EXISTS (SELECT 1 FROM judgments WHERE task_id = %(t)s AND user_id = %(u)s),
  EXISTS (SELECT 1 FROM skips WHERE prompt_id = %(prompt)s AND user_id = %(u)s),
  EXISTS (SELECT 1 FROM leases WHERE task_id = %(t)s AND expires_at <= %(now)s)"""
TASK_COLUMNS = (
    "id, project_id, prompt_id, completion_ids, required_judgments, judgment_count, is_gold,"
    " gold_answer, priority, state, created_at"
)


def baseline_claim(
    cur: psycopg.Cursor[Any], project_id: int, user_id: int, rng: random.Random
) -> tuple[int, list[int]] | None:
    """The statements `app.services.tasks.claim_next` issues, in its order."""
    now = datetime.now(UTC)
    args: dict[str, Any] = {"u": user_id, "p": project_id, "now": now}
    cur.execute("SELECT * FROM projects WHERE id = %s", (project_id,))
    project = cur.fetchone()
    assert project is not None
    cur.execute(OWN_LEASES, args)
    if any(row[2] > now for row in cur.fetchall()):
        raise AssertionError("the baseline never holds a lease when it claims")
    tried: list[int] = []
    while True:
        cur.execute(WINDOW, {**args, "tried": tried})
        rows = cur.fetchall()
        batch = [assignment.Candidate(tid, n, prio) for tid, n, prio, ok in rows if ok][:50]
        if not batch:
            if len(rows) < 200:
                return None
            tried.extend(row[0] for row in rows)
            continue
        for cand in assignment.default_order(batch, rng):
            tried.append(cand.task_id)
            cur.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %s FOR UPDATE SKIP LOCKED",
                (cand.task_id,),
            )
            task = cur.fetchone()
            if task is None or task[9] != "open":
                continue
            cur.execute(RECHECK, {**args, "t": task[0], "prompt": task[2]})
            others, judged, skipped, expired = cur.fetchone()  # type: ignore[misc]
            if judged or skipped or not assignment.has_free_slot(task[4], task[5], others):
                continue
            if expired:
                cur.execute(
                    "DELETE FROM leases WHERE task_id = %s AND expires_at <= %s", (task[0], now)
                )
            order = assignment.display_order(task[3], rng)
            cur.execute(
                "INSERT INTO leases (task_id, user_id, display_order, created_at, expires_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (task[0], user_id, json.dumps(order), now, now + timedelta(seconds=project[5])),
            )
            cur.execute(
                "SELECT p.*, c.id, c.text FROM prompts p JOIN completions c ON c.prompt_id = p.id"
                " WHERE p.id = %s AND c.id = ANY(%s)",
                (task[2], order),
            )
            cur.fetchall()
            return task[0], order


def baseline_judge(
    cur: psycopg.Cursor[Any], task_id: int, user_id: int, winner: int, loser: int, key: str
) -> None:
    """The statements `app.services.judgments.record` issues, in its order."""
    now = datetime.now(UTC)
    cur.execute(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
    task = cur.fetchone()
    assert task is not None
    cur.execute(
        "SELECT * FROM judgments WHERE (task_id = %s AND user_id = %s) OR client_key = %s",
        (task_id, user_id, key),
    )
    assert not cur.fetchall()
    cur.execute(
        "DELETE FROM leases WHERE task_id = %s AND user_id = %s RETURNING display_order, expires_at",
        (task_id, user_id),
    )
    lease = cur.fetchone()
    assert lease is not None and lease[1] > now
    cur.execute(
        "INSERT INTO judgments (project_id, task_id, user_id, ranking, none_acceptable,"
        " display_order, client_key, is_gold, created_at)"
        " VALUES (%s, %s, %s, %s, false, %s, %s, false, %s) RETURNING id",
        (
            task[1],
            task_id,
            user_id,
            json.dumps([[winner], [loser]]),
            json.dumps(lease[0]),
            key,
            now,
        ),
    )
    count = task[5] + 1
    cur.execute(
        "UPDATE tasks SET judgment_count = %s, state = %s WHERE id = %s",
        (count, "done" if count >= task[4] else "open", task_id),
    )


def baseline_phase(
    url: str, people: list[Annotator], project_id: int, target: int, connections: int
) -> Tally:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    pool: queue.Queue[psycopg.Connection[Any]] = queue.Queue()
    for _ in range(connections):
        pool.put(psycopg.connect(dsn, options="-c jit=off"))  # as app.db.make_engine
    tally = Tally(target=target)
    lock = threading.Lock()
    start_gate = threading.Barrier(len(people) + 1)

    def run(who: Annotator, seed: int) -> None:
        rng = random.Random(seed)
        start_gate.wait()
        while tally.done < target:
            t0 = time.perf_counter()
            conn = pool.get()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    got = baseline_claim(cur, project_id, who.user_id, rng)
            except psycopg.Error as exc:
                tally.errors[f"claim: {type(exc).__name__}"] += 1
                continue
            finally:
                pool.put(conn)
            tally.next_s.append(time.perf_counter() - t0)
            if got is None:
                return
            task_id, order = got
            key = uuid.uuid4().hex
            winner = order[rng.randrange(2)]
            t0 = time.perf_counter()
            conn = pool.get()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    baseline_judge(
                        cur, task_id, who.user_id, winner, order[0] + order[1] - winner, key
                    )
            except psycopg.Error as exc:
                tally.errors[f"judge: {type(exc).__name__}"] += 1
                continue
            finally:
                pool.put(conn)
            tally.submit_s.append(time.perf_counter() - t0)
            with lock:
                tally.created_keys.append(key)

    threads = [threading.Thread(target=run, args=(who, i)) for i, who in enumerate(people)]
    for t in threads:
        t.start()
    start_gate.wait()
    start, client0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    tally.wall_s = time.perf_counter() - start
    tally.client_cpu_s = time.process_time() - client0
    while not pool.empty():
        pool.get().close()
    return tally


# --- checks and report ------------------------------------------------------------------------


def integrity(url: str, project_id: int, tally: Tally) -> dict[str, int]:
    """Violations found in the database for one phase; all zero when the engine is correct."""
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM judgments WHERE project_id = %s", (project_id,))
        stored = cur.fetchone()[0]  # type: ignore[index]
        cur.execute(
            "SELECT count(*) FROM judgments WHERE project_id = %s AND client_key = ANY(%s)",
            (project_id, tally.created_keys),
        )
        found = cur.fetchone()[0]  # type: ignore[index]
        cur.execute(
            """SELECT count(*) FILTER (WHERE c.n > t.required_judgments),
                      count(*) FILTER (WHERE c.n <> t.judgment_count)
               FROM tasks t JOIN (SELECT task_id, count(*) AS n FROM judgments
                                  WHERE project_id = %s GROUP BY task_id) c ON c.task_id = t.id""",
            (project_id,),
        )
        over, miscounted = cur.fetchone()  # type: ignore[misc]
        cur.execute(
            "SELECT count(*) FROM tasks WHERE project_id = %s AND judgment_count > required_judgments",
            (project_id,),
        )
        over_counter = cur.fetchone()[0]  # type: ignore[index]
        cur.execute(
            """SELECT count(*) FROM (SELECT 1 FROM judgments WHERE project_id = %s
               GROUP BY task_id, user_id HAVING count(*) > 1) d""",
            (project_id,),
        )
        twice = cur.fetchone()[0]  # type: ignore[index]
    return {
        "created keys not stored once": len(tally.created_keys)
        - found
        + (len(tally.created_keys) - len(set(tally.created_keys))),
        "stored rows the clients never saw created": stored - found,
        "tasks over their required judgments": int(over) + int(over_counter),
        "task counters that differ from the rows": int(miscounted),
        "annotator twice on a task": int(twice),
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report(name: str, tally: Tally, checks: dict[str, int], *, client: str) -> float:
    """Print one phase; returns its judgments per second."""
    rate = tally.done / tally.wall_s if tally.wall_s else 0.0
    errors = sum(tally.errors.values())
    per = max(tally.done, 1)
    print(f"\n[{name}] {tally.done} judgments in {tally.wall_s:.1f} s = {rate:.1f} judgments/s")
    print(
        f"  next   p50 {pct(tally.next_s, 0.5):7.1f} ms   p99 {pct(tally.next_s, 0.99):7.1f} ms"
        f"   ({len(tally.next_s)} calls, {tally.empty} answered 'nothing left')"
    )
    print(
        f"  submit p50 {pct(tally.submit_s, 0.5):7.1f} ms   p99 {pct(tally.submit_s, 0.99):7.1f} ms"
        f"   ({len(tally.submit_s)} calls, {tally.replays} replays)"
    )
    print(f"  errors {errors}" + (f" {dict(tally.errors)}" if errors else ""))
    bad = {k: v for k, v in checks.items() if v}
    print(f"  integrity: {bad if bad else 'OK, 0 violations'}")
    cpu = f"  CPU per judgment: {client} {tally.client_cpu_s / per * 1000:.1f} ms"
    if tally.server_cpu_s:
        cpu += f", web workers {tally.server_cpu_s / per * 1000:.1f} ms"
    print(cpu + " (Postgres not counted)")
    return rate


def print_rss(rss: list[tuple[int, float]]) -> None:
    if len(rss) < 2:
        return
    marks = [rss[0]] + [rss[int(len(rss) * f)] for f in (0.25, 0.5, 0.75)] + [rss[-1]]
    print(
        "  web workers' RSS (sum) by judgments done: "
        + ", ".join(f"{done}: {mib:.0f} MiB" for done, mib in marks)
    )
    # the first samples include warm-up (imports, pools, caches); growth is judged after it
    warm = next((i for i, (done, _) in enumerate(rss) if done >= rss[-1][0] * 0.1), 0)
    first, last = rss[warm][1], rss[-1][1]
    print(
        f"  RSS from 10% to 100% of the phase: {last - first:+.1f} MiB "
        f"({(last / first - 1) * 100:+.1f}%); from the start: {last - rss[0][1]:+.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=200)
    parser.add_argument("--judgments", type=int, default=5_000, help="saturate phase")
    parser.add_argument("--paced-judgments", type=int, default=2_000)
    parser.add_argument("--think-s", type=float, default=10.0, help="mean think time, paced")
    parser.add_argument("--baseline-judgments", type=int, default=None, help="default: --judgments")
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--db-name", default="prefloop_bench_annotate")
    parser.add_argument(
        "--pg-admin-url", default=os.environ.get("PREFLOOP_BENCH_PG_ADMIN_URL", PG_ADMIN_URL)
    )
    parser.add_argument("--skip-paced", action="store_true")
    parser.add_argument(
        "--client", choices=("raw", "httpx"), default="raw", help="the load generator's HTTP"
    )
    parser.add_argument(
        "--listener",
        choices=("tcp", "uvicorn"),
        default="tcp",
        help="tcp: bind the server's socket as IPPROTO_TCP (TCP_NODELAY on every connection, "
        "see app.serving.tcp_listener); uvicorn: let `uvicorn --workers N` bind it (Nagle stays on)",
    )
    args = parser.parse_args()
    baseline_target = args.baseline_judgments or args.judgments

    print(
        f"annotate bench: {args.annotators} annotators, overlap {args.overlap}, "
        f"{args.workers} uvicorn workers ({args.listener} listener); {os.cpu_count()} CPUs "
        "shared by Postgres, the web workers and this load generator "
        f"(load average now {os.getloadavg()[0]:.1f})"
    )
    url = fresh_database(args.pg_admin_url, args.db_name)
    settings = Settings(database_url=url, secret_key=SECRET, env="dev")
    phases = {"saturate": args.judgments, "baseline": baseline_target}
    if not args.skip_paced:
        phases["paced"] = args.paced_judgments
    t0 = time.perf_counter()
    people, project_ids = seed(settings, args.annotators, phases, args.overlap)
    n_tasks = sum(math.ceil(n / args.overlap) for n in phases.values())
    print(f"seeded {n_tasks} tasks in {time.perf_counter() - t0:.1f} s")

    vacuum = StandInAutovacuum(url)
    vacuum.start()
    proc, base = start_server(url, args.workers, args.listener)
    try:
        saturate = asyncio.run(
            http_phase(
                base, people, project_ids["saturate"], args.judgments, 0.0, proc, 1, args.client
            )
        )
        rate = report(
            "saturate: HTTP, no think time",
            saturate,
            integrity(url, project_ids["saturate"], saturate),
            client=f"load generator ({args.client})",
        )
        print_rss(saturate.rss_mib)
        if not args.skip_paced:
            paced = asyncio.run(
                http_phase(
                    base,
                    people,
                    project_ids["paced"],
                    args.paced_judgments,
                    args.think_s,
                    proc,
                    2,
                    args.client,
                )
            )
            report(
                f"paced: HTTP, think time ~ Exp(mean {args.think_s:g} s)",
                paced,
                integrity(url, project_ids["paced"], paced),
                client=f"load generator ({args.client})",
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    connections = min(args.annotators, args.workers * POOL_PER_WORKER)
    base_tally = baseline_phase(url, people, project_ids["baseline"], baseline_target, connections)
    base_rate = report(
        f"baseline: the same SQL through psycopg, {args.annotators} threads, "
        f"{connections} connections",
        base_tally,
        integrity(url, project_ids["baseline"], base_tally),
        client="psycopg threads",
    )
    vacuum.close()
    print(
        f"\nthroughput ratio (saturate / baseline): {rate / base_rate:.2f} "
        f"({rate:.1f} / {base_rate:.1f} judgments/s)"
    )


if __name__ == "__main__":
    main()
