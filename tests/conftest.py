"""Shared fixtures: real Postgres and SQLite, migrated once per session; each test rolls back.

The rollback recipe is SQLAlchemy's "joining a session into an external transaction": the
app under test gets a sessionmaker bound to one connection inside an outer transaction, in
``create_savepoint`` mode, so every request's commit is a savepoint and the test's end undoes
everything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command as alembic_command
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from app.cli import alembic_config
from app.db import make_engine
from app.main import create_app
from app.models import Base
from app.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PG_ADMIN_URL = os.environ.get(
    "PREFLOOP_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# One database per test run (by process id), so parallel runs never drop each other's.
PG_TEST_DB = os.environ.get("PREFLOOP_TEST_PG_DB", f"prefloop_test_{os.getpid()}")
BACKENDS = ["sqlite", "postgres"]


def pg_url(dbname: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + dbname


def recreate_pg_database(dbname: str) -> str:
    """Drop and create a Postgres database; returns its URL. Fails loudly if Postgres is down."""
    assert re.fullmatch(r"[a-z0-9_]+", dbname)
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {dbname}"))
    admin.dispose()
    return pg_url(dbname)


def migrated_settings(backend: str, tmp_dir: Path, name: str) -> Settings:
    """A fresh database of the given backend at the newest migration."""
    if backend == "postgres":
        url = recreate_pg_database(name)
    else:
        url = f"sqlite:///{tmp_dir / (name + '.db')}"
    settings = Settings(
        env="test",
        database_url=url,
        secret_key="test-secret-key-0123456789",
        artifact_dir=tmp_dir / f"{name}-artifacts",
    )
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    alembic_command.upgrade(cfg, "head")
    return settings


@pytest.fixture(scope="session", params=BACKENDS)
def backend_settings(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    backend: str = request.param
    return migrated_settings(backend, tmp_path_factory.mktemp(backend), PG_TEST_DB)


@pytest.fixture(scope="session")
def backend_engine(backend_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(backend_settings)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(backend_engine: Engine) -> Iterator[Connection]:
    with backend_engine.connect() as conn:
        outer = conn.begin()
        yield conn
        if outer.is_active:
            outer.rollback()


@pytest.fixture
def session_factory(connection: Connection) -> sessionmaker[Session]:
    return sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )


@pytest.fixture
def db(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session for arranging and asserting; its writes are visible to the app under test."""
    with session_factory() as session:
        yield session


@pytest.fixture
def settings(backend_settings: Settings) -> Settings:
    return backend_settings


@pytest.fixture
def app(backend_settings: Settings, session_factory: sessionmaker[Session]):  # type: ignore[no-untyped-def]
    application = create_app(backend_settings)
    application.state.engine.dispose()
    application.state.sessionmaker = session_factory
    return application


@pytest.fixture
def client(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app) as c:
        yield c


@pytest.fixture
def backend(backend_settings: Settings) -> str:
    return "sqlite" if backend_settings.is_sqlite else "postgres"


def truncate_all(engine: Engine) -> None:
    """Empty every table (for tests that need real commits across connections)."""
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("TRUNCATE " + ", ".join(tables) + " RESTART IDENTITY CASCADE"))
        else:
            for name in tables:
                conn.execute(text(f"DELETE FROM {name}"))


@pytest.fixture
def committed_factory(backend_engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Real commits on the backend (for concurrency and browser tests); emptied afterwards."""
    truncate_all(backend_engine)
    yield sessionmaker(backend_engine, expire_on_commit=False)
    truncate_all(backend_engine)
