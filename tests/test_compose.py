"""docker-compose.yml is validated by reading it (no Docker engine here)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_start_in_order_postgres_migrate_web():
    services = _compose()["services"]
    assert set(services) == {"postgres", "migrate", "web", "worker"}
    assert services["postgres"]["healthcheck"]["test"]
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert services["migrate"]["command"] == ["prefloop", "db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy"


def test_every_service_gets_a_postgres_url_and_a_required_secret():
    services = _compose()["services"]
    for name in ("migrate", "web", "worker"):
        env = services[name]["environment"]
        assert env["PREFLOOP_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["PREFLOOP_SECRET_KEY"].startswith("${PREFLOOP_SECRET_KEY:?")
        assert env["PREFLOOP_ENV"] == "prod"


def test_worker_asks_for_a_gpu_and_shares_artifacts_with_web():
    services = _compose()["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "artifacts:/artifacts" in services["worker"]["volumes"]
    assert "artifacts:/artifacts" in services["web"]["volumes"]


def test_dockerfile_copies_what_the_commands_need():
    text = (ROOT / "Dockerfile").read_text()
    for part in ("app", "worker", "migrations", "templates", "alembic.ini"):
        assert f"COPY {part}" in text or part in text
