"""Engine and session factory. Built once per process by ``create_app`` / the worker's ``main``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings

READ_ONLY_OPTION = "prefloop_read_only"
POOL_SIZE = 10
MAX_OVERFLOW = 20
POOL_CONNECTIONS = POOL_SIZE + MAX_OVERFLOW
"""The most connections one process's pool opens (Postgres)."""


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    """Create the engine; SQLite gets WAL, foreign keys and immediate transactions.

    SQLite transactions start with ``BEGIN IMMEDIATE`` so two threads of the one web process
    never both read and then fail to upgrade to a write lock: writes are serialized up front.
    """
    url = settings.database_url
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            deferred = conn.get_execution_options().get(READ_ONLY_OPTION, False)
            conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_size", POOL_SIZE)
    kwargs.setdefault("max_overflow", MAX_OVERFLOW)
    # No JIT: Postgres compiles a query whose *estimated* cost passes jit_above_cost, and the
    # claim's windowed statements are estimated as if they read every open task (they stop
    # after a window); that JIT compilation took 230 ms of a 15 ms statement.
    kwargs.setdefault("connect_args", {"options": "-c jit=off"})
    engine = create_engine(url, **kwargs)
    _ping_after_idle(engine)
    return engine


PING_AFTER_IDLE_S = 5.0
"""A pooled connection that sat unused this long is pinged before it is handed out."""


def _ping_after_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling for connections that were idle, as SQLAlchemy's
    documented checkout-event recipe: a failed ping raises DisconnectionError, and the pool
    replaces the connection (up to three tries) before the request sees anything.

    ``pool_pre_ping=True`` pings on every checkout: one more round trip and ~5% of a web
    worker's CPU per labeling request (bench/annotate.py), for connections used a few
    milliseconds earlier. A server restart or an idle-connection timeout leaves connections
    idle, and those are still pinged; a connection that breaks while busy fails its request,
    with or without a pre-ping, and the engine then invalidates the pool.
    """

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise DisconnectionError(f"a pooled connection failed its ping: {exc}") from exc


def read_only(session: Session) -> Session:
    """Mark `session`'s coming transaction read-only, before its first statement.

    On SQLite it then begins DEFERRED, so a long read (an export) does not hold the write
    lock and block labeling; on Postgres it changes nothing.
    """
    session.connection(execution_options={READ_ONLY_OPTION: True})
    return session


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any error."""
    with factory() as session, session.begin():
        yield session
