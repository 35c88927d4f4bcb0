"""Importing existing preference data (e.g. Anthropic HH-RLHF) as an external annotator's
judgments, so a team can start from public data.

One row is ``{"prompt"?, "chosen", "rejected", "id"?, "metadata"?}`` in JSONL or Parquet:

- HH-RLHF style: no ``prompt``; ``chosen`` and ``rejected`` are whole transcripts
  (``"\\n\\nHuman: … \\n\\nAssistant: …"``) that share everything up to the last assistant
  turn. The shared part up to and including the last ``"\\n\\nAssistant:"`` they have in
  common becomes the prompt, and the rest of each is the completion, so
  ``prompt + chosen`` is the original transcript, byte for byte.
- Explicit prompt (TRL's standard format): ``prompt`` is text; when both answers start with
  it (TRL's "implicit prompt" rows) it is cut off them.
- Conversational (TRL): ``prompt`` is a list of ``{role, content}``; ``chosen`` / ``rejected``
  are one assistant message each (a list of one, or the message itself).

Every row becomes a prompt (rows with the same prompt share it; the external id is ``id`` or
a hash of the prompt), two completions (reused when the prompt already has that text), a
task that is already done, and a judgment by the named annotator ranking chosen above
rejected. The annotator is created if missing (role annotator, no password, so nobody can log
in as them) and listed in the project's ``settings["external_annotators"]``; the quality page
marks them. The judgments have no display order and no time (nobody was shown anything), and
client key ``import:<file sha256 prefix>:<line>``.

All or nothing like the prompt upload: every problem is listed with its line (Parquet: row
number) and nothing is written unless the whole file is good. The same file (by sha256)
cannot be imported twice into one project.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, UploadTooLarge
from app.models import (
    Completion,
    Judgment,
    Project,
    Prompt,
    Role,
    Task,
    TaskState,
    User,
    utcnow,
)
from app.services import projects, users
from app.services.prompts import Problems, invalid_upload, jsonl_records
from app.services.quality import EXTERNAL_KEY
from app.settings import Settings

FIELDS = ("id", "prompt", "chosen", "rejected", "metadata")
ASSISTANT = "\n\nAssistant:"
IMPORTS_KEY = "preference_imports"
"""projects.settings key: one record per imported file (sha256, annotator, rows, time)."""
EXTERNAL_ID_MAX = 255
_CHUNK = 500


@dataclass(frozen=True)
class ImportResult:
    rows: int
    prompts_created: int
    completions_created: int
    judgments_created: int
    annotator: str
    annotator_created: bool

    def summary(self) -> str:
        return (
            f"{self.rows} preferences by {self.annotator}: {self.prompts_created} prompts, "
            f"{self.completions_created} completions, {self.judgments_created} judgments created"
        )


@dataclass(frozen=True)
class Preference:
    """One valid row, the prompt split off."""

    line: int
    external_id: str
    text: str | None
    messages: list[dict[str, str]] | None
    chosen: str
    rejected: str
    metadata: dict[str, Any]


# --- parsing (no database) ------------------------------------------------------------------


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen answer, rejected answer) of two HH-RLHF transcripts, or None when their
    shared beginning has no assistant turn to answer."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _answer(value: Any, name: str, bad: Any) -> str | None:
    """A completion: text, or one assistant message (alone or in a list of one)."""
    if isinstance(value, list):
        if len(value) != 1:
            bad(f"{name} must be text or a single assistant message")
            return None
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(
            value.get("content"), str
        ):
            bad(f"{name} must be an assistant message with text content")
            return None
        value = value["content"]
    if not isinstance(value, str):
        bad(f"{name} must be text")
        return None
    return value


def _prompt_messages(value: Any, bad: Any) -> list[dict[str, str]] | None:
    if not value or not all(
        isinstance(m, dict)
        and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str)
        for m in value
    ):
        bad("prompt messages must be a non-empty list of {role, content} with text content")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def validate(record: dict[str, Any], line: int, problems: Problems) -> Preference | None:
    """Check one row and split its prompt off; problems are added, the row returned if none."""
    before = problems.total

    def bad(error: str) -> None:
        problems.add(line, error)

    unknown = sorted(str(k) for k in record if k not in FIELDS)
    if unknown:
        bad(f"unknown field(s) {', '.join(map(repr, unknown))}; put extra data under 'metadata'")
    chosen = _answer(record.get("chosen"), "chosen", bad) if "chosen" in record else None
    rejected = _answer(record.get("rejected"), "rejected", bad) if "rejected" in record else None
    if "chosen" not in record:
        bad("missing chosen")
    if "rejected" not in record:
        bad("missing rejected")
    prompt = record.get("prompt")
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    if chosen is not None and rejected is not None:
        if prompt is None:
            split = split_transcript(chosen, rejected)
            if split is None:
                bad(
                    "no prompt given, and chosen and rejected share no beginning ending in an "
                    "'\\n\\nAssistant:' turn to split it from"
                )
            else:
                text, chosen, rejected = split
        elif isinstance(prompt, str):
            text = prompt
            if chosen.startswith(prompt) and rejected.startswith(prompt):
                chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        elif isinstance(prompt, list):
            messages = _prompt_messages(prompt, bad)
        else:
            bad("prompt must be text or a list of messages")
    for name, value in (("prompt", text), ("chosen", chosen), ("rejected", rejected)):
        if value is not None and not value.strip():
            bad(f"{name} is empty")
        elif value is not None and not _storable(value):
            bad(f"{name} contains a NUL character or invalid Unicode")
    if chosen is not None and rejected is not None and chosen == rejected and chosen.strip():
        bad("chosen and rejected are the same text")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        bad("metadata must be an object")
    raw_id = record.get("id")
    if raw_id is not None and (
        isinstance(raw_id, bool)
        or not isinstance(raw_id, str | int)
        or not str(raw_id).strip()
        or len(str(raw_id)) > EXTERNAL_ID_MAX
    ):
        bad(f"id must be a non-empty string of at most {EXTERNAL_ID_MAX} characters")
    if problems.total > before or chosen is None or rejected is None:
        return None
    if text is None and messages is None:
        return None
    prompt_key = text if text is not None else json.dumps(messages, sort_keys=True)
    external_id = str(raw_id) if raw_id is not None else "pref-" + _sha(prompt_key.encode())[:20]
    return Preference(line, external_id, text, messages, chosen, rejected, metadata)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parquet_records(data: bytes, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        problems.add(0, f"not a readable Parquet file: {exc}")
        return
    line = 0
    for batch in table.to_batches(max_chunksize=2048):
        for values in batch.to_pylist():
            line += 1
            record = {k: v for k, v in values.items() if v is not None}
            if isinstance(record.get("metadata"), str):
                try:
                    record["metadata"] = json.loads(record["metadata"])
                except json.JSONDecodeError:
                    problems.add(line, "metadata: bad JSON")
                    continue
            yield line, record


def parse(filename: str, data: bytes, problems: Problems) -> list[Preference]:
    """Every valid row of the file; every problem goes into `problems`."""
    suffix = PurePath(filename or "").suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        problems.add(0, f"unsupported file type {filename!r}: upload .jsonl or .parquet")
        return []
    reader = _parquet_records if suffix == ".parquet" else jsonl_records
    data = data if suffix == ".parquet" else data.removeprefix(b"\xef\xbb\xbf")
    rows: list[Preference] = []
    prompt_of_id: dict[str, tuple[str | None, str | None, int]] = {}
    seen = False
    for line, record in reader(data, problems):
        seen = True
        row = validate(record, line, problems)
        if row is None:
            continue
        key = (row.text, json.dumps(row.messages, sort_keys=True) if row.messages else None)
        first = prompt_of_id.setdefault(row.external_id, (*key, line))
        if first[:2] != key:
            problems.add(
                line, f"id {row.external_id!r} names a different prompt on line {first[2]}"
            )
            continue
        rows.append(row)
    if not seen and not problems.total:
        problems.add(0, "the file has no rows")
    return rows


# --- writing ---------------------------------------------------------------------------------


def _annotator(session: Session, username: str) -> tuple[User, bool]:
    """The external annotator account, created if missing; a person's account is refused."""
    found = session.scalar(select(User).where(User.username == username.strip()))
    if found is None:
        return users.create(session, username, Role.annotator, None), True
    if found.role is not Role.annotator or found.password_hash:
        raise InvalidInput(
            f"user {username!r} is a person's {found.role.value} account; import under a "
            "new name (it is created as an external annotator without a password)"
        )
    return found, False


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def client_key(project_id: int, file_sha: str, line: int) -> str:
    """The client key of the judgment imported from `line` of a file into a project."""
    return f"import:{project_id}:{file_sha[:24]}:{line}"


def import_file(
    session: Session,
    project_id: int,
    filename: str,
    data: bytes,
    *,
    annotator: str,
    settings: Settings,
) -> ImportResult:
    """Check the whole file, then write prompts, completions, done tasks and judgments.

    The project row is locked before the duplicate check (Postgres; SQLite serializes
    writers anyway), so two imports into one project run one after the other and the second
    sees the first's file in the project's settings. A unique constraint that still fails (a
    prompt id, the annotator's name or a client key written at the same moment by something
    else) is a Conflict, and nothing is written.
    """
    project = projects.get(session, project_id)
    if len(data) > settings.max_upload_bytes:
        raise UploadTooLarge(
            f"{filename or 'the file'} is larger than the limit of "
            f"{settings.max_upload_bytes:,} bytes (split the file and import the parts)"
        )
    if not annotator or not annotator.strip():
        raise InvalidInput("name the annotator the preferences are imported as")
    problems = Problems()
    rows = parse(filename, data, problems)
    if problems.total:
        raise invalid_upload(filename, problems)
    # FOR NO KEY UPDATE: the lock the settings update at the end takes anyway, taken early.
    # It does not hold up judgments written meanwhile (their foreign key takes KEY SHARE).
    session.refresh(project, with_for_update={"key_share": True})
    file_sha = _sha(data)
    imports = list((project.settings or {}).get(IMPORTS_KEY) or [])
    earlier = next((i for i in imports if i.get("sha256") == file_sha), None)
    if earlier is not None:
        raise Conflict(
            f"this file was already imported into project {project_id} "
            f"(as {earlier.get('annotator')!r} at {earlier.get('at')})"
        )
    try:
        with session.begin_nested():
            return _write(session, project, filename, file_sha, rows, annotator)
    except IntegrityError:
        raise Conflict(
            f"importing {filename or 'the file'} into project {project_id} clashed with rows "
            "written at the same moment (a prompt id, the annotator's name or a client key); "
            "nothing was imported, try again"
        ) from None


def _write(
    session: Session,
    project: Project,
    filename: str,
    file_sha: str,
    rows: list[Preference],
    annotator: str,
) -> ImportResult:
    """Write the rows of a checked file (see import_file)."""
    project_id = project.id
    problems = Problems()
    user, created = _annotator(session, annotator)
    now = utcnow()

    # Prompts: reuse the project's by external id (the prompt must be the same), add the rest.
    wanted = sorted({r.external_id for r in rows})
    existing: dict[str, tuple[int, str | None, Any]] = {}
    for chunk in _chunks(wanted):
        for pid, ext, text, messages in session.execute(
            select(Prompt.id, Prompt.external_id, Prompt.text, Prompt.messages).where(
                Prompt.project_id == project_id, Prompt.external_id.in_(chunk)
            )
        ):
            existing[ext] = (int(pid), text, messages)
    for row in rows:
        if row.external_id in existing:
            _, text, messages = existing[row.external_id]
            if (text, messages or None) != (row.text, row.messages):
                problems.add(
                    row.line,
                    f"id {row.external_id!r} exists in this project with a different prompt",
                )
    if problems.total:
        raise invalid_upload(filename, problems)
    prompt_ids = {ext: pid for ext, (pid, _, _) in existing.items()}
    new_prompts: dict[str, Preference] = {}
    for row in rows:
        if row.external_id not in prompt_ids:
            new_prompts.setdefault(row.external_id, row)
    for with_messages in (False, True):
        params = [
            {
                "project_id": project_id,
                "external_id": ext,
                **({"messages": r.messages} if with_messages else {"text": r.text}),
                "metadata_": {"imported": filename, **r.metadata},
                "priority": 0,
                "created_at": now,
            }
            for ext, r in new_prompts.items()
            if (r.messages is not None) == with_messages
        ]
        if params:
            result = session.execute(
                insert(Prompt).returning(
                    Prompt.external_id, Prompt.id, sort_by_parameter_order=True
                ),
                params,
            )
            prompt_ids.update((ext, int(pid)) for ext, pid in result)

    # Completions: one per distinct text per prompt, reusing what the prompt already has.
    texts: dict[tuple[int, str], int] = {}
    for chunk in _chunks(sorted(set(prompt_ids.values()))):
        for cid, pid, body in session.execute(
            select(Completion.id, Completion.prompt_id, Completion.text).where(
                Completion.prompt_id.in_(chunk)
            )
        ):
            texts.setdefault((int(pid), body), int(cid))
    missing = []
    for row in rows:
        pid = prompt_ids[row.external_id]
        for body in (row.chosen, row.rejected):
            if (pid, body) not in texts:
                texts[(pid, body)] = -1
                missing.append(
                    {
                        "prompt_id": pid,
                        "text": body,
                        "source": "import",
                        "metadata_": {"annotator": user.username},
                        "created_at": now,
                    }
                )
    if missing:
        result = session.execute(
            insert(Completion).returning(
                Completion.prompt_id, Completion.text, Completion.id, sort_by_parameter_order=True
            ),
            missing,
        )
        returned: list[Any] = list(result)
        texts.update(((int(pid), body), int(cid)) for pid, body, cid in returned)

    # One done task and one judgment per row.
    pairs = [
        (
            prompt_ids[r.external_id],
            texts[(prompt_ids[r.external_id], r.chosen)],
            texts[(prompt_ids[r.external_id], r.rejected)],
        )
        for r in rows
    ]
    task_ids = [
        int(tid)
        for (tid,) in session.execute(
            insert(Task).returning(Task.id, sort_by_parameter_order=True),
            [
                {
                    "project_id": project_id,
                    "prompt_id": pid,
                    "completion_ids": [chosen, rejected],
                    "required_judgments": 1,
                    "judgment_count": 1,
                    "is_gold": False,
                    "priority": 0,
                    "state": TaskState.done,
                    "created_at": now,
                }
                for pid, chosen, rejected in pairs
            ],
        )
    ]
    session.execute(
        insert(Judgment),
        [
            {
                "project_id": project_id,
                "task_id": task_id,
                "user_id": user.id,
                "ranking": [[chosen], [rejected]],
                "none_acceptable": False,
                "display_order": [],
                "client_key": client_key(project_id, file_sha, row.line),
                "is_gold": False,
                "created_at": now,
            }
            for task_id, (_, chosen, rejected), row in zip(task_ids, pairs, rows, strict=True)
        ],
    )

    record = {
        "sha256": file_sha,
        "filename": filename,
        "annotator": user.username,
        "rows": len(rows),
        "at": now.isoformat(),
    }
    current = project.settings or {}
    project.settings = {
        **current,
        IMPORTS_KEY: [*(current.get(IMPORTS_KEY) or []), record],
        EXTERNAL_KEY: sorted({*(current.get(EXTERNAL_KEY) or []), user.username}),
    }
    session.flush()
    return ImportResult(
        rows=len(rows),
        prompts_created=len(new_prompts),
        completions_created=len(missing),
        judgments_created=len(rows),
        annotator=user.username,
        annotator_created=created,
    )
