"""The `prefloop` command line. Each command builds its own settings and engine."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Annotated, Any, BinaryIO

import typer
from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from rich.console import Console
from rich.markup import escape
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, transaction
from app.errors import Conflict, DomainError, InvalidInput
from app.models import Job, JobState, Role
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
    """Print the error; an upload's line errors are listed one per line instead of the
    message's inline preview of the first few. Messages quote user input (file names, field
    names), so they are never read as rich markup, and a long one is not wrapped."""
    errors = exc.details.get("errors") or []
    headline = exc.message.split(". ", 1)[0] + "." if errors else exc.message
    err_console.print(f"[red]error:[/red] {escape(headline)}", soft_wrap=True)
    for item in errors:
        line = f"  line {item.get('line')}: {item.get('error')}"
        err_console.print(line, markup=False, soft_wrap=True)
    raise typer.Exit(code=1)


def _read(path: Path) -> bytes:
    """The bytes of a file named on the command line; a missing or unreadable one is an
    InvalidInput naming it (one line from `_fail`, not a traceback)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None


def _open_output(path: Path) -> BinaryIO:
    """A file named on the command line, opened for writing, or InvalidInput naming it."""
    try:
        return path.open("wb")
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from None


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
    """Create an admin with a printed random password unless an active admin exists.

    A paused admin does not count: nobody could log in as it."""
    try:
        with transaction(_sessions(Settings())) as session:
            if users.active_admins(session):
                console.print("an active admin account exists already")
                return
            password = secrets.token_urlsafe(12)
            users.create(session, username, Role.admin, password)
    except Conflict as exc:
        err_console.print(f"[red]error:[/red] there is no active admin, and {exc.message}")
        for hint in (
            f"resume it:             prefloop user resume {username}",
            f"or make it an admin:   prefloop user role {username} admin",
            "or create another one: prefloop user ensure-admin --username NEW",
        ):
            err_console.print(f"  {hint}", markup=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    console.print(f"created admin [bold]{username}[/bold] with password [bold]{password}[/bold]")


@user_cli.command("list")
def user_list() -> None:
    with transaction(_sessions(Settings())) as session:
        for u in users.list_users(session):
            state = "" if u.active else " (paused)"
            console.print(f"{u.id}\t{u.username}\t{u.role.value}{state}")


def _set_active(username: str, active: bool) -> None:
    try:
        with transaction(_sessions(Settings())) as session:
            user = users.set_active(session, users.get_by_name(session, username).id, active)
            name = user.username
    except DomainError as exc:
        _fail(exc)
    console.print(f"{'resumed' if active else 'paused'} [bold]{name}[/bold]")


@user_cli.command("pause")
def user_pause(username: str) -> None:
    """Pause USERNAME: their sessions and API tokens stop working at once.

    The last active admin cannot be paused."""
    _set_active(username, False)


@user_cli.command("resume")
def user_resume(username: str) -> None:
    """Resume a paused USERNAME (also how to get back in if every admin is paused)."""
    _set_active(username, True)


@user_cli.command("role")
def user_role(
    username: str,
    role: Annotated[Role, typer.Argument(help="admin, annotator or researcher")],
) -> None:
    """Give USERNAME another role (the last active admin cannot be demoted)."""
    try:
        with transaction(_sessions(Settings())) as session:
            user = users.set_role(session, users.get_by_name(session, username).id, role)
            name = user.username
    except DomainError as exc:
        _fail(exc)
    console.print(f"[bold]{name}[/bold] is now {role.value}")


@token_cli.command("create")
def token_create(username: str, name: str = "cli") -> None:
    """Create an API token for USERNAME and print it once."""
    try:
        with transaction(_sessions(Settings())) as session:
            token = users.create_token(session, users.get_by_name(session, username), name)
    except DomainError as exc:
        _fail(exc)
    print(token)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else "never"


@token_cli.command("list")
def token_list(
    user: Annotated[str | None, typer.Option(help="only this user's tokens")] = None,
) -> None:
    """List API tokens (never their secrets).

    Columns: id, user, name, created, last used (UTC), live or revoked."""
    try:
        with transaction(_sessions(Settings())) as session:
            owner = users.get_by_name(session, user).id if user is not None else None
            rows = [
                (t.id, t.user.username, t.name, t.created_at, t.last_used_at, t.revoked)
                for t in users.list_tokens(session, owner)
            ]
    except DomainError as exc:
        _fail(exc)
    out = ["id\tuser\tname\tcreated\tlast used\tstate"]
    for token_id, owner_name, name, created, used, revoked in rows:
        state = "revoked" if revoked else "live"
        out.append(f"{token_id}\t{owner_name}\t{name}\t{_when(created)}\t{_when(used)}\t{state}")
    # Token names are free text: printed as they are, never read as rich markup.
    console.print("\n".join(out), markup=False, highlight=False, soft_wrap=True)


@token_cli.command("revoke")
def token_revoke(token_id: int) -> None:
    """Revoke the token TOKEN_ID (see `prefloop token list`): its next request gets 401.

    Revoking it again changes nothing."""
    try:
        with transaction(_sessions(Settings())) as session:
            token, newly = users.revoke_token(session, token_id)
            label = f"token {token.id} ({token.name} of {token.user.username})"
    except DomainError as exc:
        _fail(exc)
    message = f"revoked {label}" if newly else f"{label} was already revoked"
    console.print(message, markup=False, highlight=False, soft_wrap=True)


@cli.command("serve")
def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the web app (run `prefloop db upgrade` first)."""
    from app import serving

    serving.run(host, port, workers)


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
        data = _read(file)
        with transaction(_sessions(settings)) as session:
            proj = projects.resolve(session, project)
            result = prompts.import_upload(
                session,
                proj.id,
                file.name,
                data,
                upsert=upsert,
                rng=random.Random(),
                settings=settings,
            )
    except DomainError as exc:
        _fail(exc)
    console.print(result.summary())


# --- datasets: export, snapshot, import-preferences -----------------------------------------

SinceOpt = Annotated[str | None, typer.Option(help="judged at or after (ISO date/datetime, UTC)")]
UntilOpt = Annotated[
    str | None, typer.Option(help="judged before (a bare date includes that whole day)")
]
AnnotatorOpt = Annotated[
    list[str] | None, typer.Option("--annotator", help="only this annotator; repeat for several")
]
ExcludeOpt = Annotated[
    list[str] | None, typer.Option("--exclude-annotator", help="leave out; repeat for several")
]
AgreementOpt = Annotated[
    float | None, typer.Option(help="only tasks whose judgments agree at least this much (0-1)")
]
GoldOpt = Annotated[
    float | None, typer.Option(help="only annotators at least this accurate on gold items (0-1)")
]
PausedOpt = Annotated[bool, typer.Option(help="leave out paused annotators")]
MetaOpt = Annotated[
    list[str] | None, typer.Option("--meta", help="prompt metadata key=value; repeatable")
]


def _filters(
    since: str | None,
    until: str | None,
    annotator: list[str] | None,
    exclude_annotator: list[str] | None,
    min_agreement: float | None,
    min_gold_accuracy: float | None,
    exclude_paused: bool,
    meta: list[str] | None,
) -> dict[str, object]:
    """The export filters the options name (unset ones left out)."""
    given = {
        "since": since,
        "until": until,
        "annotator": annotator,
        "exclude_annotator": exclude_annotator,
        "min_agreement": min_agreement,
        "min_gold_accuracy": min_gold_accuracy,
        "exclude_paused": exclude_paused or None,
        "meta": meta,
    }
    return {key: value for key, value in given.items() if value}


@cli.command("export")
def export_rows(
    project: str,
    shape: Annotated[str, typer.Option(help="pairs, rankings or raw")] = "pairs",
    fmt: Annotated[
        str, typer.Option("--format", help="jsonl, csv, parquet or hf (a directory)")
    ] = "jsonl",
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="file (default stdout); for hf, the directory"),
    ] = None,
    ties: Annotated[bool, typer.Option(help="pairs: keep tied pairs, flagged `tie`")] = False,
    snapshot: Annotated[
        int | None, typer.Option(help="export this snapshot of PROJECT (its filters are fixed)")
    ] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    annotator: AnnotatorOpt = None,
    exclude_annotator: ExcludeOpt = None,
    min_agreement: AgreementOpt = None,
    min_gold_accuracy: GoldOpt = None,
    exclude_paused: PausedOpt = False,
    meta: MetaOpt = None,
) -> None:
    """Export PROJECT's judgments (streamed, constant memory)."""
    from app.services import export, projects, snapshots

    settings = Settings()
    factory = _sessions(settings)
    filters = _filters(
        since,
        until,
        annotator,
        exclude_annotator,
        min_agreement,
        min_gold_accuracy,
        exclude_paused,
        meta,
    )
    try:
        with transaction(factory) as session:
            proj_id = projects.resolve(session, project).id
            selection = None
            if snapshot is not None:
                frozen = snapshots.get(session, snapshot)
                if frozen.project_id != proj_id:
                    raise InvalidInput(
                        f"snapshot {snapshot} belongs to project {frozen.project_id}"
                    )
                if filters:
                    raise InvalidInput(
                        "a snapshot's filters are fixed; leave the filter options out"
                    )
                selection = snapshots.selection(frozen)
            elif fmt != "hf":
                selection = export.resolve(session, proj_id, export.parse_filters(filters))
        if fmt == "hf":
            if output is None:
                raise InvalidInput("--format hf writes a directory: name it with -o DIR")
            try:
                count = export.save_to_disk(
                    factory,
                    proj_id,
                    output,
                    shape=shape,
                    filters=filters,
                    selection=selection,
                    ties=ties,
                )
            except OSError as exc:
                raise InvalidInput(f"cannot write {output}/: {exc.strerror or exc}") from None
            err_console.print(f"wrote {count} rows to {output}/ (datasets.load_from_disk opens it)")
            return
        assert selection is not None
        name = export.filename(proj_id, shape, fmt)
        chunks = export.stream_selection(
            factory, proj_id, selection, shape=shape, fmt=fmt, name=name, ties=ties
        )
        out = _open_output(output) if output else sys.stdout.buffer
        try:
            for chunk in chunks:
                out.write(chunk)
        finally:
            if output:
                out.close()
    except DomainError as exc:
        _fail(exc)


@cli.command("snapshot")
def snapshot_create(
    project: str,
    since: SinceOpt = None,
    until: UntilOpt = None,
    annotator: AnnotatorOpt = None,
    exclude_annotator: ExcludeOpt = None,
    min_agreement: AgreementOpt = None,
    min_gold_accuracy: GoldOpt = None,
    exclude_paused: PausedOpt = False,
    meta: MetaOpt = None,
) -> None:
    """Freeze PROJECT's judgments (filtered) into an immutable snapshot; prints its id."""
    from app.services import projects, snapshots

    filters = _filters(
        since,
        until,
        annotator,
        exclude_annotator,
        min_agreement,
        min_gold_accuracy,
        exclude_paused,
        meta,
    )
    try:
        with transaction(_sessions(Settings())) as session:
            proj_id = projects.resolve(session, project).id
            info = snapshots.describe(snapshots.create(session, proj_id, filters, created_by=None))
    except DomainError as exc:
        _fail(exc)
    console.print(
        f"snapshot [bold]{info['id']}[/bold]: {info['row_count']} pairs, judgments up to id "
        f"{info['max_judgment_id']}, sha256 {info['sha256']}"
    )


@cli.command("import-preferences")
def import_preferences(
    project: str,
    file: Path,
    annotator: Annotated[str, typer.Option(help="the external annotator's username")],
) -> None:
    """Import prompt/chosen/rejected rows (JSONL or Parquet, e.g. HH-RLHF) into PROJECT as
    judgments of ANNOTATOR (created without a password if missing), all or nothing."""
    from app.services import preference_import, projects

    settings = Settings()
    try:
        data = _read(file)
        with transaction(_sessions(settings)) as session:
            proj = projects.resolve(session, project)
            result = preference_import.import_file(
                session,
                proj.id,
                file.name,
                data,
                annotator=annotator,
                settings=settings,
            )
    except DomainError as exc:
        _fail(exc)
    console.print(result.summary())


# --- jobs and models: worker, train, models, score ------------------------------------------

train_cli = typer.Typer(help="Queue (and optionally run) training jobs.", no_args_is_help=True)
cli.add_typer(train_cli, name="train")


def _exec_worker(args: list[str]) -> None:
    """Become the worker process (`python -m worker.main ARGS`).

    The web package never imports worker code (it pulls in torch), so the CLI hands over to
    the worker module by exec: same process id, so SIGTERM from a supervisor or Ctrl-C from
    a terminal reaches the worker's own handlers directly.
    """
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "worker.main", *args])


@cli.command("worker")
def worker(
    once: Annotated[bool, typer.Option(help="run at most one job, then exit")] = False,
    poll_interval: Annotated[float, typer.Option(help="seconds between queue polls")] = 2.0,
    kind: Annotated[list[str] | None, typer.Option(help="only claim these job kinds")] = None,
    progress_bar: Annotated[
        bool, typer.Option(help="draw a progress bar of the running job (on a terminal)")
    ] = False,
) -> None:
    """Claim and run queued jobs until SIGTERM/SIGINT (then finish the step and requeue)."""
    args = ["--poll-interval", str(poll_interval)]
    if once:
        args.append("--once")
    for name in kind or []:
        args += ["--kind", name]
    if progress_bar:
        args.append("--progress-bar")
    _exec_worker(args)


def _param(raw: str) -> tuple[str, object]:
    """`key=value`, the value read as JSON when it parses (numbers, booleans) else as text."""
    import json

    key, sep, value = raw.partition("=")
    if not sep or not key:
        raise typer.BadParameter(f"expected key=value, got {raw!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


@train_cli.command("reward")
def train_reward(
    project: str,
    epochs: Annotated[int | None, typer.Option(help="passes over the judgments")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="judgments per micro-batch")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="minilm (default), smollm2, a directory or a model id")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="any trainer field: key=value")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            help="follow the job until it ends, with a progress bar: run it here, or watch "
            "the worker that took it"
        ),
    ] = False,
) -> None:
    """Queue a reward-model training job for PROJECT (id or name) on all its judgments so far.

    With --wait: exit 0 when the job succeeds (printing the model version and its held-out
    accuracy), 1 when it fails or is cancelled, 130 on Ctrl-C, which stops following but
    never cancels the job."""
    from app.services import jobs

    params: dict[str, object] = dict(_param(p) for p in param or [])
    for key, value in (
        ("epochs", epochs),
        ("lr", lr),
        ("batch_size", batch_size),
        ("backbone", backbone),
    ):
        if value is not None:
            params[key] = value
    _queue(project, jobs.REWARD, params, wait)


def _queue(project: str, kind: str, params: dict[str, object], wait: bool) -> None:
    """Queue a `kind` job for PROJECT (checked as the API checks it); with `wait`, follow it."""
    from app.services import jobs, projects

    settings = Settings()
    factory = _sessions(settings)
    try:
        with transaction(factory) as session:
            proj = projects.resolve(session, project)
            job_id = jobs.enqueue(session, proj.id, kind, params, None).id
    except DomainError as exc:
        _fail(exc)
    console.print(f"queued {kind} job [bold]{job_id}[/bold]")
    if wait:
        raise typer.Exit(code=_wait_for_job(factory, job_id))


_WAIT_HELP = (
    "follow the job until it ends, with a progress bar: run it here, or watch the worker "
    "that took it"
)


@train_cli.command("ppo")
def train_ppo(
    project: str,
    steps: Annotated[int | None, typer.Option(help="PPO steps (total_steps)")] = None,
    reward_model: Annotated[
        int | None, typer.Option(help="reward model id (default: the project's newest)")
    ] = None,
    parent: Annotated[
        int | None,
        typer.Option(help="policy to start from (default: the newest that held up)"),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="any PPO field: key=value")
    ] = None,
    wait: Annotated[bool, typer.Option(help=_WAIT_HELP)] = False,
) -> None:
    """Queue a PPO job for PROJECT (id or name): optimise a policy against a reward model.

    With --wait: exit 0 when the job succeeds (printing the new policy and its reward and
    KL at the kept step), 1 when it fails or is cancelled, 130 on Ctrl-C."""
    from app.services import jobs

    params: dict[str, object] = dict(_param(p) for p in param or [])
    for key, value in (
        ("total_steps", steps),
        ("reward_model_id", reward_model),
        ("parent_policy_id", parent),
    ):
        if value is not None:
            params[key] = value
    _queue(project, jobs.PPO, params, wait)


@train_cli.command("generate")
def train_generate(
    project: str,
    policy: Annotated[
        int | None, typer.Option(help="policy model id (default: the packaged SmolLM2)")
    ] = None,
    prompts: Annotated[str | None, typer.Option(help="waiting (default), all or heldout")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="any generation field: key=value")
    ] = None,
    wait: Annotated[bool, typer.Option(help=_WAIT_HELP)] = False,
) -> None:
    """Queue a generate job for PROJECT (id or name): sample answers, queue them to label."""
    from app.services import jobs

    params: dict[str, object] = dict(_param(p) for p in param or [])
    for key, value in (("policy_id", policy), ("prompts", prompts)):
        if value is not None:
            params[key] = value
    _queue(project, jobs.GENERATE, params, wait)


# --- train reward --wait: follow a job to its end, whoever runs it ----------------------------

WAIT_POLL_S = 1.0
"""How often --wait reads the job row while another worker runs the job."""
INTERRUPTED = 130
"""The exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it."""


def _job_row(factory: sessionmaker[Session], job_id: int) -> Job:
    """The job as it is now, read in its own short transaction (a detached row)."""
    from app.db import read_only
    from app.services import jobs

    with transaction(factory) as session:
        return jobs.get(read_only(session), job_id)


def _wait_for_job(factory: sessionmaker[Session], job_id: int) -> int:
    """Follow job `job_id` until it succeeds, fails or is cancelled; the exit code.

    While the job is queued, a worker subprocess (`python -m worker.main --job ID
    --progress-bar`) tries to claim it and run it here. A `prefloop worker` that is running
    polls every two seconds and often takes the job first (the subprocess needs seconds to
    import torch): then the job row is followed instead, its progress (step, total_steps,
    loss, eta_s, heartbeated by that worker) drawn as the same kind of bar. A job requeued
    for a retry is followed through the retry, wherever it runs. Ctrl-C or SIGTERM stop the
    following, not the job: one running here is handed back to the queue after its step.
    """
    import signal
    import threading

    from app.services import jobs

    # SIGTERM ends the wait as Ctrl-C does (handlers can only be set on the main thread).
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if on_main else None
    try:
        while True:
            job = _job_row(factory, job_id)
            if job.state in jobs.FINAL_STATES:
                return _report_end(job)
            if job.state is JobState.running:
                _follow(factory, job)
                continue
            code, ours = _run_here(job_id)
            after = _job_row(factory, job_id)
            if after.state is JobState.queued and after.started_at == job.started_at:
                err_console.print(
                    f"[red]error:[/red] the worker process exited with code {code} without "
                    f"taking job {job_id}; the job is still queued"
                )
                return 1
            if after.state is JobState.running and after.worker_id == ours:  # it died with it
                how = f"was killed (signal {-code})" if code < 0 else f"exited with code {code}"
                err_console.print(
                    f"[red]error:[/red] the worker process {how} while running job {job_id}; "
                    "a running worker requeues the job once its heartbeat is stale"
                )
                return 1
    except KeyboardInterrupt:
        return _interrupted(factory, job_id)
    except DomainError as exc:  # the job is gone (its project was deleted)
        _fail(exc)
        raise  # unreachable: _fail exits
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)


def _run_here(job_id: int) -> tuple[int, str]:
    """Run the job in a worker subprocess, if it can claim it; (exit code, its worker id).

    The web package never imports worker code, hence the subprocess. Its log comes through
    this process, less the "job N is not queued" line, which is no error here: another worker
    took the job, and it is followed instead. (A piped stderr also keeps the trainer's own
    tqdm bar, drawn only on a terminal, out of the worker's rich bar.) Ctrl-C reaches the
    subprocess too; it finishes its step and requeues the job, and is waited for.
    """
    import signal
    import socket
    import subprocess
    import threading

    child = subprocess.Popen(
        [sys.executable, "-m", "worker.main", "--job", str(job_id), "--progress-bar"],
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    assert child.stderr is not None
    relay = threading.Thread(
        target=_relay, args=(child.stderr, f"job {job_id} is not queued"), daemon=True
    )
    relay.start()
    try:
        code = child.wait()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C went to the subprocess as well; a SIGTERM or a kill of this
        # process alone did not: pass it on (a second SIGINT only repeats the request).
        child.send_signal(signal.SIGINT)
        err_console.print("stopping: the worker finishes its current step and requeues the job")
        while child.returncode is None:
            try:
                child.wait()
            except KeyboardInterrupt:
                continue
        relay.join()
        raise
    relay.join()
    # worker.main names itself host:pid (worker.main.worker_id).
    return code, f"{socket.gethostname()}:{child.pid}"


def _relay(stream: IO[str], drop: str) -> None:
    for line in stream:
        if drop not in line:
            sys.stderr.write(line)
            sys.stderr.flush()


def _follow(factory: sessionmaker[Session], job: Job) -> None:
    """Draw the progress of a job another worker runs until it stops running (it ended, or
    went back to the queue)."""
    import time

    console.print(
        f"job {job.id} is running on worker {job.worker_id}; following it "
        "(Ctrl-C stops following, not the job)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    with _job_bar() as show:
        while job.state is JobState.running:
            show(job.progress or {}, None)
            time.sleep(WAIT_POLL_S)
            job = _job_row(factory, job.id)
        show(job.progress or {}, job.state.value)


@contextmanager
def _job_bar() -> Iterator[Callable[[dict[str, Any], str | None], None]]:
    """A rich progress bar (as the worker's own) fed with a job row's progress: its stage,
    step of total_steps, loss and ETA. Yields show(progress, stage)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from app.services import jobs

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eta {task.fields[eta]}"),
        console=console,
    )
    task = bar.add_task("running", total=None, loss="-", eta="-")

    def show(progress: dict[str, Any], stage: str | None) -> None:
        fields: dict[str, Any] = {
            "description": escape(stage or str(progress.get("stage") or "running")),
            "eta": jobs.eta_text(progress) or "-",
        }
        total, step, loss = progress.get("total_steps"), progress.get("step"), progress.get("loss")
        if isinstance(total, int) and total > 0:
            fields["total"] = total
        if isinstance(step, int):
            fields["completed"] = step
        if isinstance(loss, float):
            fields["loss"] = f"{loss:.4f}"
        bar.update(task, **fields)

    bar.start()
    try:
        yield show
    finally:
        bar.stop()


def _report_end(job: Job) -> int:
    """Say how the job ended; 0 when it succeeded, else 1."""
    if job.state is JobState.succeeded and job.kind != "reward":
        metrics = job.metrics or {}
        if job.kind == "ppo":
            numbers = ", ".join(
                f"{label} {metrics[key]:.4f}"
                for key, label in (("reward_mean", "reward"), ("kl", "KL"))
                if isinstance(metrics.get(key), int | float)
            )
            line = (
                f"job {job.id} succeeded: policy model {metrics.get('model_version_id')}, "
                f"kept step {metrics.get('best_step')} of {metrics.get('steps')}"
                + (f" ({numbers})" if numbers else "")
            )
        else:
            line = (
                f"job {job.id} succeeded: {metrics.get('completions_stored')} answers stored, "
                f"{metrics.get('tasks_created')} tasks to label"
            )
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        return 0
    if job.state is JobState.succeeded:
        metrics = job.metrics or {}
        held_out = metrics.get("eval") or {}
        accuracy, pairs = held_out.get("accuracy"), held_out.get("pairs")
        if isinstance(accuracy, int | float) and not isinstance(accuracy, bool):
            scored = f"held-out accuracy {accuracy:.3f} on {pairs} pairs"
        else:
            scored = "no held-out accuracy (no held-out pairs)"
        line = f"job {job.id} succeeded: reward model {metrics.get('model_version_id')}, {scored}"
        partner = metrics.get("heldout_model_version_id")
        if partner is not None:
            line += f"; held-out partner model {partner}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        return 0
    if job.state is JobState.failed:
        reason = (job.error or "no error recorded").split("\n\n", 1)[0].strip()
        err_console.print(
            f"[red]error:[/red] job {job.id} failed after {job.attempts} attempt(s): "
            f"{escape(reason)}",
            soft_wrap=True,
        )
        return 1
    err_console.print(f"[red]error:[/red] job {job.id} was cancelled")
    return 1


def _interrupted(factory: sessionmaker[Session], job_id: int) -> int:
    """After Ctrl-C: where the job is now, and how to cancel it (there is no CLI command)."""
    from app.services import jobs

    job = _job_row(factory, job_id)
    if job.state in jobs.FINAL_STATES:
        _report_end(job)
        return INTERRUPTED
    if job.state is JobState.queued:
        where = "is queued; the next worker to poll (`prefloop worker`) runs it"
    else:
        where = f"keeps running in the background on worker {job.worker_id}"
    for line in (
        f"interrupted: stopped waiting for job {job_id}, which {where}.",
        f"To cancel it, press Cancel on its page (/jobs/{job_id}) or, with an admin's API "
        "token (`prefloop token create ADMIN`):",
        f"  curl -X POST -H 'Authorization: Bearer TOKEN' "
        f"http://127.0.0.1:8000/api/v1/jobs/{job_id}/cancel",
    ):
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    return INTERRUPTED


@cli.command("models")
def list_models(
    project: Annotated[str | None, typer.Option(help="only this project (id or name)")] = None,
) -> None:
    """Model versions, newest first, with their held-out metrics."""
    from rich.table import Table

    from app.db import read_only
    from app.services import model_registry, projects

    table = Table(
        "id", "kind", "project", "job", "eval acc", "eval loss", "steps", "created", "artifact"
    )
    try:
        with transaction(_sessions(Settings())) as session:
            read_only(session)
            project_id = projects.resolve(session, project).id if project else None
            for m in model_registry.list_models(session, project_id=project_id):
                held_out = m.metrics.get("eval") or {}
                acc, loss = held_out.get("accuracy"), held_out.get("loss")
                table.add_row(
                    str(m.id),
                    m.kind.value,
                    str(m.project_id or ""),
                    str(m.job_id or ""),
                    f"{acc:.3f}" if isinstance(acc, float) else "",
                    f"{loss:.4f}" if isinstance(loss, float) else "",
                    str(m.metrics.get("total_steps", "")),
                    m.created_at.strftime("%Y-%m-%d %H:%M"),
                    m.artifact_path,
                )
    except DomainError as exc:
        _fail(exc)
    console.print(table)


@cli.command("score")
def score_completions(
    model_id: int,
    prompt: Annotated[str, typer.Option(help="the prompt the completions answer")],
    completion: Annotated[
        list[str], typer.Option("--completion", "-c", help="repeat per completion")
    ],
) -> None:
    """Score completions with reward model MODEL_ID (higher is preferred)."""
    from rich.table import Table

    from app.db import read_only
    from app.services import model_registry

    try:
        with transaction(_sessions(Settings())) as session:
            directory = model_registry.scorable_dir(read_only(session), model_id)
        scores = model_registry.score_dir(directory, prompt, completion)
    except DomainError as exc:
        _fail(exc)
    table = Table("#", "score", "completion")
    for i, (value, text) in enumerate(zip(scores, completion, strict=True), start=1):
        table.add_row(str(i), f"{value:.4f}", text if len(text) <= 80 else text[:77] + "...")
    console.print(table)


@cli.command("demo")
def demo(
    simulate: Annotated[
        int, typer.Option(help="run N simulated annotators that label through the HTTP API")
    ] = 0,
    iterations: Annotated[
        int | None,
        typer.Option(help="exit after this many loop iterations (default: serve until Ctrl-C)"),
    ] = None,
    reset: Annotated[
        bool, typer.Option(help="start a new demo project (the old one is renamed and kept)")
    ] = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    threads: Annotated[
        int | None, typer.Option(help="torch threads for the worker (default: all cores)")
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            help="job sizes: cpu (a laptop CPU, about 10 min an iteration) or tiny (tests)"
        ),
    ] = "cpu",
    policy: Annotated[
        Path | None,
        typer.Option(help="start from this save_pretrained policy (default: packaged SmolLM2)"),
    ] = None,
    reward_backbone: Annotated[
        str | None, typer.Option(help="reward model backbone (default: packaged MiniLM)")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="give up (exit 1) after this many seconds")
    ] = None,
    seed: int = 0,
) -> None:
    """Set up a demo project from bundled prompts, start the web app and the worker, and print
    the URL and credentials; with --simulate N, watch a full RLHF iteration run by itself."""
    from app.demo import run as demo_run
    from app.demo import setup as demo_setup

    if preset not in demo_setup.PRESETS:
        raise typer.BadParameter(
            f"unknown preset {preset!r}; known: {', '.join(demo_setup.PRESETS)}",
            param_hint="--preset",
        )
    if policy is not None and not policy.is_dir():
        raise typer.BadParameter(f"{policy} is not a directory", param_hint="--policy")
    config = demo_setup.DemoConfig(
        preset=preset,
        policy_dir=policy.resolve() if policy else None,
        reward_backbone=reward_backbone,
        seed=seed,
    )
    options = demo_run.Options(
        simulate=simulate,
        iterations=iterations,
        host=host,
        port=port,
        threads=threads,
        reset=reset,
        timeout_s=timeout,
    )
    raise typer.Exit(code=demo_run.run(Settings(), config, options, console))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
