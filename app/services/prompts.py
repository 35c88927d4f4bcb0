"""Importing prompt sets (JSONL, CSV, Parquet) and creating the tasks their completions make.

An import is all or nothing: every row is parsed and checked first, every problem is
collected with its line number, and only a file with no problem writes anything. Writing
uses bulk INSERTs (a handful of statements for any number of rows), so 10,000 rows import in
seconds.

Row format (DESIGN.md): ``{"id": "...", "prompt": "..." | "messages": [{"role", "content"}],
"completions": ["...", ...] (optional), "metadata": {...}, "gold": ... (optional)}``. A row
with ``gold`` becomes a gold task over exactly its completions, in order (app.services.gold):
``0``, ``1`` or ``"tie"`` for a pair; index groups best first (``[2, [0, 1], 3]``, possibly
only the top group) for a ranking, whose row then has exactly K completions. Errors use line 0 for problems
with the whole file; for Parquet, "line" is the 1-based row number.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Enum,
    String,
    Text,
    bindparam,
    cast,
    func,
    insert,
    null,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from app.domain import gold as gold_answers
from app.domain import pairing
from app.errors import InvalidUpload, UploadTooLarge
from app.models import (
    Base,
    Completion,
    Judgment,
    Lease,
    Project,
    ProjectMode,
    Prompt,
    Task,
    TaskState,
    utcnow,
)
from app.services import gold, projects
from app.settings import Settings

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")
FIELDS = ("id", "prompt", "messages", "completions", "metadata", "gold")
EXTERNAL_ID_MAX = 255
MAX_ERRORS = 1000  # returned in full; past this, only counted
ERRORS_IN_MESSAGE = 5
QUERY_CHUNK = 500  # ids per IN (...) list
INSERT_CHUNK = 10_000  # rows per INSERT … SELECT FROM unnest(…) on Postgres
COMPLETION_COLUMN = re.compile(r"completion_(\d+)")

T = TypeVar("T")


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote."""

    prompts_created: int
    prompts_updated: int
    completions_created: int
    tasks_created: int
    rows: int
    gold_tasks: int = 0
    """Of `tasks_created`, how many are gold (or existing tasks made gold)."""
    notes: tuple[str, ...] = ()
    """What the admin should know about what was written (nothing was refused for it)."""

    def summary(self) -> str:
        gold_part = f" ({self.gold_tasks} gold)" if self.gold_tasks else ""
        notes = "".join(f". {note}" for note in self.notes)
        return (
            f"{self.rows} rows: {self.prompts_created} prompts created, "
            f"{self.prompts_updated} updated, {self.completions_created} completions added, "
            f"{self.tasks_created} tasks created{gold_part}{notes}"
        )


@dataclass(frozen=True)
class Row:
    """One valid row of an upload."""

    line: int
    external_id: str
    text: str | None
    messages: list[dict[str, str]] | None
    completions: tuple[str, ...]
    metadata: dict[str, Any] | None
    """None when the row has none (or null): a new prompt gets ``{}``, an upserted one keeps
    what is stored."""
    gold: Any = None
    """The known answer as uploaded (indices into `completions`), or None."""


@dataclass
class Problems:
    """Every error found, in the order found; only the first MAX_ERRORS are kept."""

    items: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0

    def add(self, line: int, error: str) -> None:
        self.total += 1
        if len(self.items) < MAX_ERRORS:
            self.items.append({"line": line, "error": error})

    def __bool__(self) -> bool:
        return self.total > 0


def import_upload(
    session: Session,
    project_id: int,
    filename: str,
    data: bytes,
    *,
    upsert: bool,
    rng: random.Random,
    settings: Settings,
) -> ImportResult:
    """Check the whole file, then import it: prompts, their completions, and their tasks.

    Raises UploadTooLarge past ``settings.max_upload_bytes`` and InvalidUpload listing every
    bad line. An id already in the project is an error unless `upsert`, which adds the
    row's completions whose texts are new and replaces the stored prompt's text (or
    messages) and metadata with the row's; a row without metadata keeps the stored one.
    Nothing is deleted and no completion's text changes. What annotators judged never
    changes either (see `_plan_updates`): a row that would change a judged prompt's text or
    metadata, or the text of a prompt handed to an annotator, is a bad line like any other.
    """
    project = projects.get(session, project_id)
    if len(data) > settings.max_upload_bytes:
        raise UploadTooLarge(
            f"{filename or 'the file'} is larger than the limit of "
            f"{settings.max_upload_bytes:,} bytes (split the file and upload the parts)"
        )
    problems = Problems()
    rows = parse(filename, data, problems)

    _check_gold_rows(project, rows, problems)
    existing = _existing_prompt_ids(session, project.id, [row.external_id for row in rows])
    if existing and not upsert:
        for row in rows:
            if row.external_id in existing:
                problems.add(
                    row.line,
                    f"id {row.external_id!r} already exists in this project "
                    "(upload with upsert to update it)",
                )
    new_rows = [row for row in rows if row.external_id not in existing]
    updated_rows = [row for row in rows if row.external_id in existing]
    updates = _plan_updates(session, existing, updated_rows, problems) if upsert else {}
    if problems:
        raise invalid_upload(filename, problems)

    prompt_ids = _insert_prompts(session, project.id, new_rows)
    _update_prompts(session, updates)
    prompt_ids.update({row.external_id: existing[row.external_id] for row in updated_rows})

    completions_created, new_completion_ids = _add_completions(session, rows, prompt_ids)
    gold_rows = [row for row in rows if row.gold is not None]
    gold_prompts = {prompt_ids[row.external_id] for row in gold_rows}
    tasks_created, unranked = _add_tasks(
        session,
        project,
        {pid: ids for pid, ids in new_completion_ids.items() if pid not in gold_prompts},
        set(existing.values()),
        settings.max_pairs_per_prompt,
        rng,
    )
    gold_created = gold.add_tasks(session, project, _gold_specs(session, gold_rows, prompt_ids))
    notes = []
    if unranked:
        notes.append(
            f"{unranked} completions are in no task: a ranking task shows "
            f"{project.candidates_per_task} of a prompt's completions"
        )
    if gold_created and not project.gold_rate:
        notes.append(
            "The project's gold rate is 0, so gold items are not served: "
            "set it in the project's settings"
        )
    return ImportResult(
        prompts_created=len(new_rows),
        prompts_updated=len(updated_rows),
        completions_created=completions_created,
        tasks_created=tasks_created + gold_created,
        rows=len(rows),
        gold_tasks=gold_created,
        notes=tuple(notes),
    )


# --- parsing and validation (no database) -------------------------------------------------


def parse(filename: str, data: bytes, problems: Problems) -> list[Row]:
    """Parse and check every row of the file; problems go into `problems`, valid rows out."""
    fmt = FORMATS.get(PurePath(filename or "").suffix.lower())
    if fmt is None:
        problems.add(
            0, f"unsupported file type {filename!r}: upload .jsonl, .json, .csv or .parquet"
        )
        return []
    if fmt != "parquet":
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            problems.add(0, "wrong encoding: the file is UTF-16; save it as UTF-8 (required)")
            return []
        data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark, as Excel writes
        if not data.strip():
            problems.add(0, "the file is empty")
            return []
    records = {"jsonl": jsonl_records, "csv": _csv_records, "parquet": _parquet_records}[fmt]
    rows: list[Row] = []
    first_line: dict[str, int] = {}
    seen_any = False
    for line, record in records(data, problems):
        seen_any = True
        row = validate(record, line, problems)
        if row is None:
            continue
        if row.external_id in first_line:
            problems.add(
                line,
                f"duplicate id {row.external_id!r} (first on line {first_line[row.external_id]})",
            )
            continue
        first_line[row.external_id] = line
        rows.append(row)
    if not seen_any and not problems:
        problems.add(0, "the file has no rows")
    return rows


def validate(record: dict[str, Any], line: int, problems: Problems) -> Row | None:
    """Check one row (a dict in the JSONL shape); add each problem found, return the row if none."""
    before = problems.total

    def bad(error: str) -> None:
        problems.add(line, error)

    unknown = sorted(str(key) for key in record if key not in FIELDS)
    if unknown:
        bad(f"unknown field(s) {', '.join(map(repr, unknown))}; put extra data under 'metadata'")

    raw_id = record.get("id")
    external_id: str | None = None
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        bad("missing id")
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        bad(f"id must be a string, not {_type_name(raw_id)}")
    else:
        external_id = str(raw_id)
        if len(external_id) > EXTERNAL_ID_MAX:
            bad(f"id is longer than {EXTERNAL_ID_MAX} characters")
        elif not _storable(external_id):
            bad("id contains a NUL character or invalid Unicode")

    text = record.get("prompt")
    messages = record.get("messages")
    if text is not None and messages is not None:
        bad("both prompt and messages given; a row has one or the other")
    elif text is None and messages is None:
        bad("missing prompt (or messages)")
    elif text is not None:
        if not isinstance(text, str):
            bad(f"prompt must be a string, not {_type_name(text)}")
        elif not text.strip():
            bad("prompt is empty")
        elif not _storable(text):
            bad("prompt contains a NUL character or invalid Unicode")
    else:
        for error in _message_errors(messages):
            bad(error)

    completions = record.get("completions")
    if completions is None:
        completions = []
    if not isinstance(completions, list):
        bad(f"completions must be a list of strings, not {_type_name(completions)}")
        completions = []
    else:
        for error in _completion_errors(completions):
            bad(error)

    metadata = record.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        bad(f"metadata must be an object, not {_type_name(metadata)}")
    elif metadata is not None and not _json_ok(metadata):
        bad("metadata cannot be stored as JSON (NaN, Infinity, invalid Unicode or non-JSON values)")

    raw_gold = record.get("gold")
    if raw_gold is not None and isinstance(completions, list):
        if len(completions) < 2:
            bad("a gold row needs its completions (the known answer is about them)")
        else:
            try:
                gold_answers.answer_from_indices(raw_gold, list(range(len(completions))))
            except gold_answers.GoldError as exc:
                bad(f"gold: {exc}")

    if problems.total > before or external_id is None:
        return None
    return Row(
        line=line,
        external_id=external_id,
        text=text,
        messages=[{"role": m["role"], "content": m["content"]} for m in messages]
        if messages
        else None,
        completions=tuple(completions),
        metadata=metadata,
        gold=raw_gold,
    )


def _message_errors(messages: Any) -> Iterator[str]:
    if not isinstance(messages, list) or not messages:
        yield "messages must be a non-empty list of {role, content} objects"
        return
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            yield f"message {n} must be an object with role and content"
            continue
        extra = sorted(str(key) for key in message if key not in ("role", "content"))
        if extra:
            yield f"message {n} has unknown key(s) {', '.join(map(repr, extra))}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            yield f"message {n} role must be one of {', '.join(ROLES)}, not {role!r}"
        if not isinstance(content, str):
            yield f"message {n} content must be a string"
        elif not _storable(content):
            yield f"message {n} content contains a NUL character or invalid Unicode"


def _completion_errors(completions: list[Any]) -> Iterator[str]:
    if len(completions) == 1:
        yield "fewer than 2 completions: give 2 or more, or none to wait for generated ones"
    first_seen: dict[str, int] = {}
    for n, body in enumerate(completions, 1):
        if not isinstance(body, str):
            yield f"completion {n} must be a string, not {_type_name(body)}"
        elif not body.strip():
            yield f"completion {n} is empty"
        elif not _storable(body):
            yield f"completion {n} contains a NUL character or invalid Unicode"
        elif body in first_seen:
            yield f"completion {n} duplicates completion {first_seen[body]} (same text)"
        else:
            first_seen[body] = n


def jsonl_records(data: bytes, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSON Lines: one object per line; blank lines are skipped."""
    if data.lstrip().startswith(b"["):
        try:
            whole = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = None
        if isinstance(whole, list):
            problems.add(0, "the file is one JSON array; upload JSON Lines: one object per line")
            return
    for line, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(line, _encoding_error(raw, exc))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(line, f"bad JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(value, dict):
            hint = (
                "; the file must be JSON Lines, one object per line"
                if isinstance(value, list)
                else ""
            )
            problems.add(
                line,
                f"not an object: each line must be a JSON object, not {_type_name(value)}{hint}",
            )
            continue
        yield line, value


def _csv_records(data: bytes, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    """CSV with a header row; a record's line is the physical line it starts on."""
    for line, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(line, _encoding_error(raw, exc))
    text = data.decode("utf-8", errors="replace")  # keep checking the other rows
    _allow_long_csv_fields(len(data))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        return
    except csv.Error as exc:
        problems.add(1, f"bad CSV header: {exc}")
        return
    if not _columns_ok(header, 1, problems, "column"):
        return
    previous = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            problems.add(previous + 1, f"bad CSV: {exc}")
            return
        line, previous = previous + 1, reader.line_num
        if not any(value.strip() for value in fields):
            continue
        if len(fields) > len(header):
            problems.add(line, f"{len(fields)} fields but the header has {len(header)} columns")
            continue
        fields += [""] * (len(header) - len(fields))
        record = _from_columns(dict(zip(header, fields, strict=True)), line, problems)
        if record is not None:
            yield line, record


def _parquet_records(data: bytes, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    """Parquet with the JSONL keys as columns (nested or as JSON strings); "line" = row number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not data:
        problems.add(0, "the file is empty")
        return
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        problems.add(0, f"not a readable Parquet file: {exc}")
        return
    names = [name.strip().lower() for name in table.column_names]
    if not _columns_ok(names, 0, problems, "column"):
        return
    table = table.rename_columns(names)
    line = 0
    for batch in table.to_batches(max_chunksize=2048):
        for values in batch.to_pylist():
            line += 1
            record = _from_columns(values, line, problems)
            if record is not None:
                yield line, record


def _columns_ok(names: list[str], line: int, problems: Problems, what: str) -> bool:
    """Check a CSV header or Parquet schema; a bad one makes every row's errors noise."""
    ok = True
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.add(line, f"duplicate {what}(s): {', '.join(duplicates)}")
        ok = False
    unknown = [n for n in names if n not in FIELDS and not COMPLETION_COLUMN.fullmatch(n)]
    if unknown:
        allowed = "id, prompt, messages, completions or completion_1..completion_n, metadata, gold"
        problems.add(line, f"unknown {what}(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
        ok = False
    if "id" not in names:
        problems.add(line, f"missing {what} 'id'")
        ok = False
    if "prompt" not in names and "messages" not in names:
        problems.add(line, f"missing {what} 'prompt' (or 'messages')")
        ok = False
    if "completions" in names and any(COMPLETION_COLUMN.fullmatch(n) for n in names):
        problems.add(
            line, f"use either a 'completions' {what} or completion_1..completion_n, not both"
        )
        ok = False
    return ok


def _from_columns(values: dict[str, Any], line: int, problems: Problems) -> dict[str, Any] | None:
    """A CSV/Parquet record in the JSONL shape: JSON-string cells decoded, blanks dropped."""
    record: dict[str, Any] = {}
    numbered: list[tuple[int, Any]] = []
    ok = True
    for name, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip() and name != "id"):
            continue
        match = COMPLETION_COLUMN.fullmatch(name)
        if match:
            numbered.append((int(match.group(1)), value))
        elif name == "gold" and isinstance(value, str) and value.strip().lower() == "tie":
            record[name] = "tie"  # the one gold answer that is not JSON in a CSV cell
        elif name in ("completions", "messages", "metadata", "gold") and isinstance(value, str):
            try:
                record[name] = json.loads(value)
            except json.JSONDecodeError as exc:
                problems.add(line, f"{name}: bad JSON: {exc.msg} (column {exc.colno})")
                ok = False
        else:
            record[name] = value
    if numbered:
        record["completions"] = [value for _, value in sorted(numbered, key=lambda item: item[0])]
    return record if ok else None


def _allow_long_csv_fields(size: int) -> None:
    """Raise the csv module's 128 KiB field limit (process-wide, only ever upwards): a long
    completion is a legitimate cell, and the upload size limit already bounds it."""
    if csv.field_size_limit() < size:
        csv.field_size_limit(size)


def _encoding_error(raw: bytes, exc: UnicodeDecodeError) -> str:
    return (
        f"wrong encoding: byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not valid "
        "UTF-8; the file must be UTF-8"
    )


def _storable(text: str) -> bool:
    """Postgres text cannot hold NUL, and lone surrogates (from JSON escapes) cannot be encoded."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError):
        return False
    return True


def _type_name(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def invalid_upload(filename: str, problems: Problems) -> InvalidUpload:
    problems.items.sort(key=lambda item: item["line"])
    shown = "; ".join(f"line {p['line']}: {p['error']}" for p in problems.items[:ERRORS_IN_MESSAGE])
    more = problems.total - min(ERRORS_IN_MESSAGE, len(problems.items))
    listed = (
        f" (the first {len(problems.items)} are listed)"
        if problems.total > len(problems.items)
        else ""
    )
    message = (
        f"{filename or 'the file'}: {problems.total} problem(s), nothing was imported{listed}. "
        f"{shown}" + (f"; and {more} more" if more > 0 else "")
    )
    return InvalidUpload(message, problems.items)


def _check_gold_rows(project: Project, rows: list[Row], problems: Problems) -> None:
    """A gold task is exactly its row's completions, so their number must suit the project."""
    want = 2 if project.mode is ProjectMode.pairwise else project.candidates_per_task
    for row in rows:
        if row.gold is not None and len(row.completions) != want:
            problems.add(
                row.line,
                f"a gold row needs exactly {want} completions in this {project.mode.value} "
                f"project (it has {len(row.completions)})",
            )


# --- writing ----------------------------------------------------------------------------------


def _gold_specs(
    session: Session, rows: list[Row], prompt_ids: dict[str, int]
) -> list[tuple[int, list[int], list[list[int]]]]:
    """(prompt id, completion ids in row order, answer in completion ids) per gold row."""
    if not rows:
        return []
    by_text: dict[int, dict[str, int]] = defaultdict(dict)
    wanted = sorted({prompt_ids[row.external_id] for row in rows})
    for chunk in _chunks(wanted, QUERY_CHUNK):
        for prompt_id, completion_id, text in session.execute(
            select(Completion.prompt_id, Completion.id, Completion.text)
            .where(Completion.prompt_id.in_(chunk))
            .order_by(Completion.id)
        ):
            by_text[prompt_id].setdefault(text, completion_id)
    specs = []
    for row in rows:
        prompt_id = prompt_ids[row.external_id]
        ids = [by_text[prompt_id][body] for body in row.completions]
        specs.append((prompt_id, ids, gold_answers.answer_from_indices(row.gold, ids)))
    return specs


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _existing_prompt_ids(
    session: Session, project_id: int, external_ids: list[str]
) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in _chunks(external_ids, QUERY_CHUNK):
        rows = session.execute(
            select(Prompt.external_id, Prompt.id).where(
                Prompt.project_id == project_id, Prompt.external_id.in_(chunk)
            )
        )
        found.update((external_id, prompt_id) for external_id, prompt_id in rows)
    return found


def _insert_many(
    session: Session, model: type[Base], rows: list[dict[str, Any]], returning: Sequence[str] = ()
) -> list[tuple[Any, ...]]:
    """Insert many rows (keys are column names, the same in every row); return `returning`.

    On Postgres, one ``INSERT … SELECT … FROM unnest(<one array per column>)`` per 10,000
    rows: a many-VALUES statement has a placeholder per cell and psycopg re-parses each such
    long statement client-side, which made 10,000 rows (70,000 inserts) take about three
    times as long. Elsewhere, a plain executemany (SQLite batches it itself).
    """
    if not rows:
        return []
    table = Base.metadata.tables[model.__tablename__]
    columns = list(rows[0])
    out_columns = [table.c[name] for name in returning]
    if session.get_bind().dialect.name != "postgresql":
        stmt = insert(table)
        if out_columns:
            result = session.execute(stmt.returning(*out_columns), rows)
            return [tuple(row) for row in result]
        session.execute(stmt, rows)
        return []
    found: list[tuple[Any, ...]] = []
    for chunk in _chunks(rows, INSERT_CHUNK):
        arrays = []
        for n, name in enumerate(columns):
            column_type = table.c[name].type
            values = [row[name] for row in chunk]
            if isinstance(column_type, JSON):
                element_type: Any = Text()
                values = [json.dumps(value) for value in values]
            elif isinstance(column_type, Enum):
                element_type = String()
                values = [v.value if isinstance(v, enum.Enum) else v for v in values]
            else:
                element_type = column_type
            arrays.append(bindparam(f"c{n}", values, type_=ARRAY(element_type)))
        unnested = func.unnest(*arrays).table_valued(*columns).render_derived()
        source = select(*(cast(unnested.c[name], table.c[name].type) for name in columns))
        stmt = insert(table).from_select(columns, source)
        if out_columns:
            found.extend(tuple(row) for row in session.execute(stmt.returning(*out_columns)))
        else:
            session.execute(stmt)
    return found


def _insert_prompts(session: Session, project_id: int, rows: list[Row]) -> dict[str, int]:
    """Text and chat prompts go in apart, so the column a row does not use stays SQL NULL."""
    now = utcnow()
    ids: dict[str, int] = {}
    text_rows = [
        {
            "project_id": project_id,
            "external_id": r.external_id,
            "text": r.text,
            "metadata": r.metadata if r.metadata is not None else {},
            "priority": 0,
            "created_at": now,
        }
        for r in rows
        if r.messages is None
    ]
    chat_rows = [
        {
            "project_id": project_id,
            "external_id": r.external_id,
            "messages": r.messages,
            "metadata": r.metadata if r.metadata is not None else {},
            "priority": 0,
            "created_at": now,
        }
        for r in rows
        if r.messages is not None
    ]
    for params in (text_rows, chat_rows):
        returned = _insert_many(session, Prompt, params, ("external_id", "id"))
        ids.update((external_id, prompt_id) for external_id, prompt_id in returned)
    return ids


def _plan_updates(
    session: Session, existing: dict[str, int], rows: list[Row], problems: Problems
) -> dict[int, dict[str, Any]]:
    """What each upsert row changes in its stored prompt: per prompt id, the attributes to
    set, only those whose stored value differs (JSON compared with sorted keys, so a mere
    reordering rewrites nothing). A change that would alter what annotators judged is added
    to `problems` instead:

    - the text or messages of a prompt with a judgment (any task of it, gold included):
      judgments, exports and snapshots would show text the annotators never saw, and a
      snapshot would no longer verify;
    - the text or messages of a prompt with a lease on a task of it: the annotator holding
      it answers about the text shown, and that answer is accepted even after the lease
      expires (app.services.judgments);
    - the metadata of a prompt with a judgment: exports carry it on every row of the
      prompt's judgments, snapshots hash it, and their ``meta.`` filters select by it.
    """
    if not rows:
        return {}
    by_id = {existing[row.external_id]: row for row in rows}
    updates: dict[int, dict[str, Any]] = {}
    for chunk in _chunks(sorted(by_id), QUERY_CHUNK):
        for prompt_id, text, messages, metadata in session.execute(
            select(Prompt.id, Prompt.text, Prompt.messages, Prompt.metadata_).where(
                Prompt.id.in_(chunk)
            )
        ):
            row = by_id[prompt_id]
            values: dict[str, Any] = {}
            if row.text != text or _canonical(row.messages) != _canonical(messages):
                values["text"] = row.text
                # SQL NULL, not the JSON 'null' a plain None would store.
                values["messages"] = row.messages if row.messages is not None else null()
            if row.metadata is not None and _canonical(row.metadata) != _canonical(metadata):
                values["metadata_"] = row.metadata
            if values:
                updates[prompt_id] = values
    judged, leased = _judged_and_leased(session, sorted(updates))
    for prompt_id, values in updates.items():
        row = by_id[prompt_id]
        name = row.external_id
        if "text" in values and prompt_id in judged:
            problems.add(
                row.line,
                f"id {name!r} differs from the stored prompt, which has judgments: a judged "
                "prompt's text cannot change, or its judgments, exports and snapshots would "
                "show text the annotators never saw (upload it under a new id)",
            )
        elif "text" in values and prompt_id in leased:
            problems.add(
                row.line,
                f"id {name!r} differs from the stored prompt, which is handed to an annotator "
                "whose judgment is pending: its text cannot change, or that judgment would be "
                "about text they never saw (upload it under a new id)",
            )
        if "metadata_" in values and prompt_id in judged:
            problems.add(
                row.line,
                f"id {name!r} has metadata that differs from the stored prompt's, which has "
                "judgments: a judged prompt's metadata cannot change, since exports and "
                "snapshots of its judgments carry it (leave metadata out to keep it as stored, "
                "or upload the prompt under a new id)",
            )
    return updates


def _judged_and_leased(session: Session, prompt_ids: list[int]) -> tuple[set[int], set[int]]:
    """Of `prompt_ids`, those with a judgment and those with a lease, live or expired.

    Their tasks are locked first (FOR SHARE on Postgres; SQLite serializes writers anyway):
    judgments, and leases of non-gold tasks, are only written with their task row locked
    (app.services.tasks), so none can appear between this check and the upload's commit,
    and a claim skips these tasks until then.
    """
    judged: set[int] = set()
    leased: set[int] = set()
    for chunk in _chunks(prompt_ids, QUERY_CHUNK):
        session.execute(
            select(Task.id).where(Task.prompt_id.in_(chunk)).with_for_update(read=True)
        ).all()
        judged.update(
            session.scalars(
                select(Task.prompt_id)
                .join(Judgment, Judgment.task_id == Task.id)
                .where(Task.prompt_id.in_(chunk))
                .distinct()
            )
        )
        leased.update(
            session.scalars(
                select(Task.prompt_id)
                .join(Lease, Lease.task_id == Task.id)
                .where(Task.prompt_id.in_(chunk))
                .distinct()
            )
        )
    return judged, leased


def _canonical(value: Any) -> str:
    """JSON with sorted keys: equal for the same content in any key order, and unequal for
    1 and 1.0 or 1 and true (which Python's == confuses, and an export would not)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _update_prompts(session: Session, updates: dict[int, dict[str, Any]]) -> None:
    """Upsert: set what `_plan_updates` found changed; completions and tasks are kept."""
    for chunk in _chunks(sorted(updates), QUERY_CHUNK):
        for prompt in session.scalars(select(Prompt).where(Prompt.id.in_(chunk))):
            for attribute, value in updates[prompt.id].items():
                setattr(prompt, attribute, value)
    session.flush()


def _add_completions(
    session: Session, rows: list[Row], prompt_ids: dict[str, int]
) -> tuple[int, dict[int, list[int]]]:
    """Insert each row's completions that its prompt does not have yet (same text = same one).

    Returns the count and, per prompt that got new ones, the new completion ids.
    """
    known: dict[int, set[str]] = defaultdict(set)
    for chunk in _chunks(list(prompt_ids.values()), QUERY_CHUNK):
        for prompt_id, text in session.execute(
            select(Completion.prompt_id, Completion.text).where(Completion.prompt_id.in_(chunk))
        ):
            known[prompt_id].add(text)
    now = utcnow()
    params = [
        {
            "prompt_id": prompt_ids[row.external_id],
            "text": body,
            "source": "upload",
            "metadata": {},
            "created_at": now,
        }
        for row in rows
        for body in row.completions
        if body not in known[prompt_ids[row.external_id]]
    ]
    new_ids: dict[int, list[int]] = defaultdict(list)
    for prompt_id, completion_id in sorted(
        _insert_many(session, Completion, params, ("prompt_id", "id"))
    ):
        new_ids[prompt_id].append(completion_id)
    return len(params), new_ids


def _add_tasks(
    session: Session,
    project: Project,
    new_completion_ids: dict[int, list[int]],
    old_prompt_ids: set[int],
    max_pairs: int,
    rng: random.Random,
) -> tuple[int, int]:
    """Tasks for every prompt that got new completions; no task repeats an existing one.
    Returns (tasks created, completions of those prompts left in no task).

    Pairwise: every pair (or a covering sample of at most `max_pairs`) via app.domain.pairing.
    Ranking: one task per prompt over up to K completions, new ones first, so a prompt with
    more than K leaves the rest out. Only prompts that existed before the import
    (`old_prompt_ids`) can have older completions and tasks.
    """
    if not new_completion_ids:
        return 0, 0
    prompt_ids = sorted(new_completion_ids)
    all_ids: dict[int, list[int]] = {pid: sorted(new_completion_ids[pid]) for pid in prompt_ids}
    existing_sets: dict[int, list[frozenset[int]]] = defaultdict(list)
    old = [pid for pid in prompt_ids if pid in old_prompt_ids]
    for pid in old:
        all_ids[pid] = []
    for chunk in _chunks(old, QUERY_CHUNK):
        for prompt_id, completion_id in session.execute(
            select(Completion.prompt_id, Completion.id)
            .where(Completion.prompt_id.in_(chunk))
            .order_by(Completion.id)
        ):
            all_ids[prompt_id].append(completion_id)
        for prompt_id, completion_ids in session.execute(
            select(Task.prompt_id, Task.completion_ids).where(Task.prompt_id.in_(chunk))
        ):
            existing_sets[prompt_id].append(frozenset(completion_ids))

    candidate_sets: list[tuple[int, Sequence[int]]] = []
    unranked = 0
    for prompt_id in prompt_ids:
        ids, existing = all_ids[prompt_id], existing_sets[prompt_id]
        if project.mode is ProjectMode.ranking:
            chosen = pairing.ranking_set(
                ids, project.candidates_per_task, rng, prefer=set(new_completion_ids[prompt_id])
            )
            if chosen and frozenset(chosen) not in existing:
                candidate_sets.append((prompt_id, chosen))
            covered = frozenset(chosen).union(*existing)
            unranked += sum(1 for c in ids if c not in covered)
        else:
            pairs: Iterable[tuple[int, int]] = (
                pairing.extend_pairs(ids, set(existing), max_pairs, rng)
                if existing
                else pairing.pairs_for(ids, max_pairs, rng)
            )
            candidate_sets.extend((prompt_id, pair) for pair in pairs)

    now = utcnow()
    params = [
        {
            "project_id": project.id,
            "prompt_id": prompt_id,
            "completion_ids": list(ids),
            "required_judgments": project.judgments_per_task,
            "judgment_count": 0,
            "is_gold": False,
            "priority": 0,
            "state": TaskState.open.value,
            "created_at": now,
        }
        for prompt_id, ids in candidate_sets
    ]
    _insert_many(session, Task, params)
    return len(params), unranked
