"""Export judgments as preference datasets (pairs, rankings, raw) in JSONL, CSV, Parquet or a
Hugging Face ``datasets`` directory.

Everything streams in constant memory: judgments are read through a server-side cursor in
batches of BATCH_ROWS, the prompts, completion texts and usernames of one batch are fetched
with one query each, and the encoders emit bytes batch by batch. Nothing here holds a whole
project in memory (the ``min_agreement`` filter keeps the set of passing task ids, one
integer per task). The pairs JSONL is the hot path (see "reading" below and
bench/README.md): on Postgres it reads through a raw psycopg cursor, builds lines from
pre-escaped JSON fragments, and reads the next batches in a worker thread meanwhile.

Shapes
    ``pairs``     one row per (chosen, rejected) pair of a judgment: what TRL's RewardTrainer
                  and DPOTrainer read (``prompt``, ``chosen``, ``rejected``, ``margin``). Ties
                  and "both bad" give no pair unless ``ties=True``, which adds a row per tied
                  pair with ``tie`` true and margin 0 ("both bad" never gives a pair).
    ``rankings``  one row per task: the consensus ranking of all its (selected) judgments
                  (app.domain.agreement: exact Kemeny–Snell up to 6 candidates, ranked pairs
                  beyond), the agreement among them, and every individual ranking.
    ``raw``       one row per judgment, everything that was recorded.

Filters (:func:`parse_filters`) are what a person asks for; a :class:`Selection` is those
filters resolved against the database at one moment (annotator names, paused accounts and
gold accuracy become a fixed list of user ids). A snapshot stores its selection, so its
content never changes when people are paused or their gold accuracy moves later.

Row order is deterministic (judgment id; task id for rankings) and no value depends on the
time of the export, so exporting the same selection twice gives byte-identical files.

Column names are a public contract (the researcher page documents them; snapshots, the
reward trainer and the tests read :func:`rows`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import itertools
import json
import secrets
import tarfile
import tempfile
import threading
import zlib
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from queue import Full, Queue
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import (
    BigInteger,
    DateTime,
    Text,
    TypeDecorator,
    any_,
    bindparam,
    case,
    cast,
    func,
    select,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from app.db import read_only
from app.domain import agreement
from app.domain.rankings import BOTH_BAD, TIE, tied_pairs, to_pairs
from app.errors import InvalidInput, NotFound
from app.models import Completion, Judgment, Project, Prompt, Task, User

SHAPES = ("pairs", "rankings", "raw")
MEDIA_TYPES = {
    "jsonl": "application/x-ndjson",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
    "hf": "application/gzip",
}
FORMATS = tuple(MEDIA_TYPES)
EXTENSIONS = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "hf": "tar.gz"}
FILTER_KEYS = (
    "since",
    "until",
    "annotator",
    "exclude_annotator",
    "min_agreement",
    "min_gold_accuracy",
    "exclude_paused",
    "meta",
)
META_PREFIX = "meta."

BATCH_ROWS = 5000  # judgments per server-side fetch (and per prompt / text lookup)
ROW_GROUP_ROWS = 10_000  # rows per Parquet row group
ARROW_CHUNK_ROWS = 1000  # rows converted to Arrow at a time
CHUNK_BYTES = 64 * 1024  # bytes handed to the response at a time
_IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's bound-parameter limit
HF_DATA_FILE = "data-00000-of-00001.arrow"

_compact = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
"""JSON as every JSONL line is written: UTF-8 (not \\u-escaped), no spaces."""
_escape = json.encoder.encode_basestring
"""The C string escaper that JSONEncoder(ensure_ascii=False) uses, for the pairs fast path."""

# Column name → kind. The kind decides the Arrow type and how CSV / Parquet flatten it:
# "json" columns are free-form objects (different keys per row), so CSV and Parquet carry them
# as JSON text; JSONL carries every column as native JSON.
_MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_JUDGMENTS = pa.list_(
    pa.struct(
        [
            ("judgment_id", pa.int64()),
            ("annotator", pa.string()),
            ("ranking", pa.list_(pa.list_(pa.int64()))),
            ("none_acceptable", pa.bool_()),
            ("strength", pa.int64()),
        ]
    )
)
_KINDS: dict[str, pa.DataType | None] = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "messages": _MESSAGES,
    "int_list": pa.list_(pa.int64()),
    "int_groups": pa.list_(pa.list_(pa.int64())),
    "str_list": pa.list_(pa.string()),
    "judgments": _JUDGMENTS,
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
        "margin": "int",
        "tie": "bool",
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
        "completion_ids": "int_list",
        "ranking": "int_groups",
        "consensus_method": "str",
        "agreement": "float",
        "judgments": "judgments",
        "prompt_id": "str",
        "task_id": "int",
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
    """Which judgments a person asked for; `until` is exclusive (see :func:`parse_filters`)."""

    since: datetime | None = None
    until: datetime | None = None
    annotators: tuple[str, ...] = ()
    exclude_annotators: tuple[str, ...] = ()
    min_agreement: float | None = None
    min_gold_accuracy: float | None = None
    exclude_paused: bool = False
    meta: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def picks_annotators(self) -> bool:
        return bool(
            self.annotators
            or self.exclude_annotators
            or self.exclude_paused
            or self.min_gold_accuracy is not None
        )

    def to_json(self) -> dict[str, Any]:
        """The normalized request, only the filters that are set (a snapshot records it)."""
        out: dict[str, Any] = {}
        if self.since is not None:
            out["since"] = iso(self.since)
        if self.until is not None:
            out["until"] = iso(self.until)
        if self.annotators:
            out["annotator"] = list(self.annotators)
        if self.exclude_annotators:
            out["exclude_annotator"] = list(self.exclude_annotators)
        if self.min_agreement is not None:
            out["min_agreement"] = self.min_agreement
        if self.min_gold_accuracy is not None:
            out["min_gold_accuracy"] = self.min_gold_accuracy
        if self.exclude_paused:
            out["exclude_paused"] = True
        if self.meta:
            out["meta"] = {key: list(values) for key, values in self.meta}
        return out


@dataclass(frozen=True)
class Selection:
    """Filters resolved against the database: exactly which judgments are read.

    `user_ids` None means every annotator; `max_judgment_id` None means no cut-off.
    """

    since: datetime | None = None
    until: datetime | None = None
    user_ids: tuple[int, ...] | None = None
    min_agreement: float | None = None
    meta: tuple[tuple[str, tuple[str, ...]], ...] = ()
    max_judgment_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        """What a snapshot stores (its cut-off has its own column)."""
        return {
            "since": iso(self.since) if self.since else None,
            "until": iso(self.until) if self.until else None,
            "user_ids": list(self.user_ids) if self.user_ids is not None else None,
            "min_agreement": self.min_agreement,
            "meta": {key: list(values) for key, values in self.meta},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], max_judgment_id: int | None) -> Selection:
        ids = data.get("user_ids")
        return cls(
            since=_utc(datetime.fromisoformat(data["since"])) if data.get("since") else None,
            until=_utc(datetime.fromisoformat(data["until"])) if data.get("until") else None,
            user_ids=tuple(int(i) for i in ids) if ids is not None else None,
            min_agreement=data.get("min_agreement"),
            meta=tuple(
                (str(k), tuple(str(v) for v in values))
                for k, values in sorted((data.get("meta") or {}).items())
            ),
            max_judgment_id=max_judgment_id,
        )


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


def _parse_names(name: str, value: Any) -> tuple[str, ...]:
    names = value or ()
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise InvalidInput(f"{name} must be a username or a list of usernames")
    return tuple(sorted({n.strip() for n in names if n.strip()}))


def _parse_fraction(name: str, value: Any) -> float | None:
    """A number from 0 to 1 (a form's blank means no filter)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise InvalidInput(f"{name} must be a number from 0 to 1")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a number from 0 to 1, not {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise InvalidInput(f"{name} must be a number from 0 to 1, not {value!r}")
    return number


def _parse_flag(name: str, value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise InvalidInput(f"{name} must be true or false, not {value!r}")


def meta_text(value: Any) -> str:
    """How a metadata value is compared with a filter's text: strings as they are, anything
    else as its JSON (so ``meta.n=1`` matches 1 and ``meta.ok=true`` matches true)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _parse_meta(items: Iterable[tuple[str, Any]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(key, value or values) pairs → sorted (key, accepted texts); blank values are ignored."""
    found: dict[str, set[str]] = {}
    for key, value in items:
        key = key.strip()
        if not key:
            raise InvalidInput("a metadata filter needs a key: meta.<key>=<value>")
        values = value if isinstance(value, list | tuple) else [value]
        texts = {v.strip() if isinstance(v, str) else meta_text(v) for v in values}
        texts.discard("")
        if texts:
            found.setdefault(key, set()).update(texts)
    return tuple((key, tuple(sorted(found[key]))) for key in sorted(found))


def _meta_items(value: Any) -> Iterator[tuple[str, Any]]:
    """The forms a `meta` filter comes in: {"key": value}, "key=value", or a list of those."""
    if value is None or value == "":
        return
    if isinstance(value, Mapping):
        yield from value.items()
        return
    for item in value if isinstance(value, list | tuple) else [value]:
        if isinstance(item, Mapping):
            yield from item.items()
            continue
        if not isinstance(item, str):
            raise InvalidInput("meta must be key=value text or an object")
        if not item.strip():
            continue
        key, sep, text = item.partition("=")
        if not sep:
            raise InvalidInput(f"meta filter {item!r} must look like key=value")
        yield key, text


def parse_filters(filters: Mapping[str, Any]) -> Filters:
    """Validate export filters; unknown keys are an error, not silently ignored.

    ``since`` (inclusive) and ``until`` (exclusive; a bare date includes that whole day) bound
    the judgment's ``created_at``; naive times are UTC. ``annotator`` / ``exclude_annotator``
    take a username or a list. ``min_agreement`` keeps tasks whose selected judgments agree at
    least that much (tasks judged once have no agreement and are left out);
    ``min_gold_accuracy`` keeps annotators whose gold answers are at least that accurate
    (annotators with no judged gold item are left out); ``exclude_paused`` drops paused
    accounts. ``meta.<key>=<value>`` (or ``meta={"key": value}`` / ``meta="key=value"``) keeps
    prompts whose metadata has that value; several values for one key mean any of them.
    Empty values mean "no filter", so a form's blank fields do no harm.
    """
    unknown = sorted(
        k for k in filters if k not in FILTER_KEYS and not str(k).startswith(META_PREFIX)
    )
    if unknown:
        raise InvalidInput(
            f"unknown export filter(s) {', '.join(unknown)}; use {', '.join(FILTER_KEYS)} "
            "or meta.<key>",
            unknown=unknown,
        )
    since = _parse_moment("since", filters.get("since"), end_of_day=False)
    until = _parse_moment("until", filters.get("until"), end_of_day=True)
    if since is not None and until is not None and until <= since:
        raise InvalidInput("until must be later than since")
    meta_items = list(_meta_items(filters.get("meta")))
    meta_items += [
        (k[len(META_PREFIX) :], v) for k, v in filters.items() if k.startswith(META_PREFIX)
    ]
    return Filters(
        since=since,
        until=until,
        annotators=_parse_names("annotator", filters.get("annotator")),
        exclude_annotators=_parse_names("exclude_annotator", filters.get("exclude_annotator")),
        min_agreement=_parse_fraction("min_agreement", filters.get("min_agreement")),
        min_gold_accuracy=_parse_fraction("min_gold_accuracy", filters.get("min_gold_accuracy")),
        exclude_paused=_parse_flag("exclude_paused", filters.get("exclude_paused")),
        meta=_parse_meta(meta_items),
    )


def gold_accuracy(
    session: Session, project_id: int, *, max_judgment_id: int | None = None
) -> dict[int, tuple[int, int]]:
    """Per annotator id: (gold answers right, gold answers judged), from judgments.gold_correct."""
    right = func.sum(case((Judgment.gold_correct.is_(True), 1), else_=0))
    stmt = (
        select(Judgment.user_id, right, func.count())
        .where(Judgment.project_id == project_id, Judgment.gold_correct.is_not(None))
        .group_by(Judgment.user_id)
    )
    if max_judgment_id is not None:
        stmt = stmt.where(Judgment.id <= max_judgment_id)
    return {int(uid): (int(ok or 0), int(n)) for uid, ok, n in session.execute(stmt)}


def resolve(
    session: Session, project_id: int, filters: Filters, *, max_judgment_id: int | None = None
) -> Selection:
    """Turn a request into a :class:`Selection`, now. Fails before the first byte on a missing
    project or an unknown annotator name."""
    if session.get(Project, project_id) is None:
        raise NotFound(f"no project {project_id}")
    named = set(filters.annotators) | set(filters.exclude_annotators)
    ids_by_name: dict[str, int] = {}
    if named:
        ids_by_name = {
            name: int(uid)
            for uid, name in session.execute(
                select(User.id, User.username).where(User.username.in_(sorted(named)))
            )
        }
        missing = sorted(named - set(ids_by_name))
        if missing:
            raise InvalidInput(f"no user(s) named {', '.join(missing)}", unknown=missing)
    user_ids: tuple[int, ...] | None = None
    if filters.picks_annotators:
        stmt = (
            select(User.id, User.active)
            .join(Judgment, Judgment.user_id == User.id)
            .where(Judgment.project_id == project_id)
            .distinct()
        )
        if max_judgment_id is not None:
            stmt = stmt.where(Judgment.id <= max_judgment_id)
        judged = {int(uid): bool(active) for uid, active in session.execute(stmt)}
        keep = set(judged)
        if filters.annotators:
            keep &= {ids_by_name[n] for n in filters.annotators}
        keep -= {ids_by_name[n] for n in filters.exclude_annotators}
        if filters.exclude_paused:
            keep = {uid for uid in keep if judged[uid]}
        if filters.min_gold_accuracy is not None:
            accuracy = gold_accuracy(session, project_id, max_judgment_id=max_judgment_id)
            keep = {
                uid
                for uid in keep
                if uid in accuracy
                and accuracy[uid][0] / accuracy[uid][1] >= filters.min_gold_accuracy
            }
        user_ids = tuple(sorted(keep))
    return Selection(
        since=filters.since,
        until=filters.until,
        user_ids=user_ids,
        min_agreement=filters.min_agreement,
        meta=filters.meta,
        max_judgment_id=max_judgment_id,
    )


# --- public API -------------------------------------------------------------------------


def media_type(fmt: str) -> str:
    return MEDIA_TYPES[_check_format(fmt)]


def filename(project_id: int, shape: str, fmt: str, *, prefix: str = "project") -> str:
    """The download name, e.g. ``project-1-pairs.jsonl`` (the page's snippet uses it); the
    ``hf`` format is ``project-1-pairs.tar.gz`` holding the directory ``project-1-pairs/``."""
    return f"{prefix}-{project_id}-{_check_shape(shape)}.{EXTENSIONS[_check_format(fmt)]}"


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
    session: Session,
    project_id: int,
    *,
    shape: str,
    filters: Mapping[str, Any],
    ties: bool = False,
) -> Iterator[dict[str, Any]]:
    """The export's rows as dicts (the columns of ``COLUMNS[shape]``, in that order).

    Validates the shape, filters and project now, then returns a lazy iterator that reads the
    judgments with a server-side cursor while `session` stays open. Values are exactly what
    JSONL carries: ``json.loads`` of a JSONL line equals the dict.
    """
    _check_shape(shape)
    selection = resolve(session, project_id, parse_filters(filters))
    return _rows(session, project_id, shape, selection, ties)


def selection_rows(
    session: Session, project_id: int, selection: Selection, *, shape: str, ties: bool = False
) -> Iterator[dict[str, Any]]:
    """:func:`rows` of an already resolved selection (a snapshot's)."""
    _check_shape(shape)
    return _rows(session, project_id, shape, selection, ties)


def stream(
    session_factory: sessionmaker[Session],
    project_id: int,
    *,
    shape: str,
    fmt: str,
    filters: Mapping[str, Any],
    session: Session | None = None,
    ties: bool = False,
) -> Iterator[bytes]:
    """Validate now, then return an iterator of the encoded file's bytes.

    Errors (unknown shape, format or filter, missing project or annotator) raise here, before
    a response has started, so the API can still answer 4xx. The returned iterator opens its
    own session from `session_factory` when iteration begins: a web request's session is
    closed before a streaming body is sent. `session`, when given (the request's), is used
    only for the up-front checks, so no second transaction is opened while it is live.
    """
    _check_shape(shape)
    _check_format(fmt)
    parsed = parse_filters(filters)
    if session is not None:
        selection = resolve(session, project_id, parsed)
    else:
        with session_factory() as check_session:
            selection = resolve(check_session, project_id, parsed)
    name = filename(project_id, shape, fmt).removesuffix("." + EXTENSIONS[fmt])
    return _stream(session_factory, project_id, shape, selection, fmt, ties, name)


def stream_selection(
    session_factory: sessionmaker[Session],
    project_id: int,
    selection: Selection,
    *,
    shape: str,
    fmt: str,
    name: str,
    ties: bool = False,
) -> Iterator[bytes]:
    """:func:`stream` of an already resolved selection; `name` is the hf directory's name."""
    _check_shape(shape)
    _check_format(fmt)
    return _stream(session_factory, project_id, shape, selection, fmt, ties, name)


def _stream(
    session_factory: sessionmaker[Session],
    project_id: int,
    shape: str,
    selection: Selection,
    fmt: str,
    ties: bool,
    name: str,
) -> Iterator[bytes]:
    with session_factory() as session:
        read_only(session)
        if fmt == "jsonl" and shape == "pairs":
            yield from _pairs_jsonl(session, project_id, selection, ties)
            return
        records = _rows(session, project_id, shape, selection, ties, prefetch=True)
        yield from _ENCODERS[fmt](records, shape, name)


def _pairs_jsonl(
    session: Session, project_id: int, selection: Selection, ties: bool
) -> Iterator[bytes]:
    """The hot path: pairs as JSONL, a batch at a time, batches read ahead in a worker
    thread."""
    for batch in _prefetch(_batches(session, project_id, selection, "pairs")):
        text = _pair_text(batch, ties)
        if text:
            yield text.encode("utf-8")


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


def _prefetch(items: Iterator[_Batch], depth: int = 2) -> Iterator[_Batch]:
    """Produce `items` in a worker thread, up to `depth` batches ahead of the consumer.

    While this thread turns one batch into bytes, the worker waits on the database for the
    next (psycopg waits without holding the GIL), so the export's wall time approaches the
    larger of the two instead of their sum. The worker alone touches the session until it
    has finished; closing this iterator early (a client that went away) stops it after at
    most one more batch, and an error in the worker is raised here.
    """
    queue: Queue[Any] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(_Failed(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="export-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join()


def digest(session: Session, project_id: int, selection: Selection) -> tuple[int, str]:
    """(rows, sha256) of the selection's canonical pairs JSONL (ties dropped), hashed as it
    streams: what a snapshot records and what :func:`stream` of it reproduces byte for byte."""
    rows = 0
    sha = hashlib.sha256()
    for chunk in _pairs_jsonl(session, project_id, selection, False):
        rows += chunk.count(b"\n")  # JSON escapes newlines inside strings: one per row
        sha.update(chunk)
    return rows, sha.hexdigest()


def save_to_disk(
    session_factory: sessionmaker[Session],
    project_id: int,
    directory: Path,
    *,
    shape: str,
    filters: Mapping[str, Any] | None = None,
    selection: Selection | None = None,
    ties: bool = False,
) -> int:
    """Write the ``hf`` format as a directory that ``datasets.load_from_disk`` opens; returns
    the number of rows. `directory` must not exist or be empty."""
    _check_shape(shape)
    with session_factory() as session:
        read_only(session)
        if selection is None:
            selection = resolve(session, project_id, parse_filters(filters or {}))
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise InvalidInput(f"{directory} is not empty")
        return _write_hf(_rows(session, project_id, shape, selection, ties), shape, directory)


# --- reading ----------------------------------------------------------------------------
#
# The judgments come through one server-side cursor in export order with only their own
# columns (plus the task's prompt and, outside pairs, its completion ids). Each batch then
# looks up what its rows share — prompts, completion texts, usernames — with one query per
# table: a prompt judged by four annotators is read, decoded and JSON-escaped once per batch
# rather than four times, and the decoded JSON columns stay small.


class _JsonText(TypeDecorator[Any]):
    """A JSON column read as text and parsed here. psycopg's own json loader costs several
    times ``json.loads`` of the text (measured on 100,000 rankings: 4.0 s against 0.9 s),
    and the export reads a JSON ranking per judgment."""

    impl = Text
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else _loads(value)


_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    """``json.loads`` without its Python-level wrapping (a quarter of the time for a short
    ranking); anything unusual — surrounding whitespace, invalid text — goes the long way."""
    try:
        value, end = _scan_once(text, 0)
    except StopIteration:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def json_text(column: Any, name: str) -> Any:
    """`column` (JSON) selected as text and decoded by :class:`_JsonText`."""
    return type_coerce(cast(column, Text), _JsonText()).label(name)


@dataclass
class _Prompt:
    """One prompt as the rows show it, with its JSON fragments made on first use."""

    external_id: str
    text: str
    messages: list[dict[str, str]] | None
    metadata: dict[str, Any]
    head: str | None = None
    tail: str | None = None
    ext: str | None = None


@dataclass
class _Batch:
    rows: list[Any]
    prompts: dict[int, _Prompt]
    texts: dict[int, str]
    users: dict[int, str]


def _statement(project_id: int, selection: Selection, shape: str, *, postgres: bool) -> Any:
    """Plain columns (no ORM entities), so nothing piles up in the session's identity map.

    On Postgres (read by :func:`_judgment_batches`' raw cursor) the timestamp comes as ISO
    text formatted by the database, which works on the other core meanwhile. (Unpacking
    plain pairwise rankings into two id columns in SQL as well was measured too: it cost
    the database about 5 s per million rows and saved the export nothing.)
    """
    if postgres:
        created = func.to_char(
            func.timezone("UTC", Judgment.created_at), 'YYYY-MM-DD"T"HH24:MI:SS.US'
        ).label("created_at")
    else:
        created = type_coerce(Judgment.created_at, DateTime()).label("created_at")
    columns: list[Any] = [
        Judgment.id,
        Judgment.task_id,
        Judgment.user_id,
        json_text(Judgment.ranking, "ranking"),
        Judgment.none_acceptable,
        Judgment.strength,
        created,
        Task.prompt_id,
    ]
    if shape != "pairs":
        columns.append(json_text(Task.completion_ids, "completion_ids"))
    if shape == "raw":
        columns += [
            Judgment.rationale,
            json_text(Judgment.display_order, "display_order"),
            Judgment.time_spent_ms,
            Judgment.is_gold,
        ]
    stmt = (
        select(*columns)
        .join(Task, Task.id == Judgment.task_id)
        .where(Judgment.project_id == project_id)
    )
    stmt = _where(stmt, selection)
    if shape == "rankings":
        return stmt.order_by(Judgment.task_id, Judgment.id)
    return stmt.order_by(Judgment.id)


def _where(stmt: Any, selection: Selection) -> Any:
    if selection.since is not None:
        stmt = stmt.where(Judgment.created_at >= selection.since)
    if selection.until is not None:
        stmt = stmt.where(Judgment.created_at < selection.until)
    if selection.user_ids is not None:
        stmt = stmt.where(Judgment.user_id.in_(selection.user_ids))
    if selection.max_judgment_id is not None:
        stmt = stmt.where(Judgment.id <= selection.max_judgment_id)
    return stmt


def _by_ids(session: Session, columns: Sequence[Any], key: Any, ids: Iterable[int]) -> list[Any]:
    """Rows whose `key` is one of `ids`: one ``= ANY(array)`` query on Postgres (a single
    parameter, so psycopg sends no long statement), IN lists of _IN_CHUNK elsewhere."""
    ordered = sorted(set(ids))
    if not ordered:
        return []
    if _is_postgres(session):
        array = bindparam("ids", ordered, type_=ARRAY(BigInteger()))
        return _pg_fetch(session, select(*columns).where(key == any_(array)))
    found: list[Any] = []
    for start in range(0, len(ordered), _IN_CHUNK):
        chunk = ordered[start : start + _IN_CHUNK]
        found += session.connection().execute(select(*columns).where(key.in_(chunk))).all()
    return found


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _judgment_batches(session: Session, stmt: Any) -> Iterator[Sequence[Any]]:
    """The main query's rows, BATCH_ROWS at a time, through a server-side cursor.

    On Postgres the rows come straight from a psycopg named cursor on the session's own
    connection (so in its transaction), as plain named tuples: SQLAlchemy's result rows and
    per-value type hooks cost about as much again as psycopg's own decoding, and this is
    the export's hot loop. The statement is still built and compiled by SQLAlchemy.
    """
    if not _is_postgres(session):
        result = session.connection().execute(stmt.execution_options(yield_per=BATCH_ROWS))
        yield from result.partitions()
        return
    sql, params, make = _pg_compile(session, stmt)
    driver = session.connection().connection.driver_connection
    name = f"prefloop_export_{secrets.token_hex(6)}"  # unique within the transaction
    with driver.cursor(name=name) as cursor:  # type: ignore[union-attr]
        cursor.execute(sql, params)
        while rows := cursor.fetchmany(BATCH_ROWS):
            yield [make(row) for row in rows]


def _pg_fetch(session: Session, stmt: Any) -> list[Any]:
    """All rows of a small query, as :func:`_judgment_batches` makes them."""
    sql, params, make = _pg_compile(session, stmt)
    driver = session.connection().connection.driver_connection
    with driver.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(sql, params)
        return [make(row) for row in cursor.fetchall()]


def _pg_compile(session: Session, stmt: Any) -> tuple[str, Any, Callable[[Any], Any]]:
    """SQL text, parameters, and a row maker: _JsonText columns decoded and the timestamp
    text of :func:`_statement` finished as :func:`iso` writes it."""
    compiled = stmt.compile(
        dialect=session.get_bind().dialect, compile_kwargs={"render_postcompile": True}
    )
    columns = list(stmt.selected_columns)
    names = [c.key for c in columns]
    json_at = [i for i, c in enumerate(columns) if isinstance(c.type, _JsonText)]
    created_at = names.index("created_at") if "created_at" in names else None
    row_type = _row_type(tuple(names))
    if json_at == [3] and created_at == 6 and len(names) == 8:
        # The pairs shape, unrolled, as a plain tuple (its readers unpack it by position).

        def make_pair(r: Any) -> Any:
            return (r[0], r[1], r[2], _loads(r[3]), r[4], r[5], _pg_iso(r[6]), r[7])

        return str(compiled), compiled.params, make_pair
    if not json_at and created_at is None:  # nothing to convert: psycopg's tuples as they are
        return str(compiled), compiled.params, _same
    make_row = row_type._make

    def make_any(row: Any) -> Any:
        row = list(row)
        for i in json_at:
            if row[i] is not None:
                row[i] = _loads(row[i])
        if created_at is not None:
            row[created_at] = _pg_iso(row[created_at])
        return make_row(row)

    return str(compiled), compiled.params, make_any


def _same(row: Any) -> Any:
    return row


def _pg_iso(text: str) -> str:
    """``to_char``'s 'YYYY-MM-DD"T"HH24:MI:SS.US' as :func:`iso` writes the same moment
    (Python leaves out a zero fraction)."""
    return text[:-7] + "Z" if text.endswith(".000000") else text + "Z"


@functools.cache
def _row_type(names: tuple[str, ...]) -> Any:
    return namedtuple("Row", names)  # type: ignore[misc]


def _meta_matches(
    metadata: Mapping[str, Any] | None, wanted: tuple[tuple[str, tuple[str, ...]], ...]
) -> bool:
    metadata = metadata or {}
    return all(key in metadata and meta_text(metadata[key]) in values for key, values in wanted)


def _agreeing_tasks(session: Session, project_id: int, selection: Selection) -> set[int]:
    """Ids of the tasks whose selected judgments agree at least `selection.min_agreement`."""
    assert selection.min_agreement is not None
    stmt = select(Judgment.task_id, json_text(Judgment.ranking, "ranking")).where(
        Judgment.project_id == project_id
    )
    stmt = _where(stmt, selection).order_by(Judgment.task_id, Judgment.id)
    passing: set[int] = set()
    result = session.execute(stmt.execution_options(yield_per=BATCH_ROWS * 5))
    for task_id, group in itertools.groupby(result, key=lambda r: r.task_id):
        value = agreement.task_agreement([r.ranking for r in group])
        if value is not None and value >= selection.min_agreement - 1e-12:
            passing.add(int(task_id))
    return passing


def _batches(
    session: Session, project_id: int, selection: Selection, shape: str
) -> Iterator[_Batch]:
    """The selected judgments in export order, a batch at a time, with what they share.

    Rows are read by position: every shape's first eight columns are _statement's (id,
    task_id, user_id, ranking, none_acceptable, strength, created_at, prompt_id), and on
    Postgres the pairs shape's rows are plain tuples."""
    passing = (
        _agreeing_tasks(session, project_id, selection)
        if selection.min_agreement is not None
        else None
    )
    users: dict[int, str] = {}
    stmt = _statement(project_id, selection, shape, postgres=_is_postgres(session))
    for batch in _judgment_batches(session, stmt):
        if passing is not None:
            batch = [r for r in batch if r[1] in passing]
        prompts = {
            int(pid): _Prompt(
                ext, prompt_text(text, _messages(messages)), _messages(messages), meta or {}
            )
            for pid, ext, text, messages, meta in _by_ids(
                session,
                (
                    Prompt.id,
                    Prompt.external_id,
                    Prompt.text,
                    json_text(Prompt.messages, "messages"),
                    json_text(Prompt.metadata_, "metadata"),
                ),
                Prompt.id,
                (r[7] for r in batch),
            )
        }
        if selection.meta:
            batch = [r for r in batch if _meta_matches(prompts[r[7]].metadata, selection.meta)]
        if not batch:
            continue
        wanted = {c for r in batch for group in r[3] for c in group}
        if shape != "pairs":
            wanted |= {c for r in batch for c in r.completion_ids}
        texts = {
            int(cid): text
            for cid, text in _by_ids(
                session, (Completion.id, Completion.text), Completion.id, wanted
            )
        }
        unknown = {r[2] for r in batch} - users.keys()
        users.update(
            (int(uid), name)
            for uid, name in _by_ids(session, (User.id, User.username), User.id, unknown)
        )
        yield _Batch(list(batch), prompts, texts, users)


def _rows(
    session: Session,
    project_id: int,
    shape: str,
    selection: Selection,
    ties: bool,
    *,
    prefetch: bool = False,
) -> Iterator[dict[str, Any]]:
    """The shape's rows. `prefetch` reads batches in a worker thread (see :func:`_prefetch`);
    only for a session nothing else uses meanwhile."""
    batches = _batches(session, project_id, selection, shape)
    if prefetch:
        batches = _prefetch(batches)
    if shape == "rankings":
        judged = ((r, batch) for batch in batches for r in batch.rows)
        for _, group in itertools.groupby(judged, key=lambda item: item[0].task_id):
            found = list(group)
            yield _ranking_row([r for r, _ in found], found[-1][1])
        return
    build = _pair_rows if shape == "pairs" else _raw_rows
    for batch in batches:
        for r in batch.rows:
            yield from build(r, batch, ties)


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


def iso(moment: datetime | str) -> str:
    """ISO 8601 in UTC with a ``Z``, e.g. ``2024-05-01T12:00:00Z``. Text is taken as already
    written so (the Postgres export path has the database format it)."""
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    elif moment.utcoffset():
        moment = moment.astimezone(UTC)
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _pairs_of(
    ranking: Sequence[Sequence[int]], none_acceptable: bool, ties: bool
) -> list[tuple[int, int, int, bool]]:
    """(chosen, rejected, rank distance, tie) of a judgment: strict pairs, then (with `ties`)
    tied pairs. A "none acceptable" verdict gives none: a completion the annotator called
    unacceptable is no `chosen` to train towards."""
    if none_acceptable:
        return []
    if len(ranking) == 2 and len(ranking[0]) == 1 and len(ranking[1]) == 1:
        return [(ranking[0][0], ranking[1][0], 1, False)]  # the common pairwise verdict
    pairs = [(better, worse, distance, False) for better, worse, distance in to_pairs(ranking)]
    if ties:
        pairs += [(a, b, 0, True) for a, b in tied_pairs(ranking)]
    return pairs


def _margin(strength: int | None, distance: int, tie: bool) -> int:
    """The strength when given, else the rank distance; 0 for a tie."""
    if tie:
        return 0
    return strength if strength is not None else distance


def _pair_rows(r: Any, batch: _Batch, ties: bool) -> Iterator[dict[str, Any]]:
    jid, task_id, user_id, ranking, none_acceptable, strength, created, pid = r
    prompt = batch.prompts[pid]
    created_at = iso(created)
    for better, worse, distance, tie in _pairs_of(ranking, none_acceptable, ties):
        yield {
            "prompt": prompt.text,
            "prompt_messages": prompt.messages,
            "chosen": batch.texts[better],
            "rejected": batch.texts[worse],
            "margin": _margin(strength, distance, tie),
            "tie": tie,
            "prompt_id": prompt.external_id,
            "chosen_id": better,
            "rejected_id": worse,
            "task_id": task_id,
            "judgment_id": jid,
            "annotator": batch.users[user_id],
            "strength": strength,
            "rank_distance": distance,
            "created_at": created_at,
            "metadata": dict(prompt.metadata),
        }


def _pair_text(batch: _Batch, ties: bool) -> str:
    """One batch of the pairs shape as JSONL, built from JSON fragments: each prompt's and
    each completion's text is escaped once per batch instead of once per row, and a whole
    batch is one string. Byte for byte what encoding :func:`_pair_rows`' dicts gives (a test
    holds the two together); the export's hot loop, several times faster than building and
    encoding a dict per row."""
    esc = _escape
    escaped: dict[int, str] = {}
    names: dict[int, str] = {}
    prompts, texts = batch.prompts, batch.texts
    lines: list[str] = []
    add = lines.append
    # Unpacked in _statement's column order: tuple unpacking is cheaper than attributes.
    for jid, task_id, user_id, ranking, none_acceptable, strength, created, pid in batch.rows:
        if none_acceptable:
            continue
        prompt = prompts[pid]
        if prompt.head is None:
            messages = "null" if prompt.messages is None else _compact(prompt.messages)
            prompt.head = f'{{"prompt":{esc(prompt.text)},"prompt_messages":{messages},'
            prompt.tail = f',"metadata":{_compact(prompt.metadata)}}}\n'
            prompt.ext = esc(prompt.external_id)
        annotator = names.get(user_id)
        if annotator is None:
            annotator = names[user_id] = esc(batch.users[user_id])
        created = iso(created)
        null_strength = strength is None
        if len(ranking) == 2 and len(ranking[0]) == 1 and len(ranking[1]) == 1:
            # The plain pairwise verdict: one pair at rank distance 1, in one f-string.
            better, worse = ranking[0][0], ranking[1][0]
            chosen = escaped.get(better)
            if chosen is None:
                chosen = escaped[better] = esc(texts[better])
            rejected = escaped.get(worse)
            if rejected is None:
                rejected = escaped[worse] = esc(texts[worse])
            add(
                f'{prompt.head}"chosen":{chosen},"rejected":{rejected},'
                f'"margin":{1 if null_strength else strength},"tie":false,'
                f'"prompt_id":{prompt.ext},"chosen_id":{better},"rejected_id":{worse},'
                f'"task_id":{task_id},"judgment_id":{jid},"annotator":{annotator},'
                f'"strength":{"null" if null_strength else strength},"rank_distance":1,'
                f'"created_at":"{created}"{prompt.tail}'
            )
            continue
        judged = (
            f'"task_id":{task_id},"judgment_id":{jid},"annotator":{annotator},'
            f'"strength":{"null" if null_strength else strength},"rank_distance":'
        )
        tail = f',"created_at":"{created}"{prompt.tail}'
        for better, worse, distance, tie in _pairs_of(ranking, none_acceptable, ties):
            chosen = escaped.get(better)
            if chosen is None:
                chosen = escaped[better] = esc(texts[better])
            rejected = escaped.get(worse)
            if rejected is None:
                rejected = escaped[worse] = esc(texts[worse])
            add(
                f'{prompt.head}"chosen":{chosen},"rejected":{rejected},'
                f'"margin":{_margin(strength, distance, tie)},'
                f'"tie":{"true" if tie else "false"},"prompt_id":{prompt.ext},'
                f'"chosen_id":{better},"rejected_id":{worse},{judged}{distance}{tail}'
            )
    return "".join(lines)


def _ranking_row(judged: Sequence[Any], batch: _Batch) -> dict[str, Any]:
    """One task: completions in the task's order, the consensus and every ranking as tie
    groups of indices into them. `created_at` is the newest judgment's."""
    first = judged[0]
    prompt = batch.prompts[first.prompt_id]
    ids = [int(c) for c in first.completion_ids]
    index = {cid: i for i, cid in enumerate(ids)}

    def as_indices(ranking: Sequence[Sequence[int]]) -> list[list[int]]:
        return [sorted(index[int(c)] for c in group) for group in ranking]

    summary = agreement.consensus([r.ranking for r in judged])
    return {
        "prompt": prompt.text,
        "prompt_messages": prompt.messages,
        "completions": [batch.texts[c] for c in ids],
        "completion_ids": ids,
        "ranking": as_indices(summary.ranking),
        "consensus_method": summary.method,
        "agreement": agreement.task_agreement([r.ranking for r in judged]),
        "judgments": [
            {
                "judgment_id": r.id,
                "annotator": batch.users[r.user_id],
                "ranking": as_indices(r.ranking),
                "none_acceptable": r.none_acceptable,
                "strength": r.strength,
            }
            for r in judged
        ],
        "prompt_id": prompt.external_id,
        "task_id": first.task_id,
        "created_at": max(iso(r.created_at) for r in judged),
        "metadata": dict(prompt.metadata),
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


def _raw_rows(r: Any, batch: _Batch, ties: bool) -> Iterator[dict[str, Any]]:
    prompt = batch.prompts[r.prompt_id]
    yield {
        "judgment_id": r.id,
        "task_id": r.task_id,
        "prompt_id": prompt.external_id,
        "prompt": prompt.text,
        "prompt_messages": prompt.messages,
        "annotator": batch.users[r.user_id],
        "ranking": [list(g) for g in r.ranking],
        "completions": {str(c): batch.texts[c] for c in r.completion_ids},
        "display_order": list(r.display_order),
        "choice": _choice(r.ranking, r.none_acceptable, r.completion_ids),
        "none_acceptable": r.none_acceptable,
        "strength": r.strength,
        "rationale": r.rationale,
        "time_spent_ms": r.time_spent_ms,
        "is_gold": r.is_gold,
        "created_at": iso(r.created_at),
        "metadata": dict(prompt.metadata),
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


def _encode_jsonl(records: Iterable[dict[str, Any]], shape: str, name: str) -> Iterator[bytes]:
    return _chunked(_compact(r) + "\n" for r in records)


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
    if kind == "float":
        return repr(float(value))
    return json.dumps(value, ensure_ascii=False)


def _encode_csv(records: Iterable[dict[str, Any]], shape: str, name: str) -> Iterator[bytes]:
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


def _tables(records: Iterable[dict[str, Any]], shape: str) -> Iterator[pa.Table]:
    """Arrow tables of up to ROW_GROUP_ROWS rows in the shape's fixed schema.

    Rows are converted ARROW_CHUNK_ROWS at a time, which keeps the Python objects waiting
    for conversion few (measured: 20 MB less peak RSS than converting 10,000 rows at once),
    and the table of record batches still becomes one row group.
    """
    schema = parquet_schema(shape)
    kinds = COLUMNS[shape]
    flat = [name for name, kind in kinds.items() if kind in ("json", "choice")]
    batches: list[pa.RecordBatch] = []
    rows: list[dict[str, Any]] = []
    count = 0
    for record in records:
        for column in flat:
            record[column] = _flat(record[column], kinds[column])
        rows.append(record)
        if len(rows) >= ARROW_CHUNK_ROWS or count + len(rows) >= ROW_GROUP_ROWS:
            batches.append(pa.RecordBatch.from_pylist(rows, schema=schema))
            count += len(rows)
            rows = []
        if count >= ROW_GROUP_ROWS:
            yield pa.Table.from_batches(batches, schema=schema)
            batches, count = [], 0
    if rows:
        batches.append(pa.RecordBatch.from_pylist(rows, schema=schema))
        count += len(rows)
    if count:
        yield pa.Table.from_batches(batches, schema=schema)


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


def _encode_parquet(records: Iterable[dict[str, Any]], shape: str, name: str) -> Iterator[bytes]:
    """Row groups of ROW_GROUP_ROWS rows, each sent as soon as it is written.

    Reading Parquet needs a seekable file (the footer, at the end, indexes the row groups),
    but writing it is append-only: magic bytes, row groups, then the footer at close. So the
    writer goes to a non-seekable in-memory sink that is drained after every row group, and
    memory stays bounded by one row group — no temporary file is needed.
    """
    sink = _Drain()
    writer = pq.ParquetWriter(sink, parquet_schema(shape), compression="zstd")
    try:
        for table in _tables(records, shape):
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            if table.num_rows >= ROW_GROUP_ROWS:  # the last, partial one goes with the footer
                yield sink.take()
    finally:
        writer.close()
    yield sink.take()


def _write_hf(records: Iterable[dict[str, Any]], shape: str, directory: Path) -> int:
    """What ``Dataset.save_to_disk`` writes, with pyarrow alone (the web app does not need
    the ``datasets`` package): one Arrow IPC stream file, ``state.json`` naming it, and
    ``dataset_info.json``. Features are left to ``datasets`` to read off the Arrow schema,
    so any ``datasets`` version maps the types its own way. Deterministic: the fingerprint
    is the data file's sha256, not a random id."""
    count = 0
    sha = hashlib.sha256()
    data_path = directory / HF_DATA_FILE
    with (
        pa.OSFile(str(data_path), "wb") as sink,
        pa.ipc.new_stream(sink, parquet_schema(shape)) as writer,
    ):
        for table in _tables(records, shape):
            writer.write_table(table, max_chunksize=ROW_GROUP_ROWS)
            count += table.num_rows
    with data_path.open("rb") as fh:
        for block in iter(functools.partial(fh.read, CHUNK_BYTES), b""):
            sha.update(block)
    state: dict[str, Any] = {
        "_data_files": [{"filename": HF_DATA_FILE}],
        "_fingerprint": sha.hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    info = {
        "citation": "",
        "description": f"Prefloop preference data, shape {shape!r}.",
        "homepage": "",
        "license": "",
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return count


def _tar_header(name: str, size: int, *, directory: bool = False) -> bytes:
    """A reproducible ustar header: no owner, no timestamp."""
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def _tar_gz(root: Path, name: str) -> Iterator[bytes]:
    """The directory as a .tar.gz, streamed: headers and file blocks go through one gzip
    compressor (zlib's gzip header carries no timestamp or name, so the bytes repeat)."""
    gzip = zlib.compressobj(6, zlib.DEFLATED, 31)

    def pieces() -> Iterator[bytes]:
        yield _tar_header(name + "/", 0, directory=True)
        for path in sorted(root.iterdir()):
            size = path.stat().st_size
            yield _tar_header(f"{name}/{path.name}", size)
            with path.open("rb") as fh:
                yield from iter(functools.partial(fh.read, CHUNK_BYTES), b"")
            if size % tarfile.BLOCKSIZE:
                yield b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    for piece in pieces():
        out = gzip.compress(piece)
        if out:
            yield out
    yield gzip.flush()


def _encode_hf(records: Iterable[dict[str, Any]], shape: str, name: str) -> Iterator[bytes]:
    """The ``hf`` directory as a .tar.gz. The directory is written to a temporary folder
    first (a tar header states each file's size before its bytes), then streamed."""
    with tempfile.TemporaryDirectory(prefix="prefloop-hf-") as tmp:
        root = Path(tmp) / name
        root.mkdir()
        _write_hf(records, shape, root)
        yield from _tar_gz(root, name)


_ENCODERS: dict[str, Callable[[Iterable[dict[str, Any]], str, str], Iterator[bytes]]] = {
    "jsonl": _encode_jsonl,
    "csv": _encode_csv,
    "parquet": _encode_parquet,
    "hf": _encode_hf,
}
