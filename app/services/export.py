"""Export judgments as preference datasets (pairs, rankings, raw) in JSONL, CSV or Parquet.

Everything streams in constant memory: judgments are read through a server-side cursor
(``yield_per``) in batches, the completion texts of one batch are fetched with one query, and
the encoders emit bytes chunk by chunk. Nothing here holds a whole project in memory.

Shapes
    ``pairs``     one row per strict (chosen, rejected) pair of a judgment: what TRL's
                  RewardTrainer and DPOTrainer read (``prompt``, ``chosen``, ``rejected``).
    ``rankings``  one row per judgment, completions in ranked order with tie groups.
    ``raw``       one row per judgment, everything that was recorded.

Column names are a public contract (the researcher page documents them, later code such as
snapshots and the reward trainer reads :func:`rows`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import read_only
from app.domain.rankings import BOTH_BAD, TIE, to_pairs
from app.errors import InvalidInput, NotFound
from app.models import Completion, Judgment, Project, Prompt, Task, User

SHAPES = ("pairs", "rankings", "raw")
MEDIA_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}
FORMATS = tuple(MEDIA_TYPES)
FILTER_KEYS = ("since", "until", "annotator")

BATCH_ROWS = 1000  # judgments per server-side fetch (and per completion-text lookup)
ROW_GROUP_ROWS = 10_000  # rows per Parquet row group
CHUNK_BYTES = 64 * 1024  # JSONL / CSV bytes handed to the response at a time
_IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's bound-parameter limit

# Column name → kind. The kind decides the Parquet type and how CSV / Parquet flatten it:
# "json" columns are free-form objects (different keys per row), so CSV and Parquet carry them
# as JSON text; JSONL carries every column as native JSON.
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_KINDS: dict[str, pa.DataType | None] = {
    "str": pa.string(),
    "int": pa.int64(),
    "bool": pa.bool_(),
    "messages": _MESSAGES,
    "int_list": pa.list_(pa.int64()),
    "int_groups": pa.list_(pa.list_(pa.int64())),
    "str_list": pa.list_(pa.string()),
    "choice": pa.string(),  # a completion id, "tie" or "both_bad": text outside JSONL
    "json": None,  # free-form object: JSON text outside JSONL
}

# `prompt_messages`, not `messages`: TRL's `is_conversational` picks an arbitrary one of
# prompt/chosen/rejected/completion/messages (a set pop, so it changes with the hash seed)
# and would take a pairs row with a `messages` list for a conversational example.
COLUMNS: dict[str, dict[str, str]] = {
    "pairs": {
        "prompt": "str",
        "prompt_messages": "messages",
        "chosen": "str",
        "rejected": "str",
        "prompt_id": "str",
        "chosen_id": "int",
        "rejected_id": "int",
        "task_id": "int",
        "judgment_id": "int",
        "annotator": "str",
        "strength": "int",
        "rank_distance": "int",
        "created_at": "str",
        "metadata": "json",
    },
    "rankings": {
        "prompt": "str",
        "prompt_messages": "messages",
        "completions": "str_list",
        "ranking": "int_groups",
        "completion_ids": "int_list",
        "prompt_id": "str",
        "task_id": "int",
        "judgment_id": "int",
        "annotator": "str",
        "none_acceptable": "bool",
        "strength": "int",
        "created_at": "str",
        "metadata": "json",
    },
    "raw": {
        "judgment_id": "int",
        "task_id": "int",
        "prompt_id": "str",
        "prompt": "str",
        "prompt_messages": "messages",
        "annotator": "str",
        "ranking": "int_groups",
        "completions": "json",
        "display_order": "int_list",
        "choice": "choice",
        "none_acceptable": "bool",
        "strength": "int",
        "rationale": "str",
        "time_spent_ms": "int",
        "is_gold": "bool",
        "created_at": "str",
        "metadata": "json",
    },
}


@dataclass(frozen=True)
class Filters:
    """Which judgments to export; `until` is exclusive (see :func:`parse_filters`)."""

    since: datetime | None = None
    until: datetime | None = None
    annotators: tuple[str, ...] = ()


@dataclass(frozen=True)
class Overview:
    """What the researcher export page shows about one project."""

    project_id: int
    name: str
    mode: str
    judgments: int
    annotators: int


# --- validation --------------------------------------------------------------------------


def _check_shape(shape: str) -> str:
    if shape not in SHAPES:
        raise InvalidInput(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    return shape


def _check_format(fmt: str) -> str:
    if fmt not in MEDIA_TYPES:
        raise InvalidInput(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def _utc(moment: datetime) -> datetime:
    """Naive datetimes are UTC (SQLite hands them back naive; people type them naive)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _parse_moment(name: str, value: Any, *, end_of_day: bool) -> datetime | None:
    """An ISO 8601 date or datetime. A bare date `until` means "through that whole day"."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, date):
        day = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            if len(text) != 10:
                return _utc(datetime.fromisoformat(text))
            day = date.fromisoformat(text)
        except ValueError:
            raise InvalidInput(
                f"{name} must be an ISO 8601 date or datetime (e.g. 2024-05-01 or "
                f"2024-05-01T12:00:00Z), not {value!r}"
            ) from None
    else:
        raise InvalidInput(f"{name} must be an ISO 8601 date or datetime")
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start + timedelta(days=1) if end_of_day else start


def parse_filters(filters: Mapping[str, Any]) -> Filters:
    """Validate export filters; unknown keys are an error, not silently ignored.

    ``since`` (inclusive) and ``until`` (exclusive; a bare date includes that whole day) bound
    the judgment's ``created_at``; naive times are UTC. ``annotator`` is a username or a list
    of them. Empty values mean "no filter", so a form's blank fields do no harm.
    """
    unknown = sorted(set(filters) - set(FILTER_KEYS))
    if unknown:
        raise InvalidInput(
            f"unknown export filter(s) {', '.join(unknown)}; use {', '.join(FILTER_KEYS)}",
            unknown=unknown,
        )
    since = _parse_moment("since", filters.get("since"), end_of_day=False)
    until = _parse_moment("until", filters.get("until"), end_of_day=True)
    if since is not None and until is not None and until <= since:
        raise InvalidInput("until must be later than since")
    names = filters.get("annotator") or ()
    if isinstance(names, str):
        names = (names,)
    if not all(isinstance(n, str) for n in names):
        raise InvalidInput("annotator must be a username or a list of usernames")
    return Filters(since, until, tuple(sorted({n.strip() for n in names if n.strip()})))


def _check_target(session: Session, project_id: int, parsed: Filters) -> None:
    """Fail before the first byte: a missing project or an unknown annotator name."""
    if session.get(Project, project_id) is None:
        raise NotFound(f"no project {project_id}")
    if parsed.annotators:
        known = set(
            session.scalars(select(User.username).where(User.username.in_(parsed.annotators)))
        )
        missing = [n for n in parsed.annotators if n not in known]
        if missing:
            raise InvalidInput(f"no user(s) named {', '.join(missing)}", unknown=missing)


# --- public API -------------------------------------------------------------------------


def media_type(fmt: str) -> str:
    return MEDIA_TYPES[_check_format(fmt)]


def filename(project_id: int, shape: str, fmt: str) -> str:
    """The download name, e.g. ``project-1-pairs.jsonl`` (the page's snippet uses it)."""
    return f"project-{project_id}-{_check_shape(shape)}.{_check_format(fmt)}"


def overview(session: Session, project_id: int) -> Overview:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id}")
    judgments, annotators = session.execute(
        select(func.count(Judgment.id), func.count(func.distinct(Judgment.user_id))).where(
            Judgment.project_id == project_id
        )
    ).one()
    return Overview(project.id, project.name, project.mode.value, int(judgments), int(annotators))


def rows(
    session: Session, project_id: int, *, shape: str, filters: Mapping[str, Any]
) -> Iterator[dict[str, Any]]:
    """The export's rows as dicts (the columns of ``COLUMNS[shape]``, in that order).

    Validates the shape, filters and project now, then returns a lazy iterator that reads the
    judgments with a server-side cursor while `session` stays open. Values are exactly what
    JSONL carries: ``json.loads`` of a JSONL line equals the dict.
    """
    _check_shape(shape)
    parsed = parse_filters(filters)
    _check_target(session, project_id, parsed)
    return _rows(session, project_id, shape, parsed)


def stream(
    session_factory: sessionmaker[Session],
    project_id: int,
    *,
    shape: str,
    fmt: str,
    filters: Mapping[str, Any],
    session: Session | None = None,
) -> Iterator[bytes]:
    """Validate now, then return an iterator of the encoded file's bytes.

    Errors (unknown shape, format or filter, missing project or annotator) raise here, before
    a response has started, so the API can still answer 4xx. The returned iterator opens its
    own session from `session_factory` when iteration begins: a web request's session is
    closed before a streaming body is sent. `session`, when given (the request's), is used
    only for the up-front checks, so no second transaction is opened while it is live.
    """
    _check_shape(shape)
    encode = _ENCODERS[_check_format(fmt)]
    parsed = parse_filters(filters)
    if session is not None:
        _check_target(session, project_id, parsed)
    else:
        with session_factory() as check_session:
            _check_target(check_session, project_id, parsed)
    return _stream(session_factory, project_id, shape, parsed, encode)


def _stream(
    session_factory: sessionmaker[Session],
    project_id: int,
    shape: str,
    parsed: Filters,
    encode: Callable[[Iterable[dict[str, Any]], str], Iterator[bytes]],
) -> Iterator[bytes]:
    with session_factory() as session:
        read_only(session)
        yield from encode(_rows(session, project_id, shape, parsed), shape)


# --- reading ----------------------------------------------------------------------------


def _statement(project_id: int, parsed: Filters) -> Any:
    """Plain columns (no ORM entities), so nothing piles up in the session's identity map."""
    stmt = (
        select(
            Judgment.id,
            Judgment.task_id,
            Judgment.ranking,
            Judgment.none_acceptable,
            Judgment.strength,
            Judgment.rationale,
            Judgment.display_order,
            Judgment.time_spent_ms,
            Judgment.is_gold,
            Judgment.created_at,
            Task.completion_ids,
            Prompt.external_id,
            Prompt.text,
            Prompt.messages,
            Prompt.metadata_,
            User.username,
        )
        .join(Task, Task.id == Judgment.task_id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(User, User.id == Judgment.user_id)
        .where(Judgment.project_id == project_id)
        .order_by(Judgment.id)
    )
    if parsed.since is not None:
        stmt = stmt.where(Judgment.created_at >= parsed.since)
    if parsed.until is not None:
        stmt = stmt.where(Judgment.created_at < parsed.until)
    if parsed.annotators:
        stmt = stmt.where(User.username.in_(parsed.annotators))
    return stmt


def _texts(session: Session, ids: set[int]) -> dict[int, str]:
    ordered = sorted(ids)
    texts: dict[int, str] = {}
    for start in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[start : start + _IN_CHUNK]
        query = select(Completion.id, Completion.text).where(Completion.id.in_(chunk))
        texts.update((cid, text) for cid, text in session.execute(query))
    return texts


def _rows(
    session: Session, project_id: int, shape: str, parsed: Filters
) -> Iterator[dict[str, Any]]:
    build = _BUILDERS[shape]
    result = session.execute(_statement(project_id, parsed).execution_options(yield_per=BATCH_ROWS))
    for batch in result.partitions():
        ids = {int(c) for r in batch for c in r.completion_ids}
        ids |= {int(c) for r in batch for group in r.ranking for c in group}
        texts = _texts(session, ids)
        for r in batch:
            yield from build(r, texts)


def _messages(messages: Sequence[Any] | None) -> list[dict[str, str]] | None:
    """Chat turns as ``{role, content}`` strings (non-text content kept as JSON text)."""
    if not messages:
        return None
    out = []
    for m in messages:
        m = m if isinstance(m, dict) else {"content": m}
        content = m.get("content", "")
        out.append(
            {
                "role": str(m.get("role", "")),
                "content": content
                if isinstance(content, str)
                else json.dumps(content, ensure_ascii=False),
            }
        )
    return out


def prompt_text(text: str | None, messages: list[dict[str, str]] | None) -> str:
    """A prompt as plain text: a chat is rendered ``role: content`` per turn, blank-line separated."""
    if text is not None:
        return text
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages or [])


def _iso(moment: datetime) -> str:
    return _utc(moment).isoformat().replace("+00:00", "Z")


def _common(r: Any) -> dict[str, Any]:
    messages = _messages(r.messages)
    return {
        "prompt": prompt_text(r.text, messages),
        "prompt_messages": messages,
        "metadata": dict(r.metadata_ or {}),
        "created_at": _iso(r.created_at),
    }


def _pair_rows(r: Any, texts: Mapping[int, str]) -> Iterator[dict[str, Any]]:
    """Strict pairs only: tie groups give none, and a "none acceptable" verdict gives none,
    since a completion the annotator called unacceptable is no `chosen` to train towards."""
    if r.none_acceptable:
        return
    common = _common(r)
    for better, worse, distance in to_pairs(r.ranking):
        yield {
            "prompt": common["prompt"],
            "prompt_messages": common["prompt_messages"],
            "chosen": texts[better],
            "rejected": texts[worse],
            "prompt_id": r.external_id,
            "chosen_id": better,
            "rejected_id": worse,
            "task_id": r.task_id,
            "judgment_id": r.id,
            "annotator": r.username,
            "strength": r.strength,
            "rank_distance": distance,
            "created_at": common["created_at"],
            "metadata": common["metadata"],
        }


def _ranking_rows(r: Any, texts: Mapping[int, str]) -> Iterator[dict[str, Any]]:
    """One row per judgment. Several annotators' rankings of one task are separate rows:
    merging them into a consensus ranking comes with the agreement work in a later issue."""
    common = _common(r)
    ordered = [c for group in r.ranking for c in group]
    groups, index = [], 0
    for group in r.ranking:
        groups.append(list(range(index, index + len(group))))
        index += len(group)
    yield {
        "prompt": common["prompt"],
        "prompt_messages": common["prompt_messages"],
        "completions": [texts[c] for c in ordered],
        "ranking": groups,
        "completion_ids": ordered,
        "prompt_id": r.external_id,
        "task_id": r.task_id,
        "judgment_id": r.id,
        "annotator": r.username,
        "none_acceptable": r.none_acceptable,
        "strength": r.strength,
        "created_at": common["created_at"],
        "metadata": common["metadata"],
    }


def _choice(
    ranking: Sequence[Sequence[int]], none_acceptable: bool, candidates: Sequence[int]
) -> int | str | None:
    """The pairwise verdict as the API takes it (winner id, "tie", "both_bad"); None for K > 2."""
    if len(candidates) != 2:
        return None
    if none_acceptable:
        return BOTH_BAD
    if len(ranking) == 1:
        return TIE
    return int(ranking[0][0])


def _raw_rows(r: Any, texts: Mapping[int, str]) -> Iterator[dict[str, Any]]:
    common = _common(r)
    yield {
        "judgment_id": r.id,
        "task_id": r.task_id,
        "prompt_id": r.external_id,
        "prompt": common["prompt"],
        "prompt_messages": common["prompt_messages"],
        "annotator": r.username,
        "ranking": [list(g) for g in r.ranking],
        "completions": {str(c): texts[c] for c in r.completion_ids},
        "display_order": list(r.display_order),
        "choice": _choice(r.ranking, r.none_acceptable, r.completion_ids),
        "none_acceptable": r.none_acceptable,
        "strength": r.strength,
        "rationale": r.rationale,
        "time_spent_ms": r.time_spent_ms,
        "is_gold": r.is_gold,
        "created_at": common["created_at"],
        "metadata": common["metadata"],
    }


_BUILDERS: dict[str, Callable[[Any, Mapping[int, str]], Iterator[dict[str, Any]]]] = {
    "pairs": _pair_rows,
    "rankings": _ranking_rows,
    "raw": _raw_rows,
}


# --- encoding ---------------------------------------------------------------------------


def _chunked(pieces: Iterable[str]) -> Iterator[bytes]:
    """Join small strings into ~CHUNK_BYTES pieces: fewer, larger writes to the socket."""
    buf: list[str] = []
    size = 0
    for piece in pieces:
        buf.append(piece)
        size += len(piece)
        if size >= CHUNK_BYTES:
            yield "".join(buf).encode("utf-8")
            buf, size = [], 0
    if buf:
        yield "".join(buf).encode("utf-8")


def _encode_jsonl(records: Iterable[dict[str, Any]], shape: str) -> Iterator[bytes]:
    return _chunked(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _flat(value: Any, kind: str) -> Any:
    """A value for a flat format: free-form objects become JSON text, choices become text."""
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, ensure_ascii=False)
    if kind == "choice":
        return str(value)
    return value


def _csv_cell(value: Any, kind: str) -> str:
    """Nested values as JSON text, booleans as true/false, None as an empty cell."""
    if value is None:
        return ""
    if kind in ("str", "int", "choice"):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _encode_csv(records: Iterable[dict[str, Any]], shape: str) -> Iterator[bytes]:
    columns = COLUMNS[shape]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")

    def lines() -> Iterator[str]:
        writer.writerow(columns)
        for record in records:
            writer.writerow([_csv_cell(record[name], kind) for name, kind in columns.items()])
            yield out.getvalue()
            out.seek(0)
            out.truncate()
        yield out.getvalue()

    yield from _chunked(lines())


def parquet_schema(shape: str) -> pa.Schema:
    """The fixed Arrow schema of a shape (fixed, so every row group agrees)."""
    return pa.schema(
        [(name, _KINDS[kind] or pa.string()) for name, kind in COLUMNS[_check_shape(shape)].items()]
    )


class _Drain(io.RawIOBase):
    """A write-only, non-seekable sink whose bytes are taken out after each row group."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._buf += view
        self._pos += len(view)
        return len(view)

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


def _encode_parquet(records: Iterable[dict[str, Any]], shape: str) -> Iterator[bytes]:
    """Row groups of ROW_GROUP_ROWS rows, each sent as soon as it is written.

    Reading Parquet needs a seekable file (the footer, at the end, indexes the row groups),
    but writing it is append-only: magic bytes, row groups, then the footer at close. So the
    writer goes to a non-seekable in-memory sink that is drained after every row group, and
    memory stays bounded by one row group — no temporary file is needed.
    """
    schema = parquet_schema(shape)
    kinds = COLUMNS[shape]
    sink = _Drain()
    writer = pq.ParquetWriter(sink, schema, compression="zstd")
    try:
        batch: list[dict[str, Any]] = []
        for record in records:
            batch.append({name: _flat(record[name], kind) for name, kind in kinds.items()})
            if len(batch) >= ROW_GROUP_ROWS:
                writer.write_table(
                    pa.Table.from_pylist(batch, schema=schema), row_group_size=ROW_GROUP_ROWS
                )
                batch = []
                yield sink.take()
        if batch:
            writer.write_table(
                pa.Table.from_pylist(batch, schema=schema), row_group_size=ROW_GROUP_ROWS
            )
    finally:
        writer.close()
    yield sink.take()


_ENCODERS: dict[str, Callable[[Iterable[dict[str, Any]], str], Iterator[bytes]]] = {
    "jsonl": _encode_jsonl,
    "csv": _encode_csv,
    "parquet": _encode_parquet,
}
