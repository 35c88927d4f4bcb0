"""The schema only changes through Alembic, and the same migrations work on both backends."""

from __future__ import annotations

import pytest
from alembic import command as alembic_command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.cli import alembic_config
from app.models import Base
from tests.conftest import BACKENDS, recreate_pg_database


@pytest.fixture(params=BACKENDS)
def empty_url(request, tmp_path):
    if request.param == "postgres":
        return recreate_pg_database("prefloop_migrations")
    return f"sqlite:///{tmp_path / 'm.db'}"


def _cfg(url):
    cfg = alembic_config(url)
    cfg.attributes["configure_logger"] = False
    return cfg


def test_upgrade_downgrade_upgrade(empty_url):
    cfg = _cfg(empty_url)
    engine = create_engine(empty_url)
    alembic_command.upgrade(cfg, "head")
    tables = set(inspect(engine).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} <= tables

    alembic_command.downgrade(cfg, "base")
    engine.dispose()
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

    alembic_command.upgrade(cfg, "head")
    engine.dispose()
    assert {t.name for t in Base.metadata.sorted_tables} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_models_match_migrations(empty_url):
    """What `alembic check` does: autogenerate against the migrated database finds nothing."""
    alembic_command.upgrade(_cfg(empty_url), "head")
    engine = create_engine(empty_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []
