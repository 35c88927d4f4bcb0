"""The `prefloop` command line. Each command builds its own settings and engine."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Annotated

import typer
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from rich.console import Console

from app.db import make_engine, make_sessionmaker, transaction
from app.errors import DomainError
from app.models import Role
from app.services import users
from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
console = Console()
err_console = Console(stderr=True)

cli = typer.Typer(
    help="Prefloop: label preferences, build datasets, train reward models and policies.",
    no_args_is_help=True,
)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
user_cli = typer.Typer(help="Users.", no_args_is_help=True)
token_cli = typer.Typer(help="API tokens.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(user_cli, name="user")
cli.add_typer(token_cli, name="token")


def alembic_config(database_url: str) -> AlembicConfig:
    cfg = AlembicConfig(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def _sessions(settings: Settings):  # type: ignore[no-untyped-def]
    return make_sessionmaker(make_engine(settings))


def _fail(exc: DomainError) -> None:
    err_console.print(f"[red]error:[/red] {exc.message}")
    for item in exc.details.get("errors", []) or []:
        err_console.print(f"  line {item.get('line')}: {item.get('error')}")
    raise typer.Exit(code=1)


@db_cli.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations (the only way the schema changes)."""
    settings = Settings()
    if settings.is_sqlite:
        path = settings.database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    alembic_command.upgrade(alembic_config(settings.database_url), revision)
    console.print(f"database at [bold]{revision}[/bold]: {settings.database_url.split('@')[-1]}")


@db_cli.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION (e.g. base)."""
    settings = Settings()
    alembic_command.downgrade(alembic_config(settings.database_url), revision)


@user_cli.command("add")
def user_add(
    username: str,
    role: Annotated[Role, typer.Option(help="admin, annotator or researcher")] = Role.annotator,
    password: Annotated[
        str | None, typer.Option(help="omit to be prompted; '-' generates one")
    ] = None,
) -> None:
    """Create a user."""
    if password is None:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    generated = password == "-"
    if generated:
        password = secrets.token_urlsafe(12)
    try:
        with transaction(_sessions(Settings())) as session:
            users.create(session, username, role, password)
    except DomainError as exc:
        _fail(exc)
    console.print(f"created {role.value} [bold]{username}[/bold]")
    if generated:
        console.print(f"password: [bold]{password}[/bold]")


@user_cli.command("ensure-admin")
def user_ensure_admin(username: str = "admin") -> None:
    """Create an admin with a printed random password unless an admin already exists."""
    with transaction(_sessions(Settings())) as session:
        if any(u.role is Role.admin for u in users.list_users(session)):
            console.print("an admin account exists already")
            return
        password = secrets.token_urlsafe(12)
        users.create(session, username, Role.admin, password)
    console.print(f"created admin [bold]{username}[/bold] with password [bold]{password}[/bold]")


@user_cli.command("list")
def user_list() -> None:
    with transaction(_sessions(Settings())) as session:
        for u in users.list_users(session):
            state = "" if u.active else " (paused)"
            console.print(f"{u.id}\t{u.username}\t{u.role.value}{state}")


@token_cli.command("create")
def token_create(username: str, name: str = "cli") -> None:
    """Create an API token for USERNAME and print it once."""
    try:
        with transaction(_sessions(Settings())) as session:
            token = users.create_token(session, users.get_by_name(session, username), name)
    except DomainError as exc:
        _fail(exc)
    print(token)


@cli.command("serve")
def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the web app (run `prefloop db upgrade` first)."""
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=host, port=port, workers=workers)


@cli.command("import")
def import_prompts(
    project: str,
    file: Path,
    upsert: Annotated[
        bool, typer.Option(help="update prompts whose ids exist instead of refusing")
    ] = False,
) -> None:
    """Import a JSONL, CSV or Parquet prompt file into PROJECT (id or name), all or nothing."""
    import random

    from app.services import projects, prompts

    settings = Settings()
    try:
        with transaction(_sessions(settings)) as session:
            proj = projects.resolve(session, project)
            result = prompts.import_upload(
                session,
                proj.id,
                file.name,
                file.read_bytes(),
                upsert=upsert,
                rng=random.Random(),
                settings=settings,
            )
    except DomainError as exc:
        _fail(exc)
    console.print(result.summary())


@cli.command("export")
def export_rows(
    project: str,
    shape: Annotated[str, typer.Option(help="pairs, rankings or raw")] = "pairs",
    fmt: Annotated[str, typer.Option("--format", help="jsonl, csv or parquet")] = "jsonl",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="file (default stdout)")
    ] = None,
) -> None:
    """Export PROJECT's judgments (streamed, constant memory)."""
    from app.services import export, projects

    settings = Settings()
    factory = _sessions(settings)
    try:
        with transaction(factory) as session:
            proj_id = projects.resolve(session, project).id
        chunks = export.stream(factory, proj_id, shape=shape, fmt=fmt, filters={})
        out = output.open("wb") if output else sys.stdout.buffer
        try:
            for chunk in chunks:
                out.write(chunk)
        finally:
            if output:
                out.close()
    except DomainError as exc:
        _fail(exc)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
