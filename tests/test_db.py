"""The engine's pool: idle connections are pinged and replaced when the server dropped them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from app import db as app_db
from app.db import make_engine
from app.settings import Settings
from tests.conftest import PG_ADMIN_URL, recreate_pg_database


@pytest.fixture
def pg_settings() -> Iterator[Settings]:
    name = f"prefloop_test_pool_{os.getpid()}"
    yield Settings(database_url=recreate_pg_database(name))
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _backend_pid(engine) -> int:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(pid: int) -> None:
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    admin.dispose()


def test_an_idle_connection_the_server_dropped_is_replaced_before_use(
    pg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_db, "PING_AFTER_IDLE_S", 0.0)  # every reuse counts as idle
    engine = make_engine(pg_settings, pool_size=1, max_overflow=0)
    first = _backend_pid(engine)
    _terminate(first)  # a server restart or an idle timeout, while the connection sat pooled
    second = _backend_pid(engine)  # no error: the ping failed and the pool reconnected
    assert second != first
    assert _backend_pid(engine) == second  # the new connection is pooled and reused
    engine.dispose()


def test_a_connection_reused_at_once_is_not_pinged(
    pg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_db, "PING_AFTER_IDLE_S", 3600.0)
    engine = make_engine(pg_settings, pool_size=1, max_overflow=0)
    pings: list[object] = []
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: pings.append(conn) or True)
    first = _backend_pid(engine)
    assert _backend_pid(engine) == first
    assert pings == []
    monkeypatch.setattr(app_db, "PING_AFTER_IDLE_S", 0.0)
    assert _backend_pid(engine) == first
    assert len(pings) == 1
    engine.dispose()
