"""Typed configuration. Built by the caller (``create_app``, the CLI, the worker), never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET = "dev-insecure-secret-change-me"
PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "please-change", DEV_SECRET}


class Settings(BaseSettings):
    """Everything configurable, read from ``PREFLOOP_*`` environment variables or ``.env``."""

    model_config = SettingsConfigDict(env_prefix="PREFLOOP_", env_file=".env", extra="ignore")

    env: Literal["dev", "test", "prod"] = "dev"
    database_url: str = "sqlite:///./data/prefloop.db"
    secret_key: str = DEV_SECRET
    artifact_dir: Path = Path("./data/artifacts")

    session_max_age_s: int = Field(default=14 * 24 * 3600, gt=0)
    lease_seconds: int = Field(default=300, gt=0)
    heartbeat_interval_s: int = Field(default=60, gt=0)
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_pairs_per_prompt: int = Field(default=16, gt=0)
    cookie_secure: bool = False

    @model_validator(mode="after")
    def _secret_required_outside_dev(self) -> Settings:
        """A placeholder secret signs forgeable cookies; refuse it anywhere but dev and test."""
        if self.env == "prod" and (
            self.secret_key.strip().lower() in PLACEHOLDER_SECRETS or len(self.secret_key) < 16
        ):
            raise ValueError(
                "PREFLOOP_SECRET_KEY must be set to a random value of 16+ characters when "
                "PREFLOOP_ENV=prod (e.g. `python -c 'import secrets;print(secrets.token_urlsafe(32))'`)"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
