"""API input and output models (pydantic). One section per feature; keep sections apart."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

INT32_MAX = 2**31 - 1
"""The largest value of an ``Integer`` column (Postgres ``integer``): a number that lands in
one is bounded here, so a larger one is a 422 naming the field, not a database error."""

# --- projects and prompts ---------------------------------------------------------------


class ProjectIn(BaseModel):
    """A new project; `candidates_per_task` left out means 2 (pairwise) or 4 (ranking)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    mode: Literal["pairwise", "ranking"] = "pairwise"
    instructions: str = Field(default="", max_length=20_000)
    judgments_per_task: StrictInt = 1
    candidates_per_task: StrictInt | None = None
    lease_seconds: StrictInt = 300
    gold_rate: float = 0.0


class ProjectUpdate(BaseModel):
    """The settings to change; the ones left out stay (see projects.update)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    instructions: str | None = Field(default=None, max_length=20_000)
    judgments_per_task: StrictInt | None = None
    lease_seconds: StrictInt | None = None
    gold_rate: float | None = None


class ProjectBrief(BaseModel):
    """What an annotator may see of a project."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    mode: str
    instructions: str


class ProjectOut(ProjectBrief):
    candidates_per_task: int
    judgments_per_task: int
    lease_seconds: int
    gold_rate: float
    created_by: int | None
    created_at: datetime


class TaskCounts(BaseModel):
    open: int
    done: int
    retired: int


class AnnotatorCount(BaseModel):
    user_id: int
    username: str
    judgments: int


class ProjectProgress(BaseModel):
    """Counts from `projects.progress`; `prompts_waiting` have no completions yet."""

    prompts: int
    prompts_waiting: int
    completions: int
    tasks: TaskCounts
    judgments: int
    annotators: list[AnnotatorCount]


class ProjectDetail(ProjectOut):
    progress: ProjectProgress


class ImportOut(BaseModel):
    """What an upload wrote."""

    rows: int
    prompts_created: int
    prompts_updated: int
    completions_created: int
    tasks_created: int
    notes: list[str] = []
    """What to know about what was written, e.g. gold items that the gold rate 0 never serves."""
    summary: str


# --- labeling: tasks and judgments ------------------------------------------------------


class PromptView(BaseModel):
    """A prompt as an annotator sees it: plain text or a chat conversation."""

    id: int
    external_id: str
    text: str | None
    messages: list[Any] | None


class CandidateView(BaseModel):
    id: int
    text: str


class TaskOut(BaseModel):
    """A leased task; `candidates` are in display order (left to right, A first)."""

    task_id: int
    lease_expires_at: datetime
    prompt: PromptView
    candidates: list[CandidateView]
    instructions: str


class LeaseOut(BaseModel):
    lease_expires_at: datetime


class JudgmentIn(BaseModel):
    """Exactly one of `ranking` (tie groups best first: `[id, [id, id], id]`) or `choice`."""

    ranking: list[StrictInt | list[StrictInt]] | None = None
    choice: StrictInt | Literal["tie", "both_bad"] | None = None
    none_acceptable: bool | None = None
    strength: int | None = Field(default=None, ge=1, le=3)
    rationale: str | None = Field(default=None, max_length=10_000)
    client_key: str | None = Field(default=None, min_length=1, max_length=128)
    time_spent_ms: int | None = Field(default=None, ge=0, le=INT32_MAX)


class JudgmentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    task_id: int
    user_id: int
    ranking: list[list[int]]
    none_acceptable: bool
    strength: int | None
    rationale: str | None
    display_order: list[int]
    time_spent_ms: int | None
    client_key: str | None
    created_at: datetime

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        """SQLite returns naive datetimes for stored UTC; say so, as Postgres rows do."""
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# --- export -----------------------------------------------------------------------------

# --- jobs and models --------------------------------------------------------------------


class JobCreate(BaseModel):
    """`kind` is reward, ppo or generate; `params` go to that kind's trainer config.

    Unknown fields are refused: `{"kind": "reward", "epochs": 3}` would otherwise train
    with the default epochs, `epochs` silently dropped.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=32)
    params: dict[str, Any] = Field(default_factory=dict)


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    project_id: int | None
    kind: str
    params: dict[str, Any]
    state: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    attempts: int
    max_attempts: int
    worker_id: str | None
    heartbeat_at: datetime | None
    created_by: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    name: str
    parent_id: int | None
    reward_model_id: int | None
    snapshot_id: int | None
    project_id: int | None
    job_id: int | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    state: str
    created_at: datetime


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ScoreIn(BaseModel):
    """A prompt as text, or as chat messages (rendered as the trainer renders chat prompts:
    one `role: content` line per message), and the completions to score."""

    prompt: str | Annotated[list[ChatMessage], Field(min_length=1)] = Field(max_length=100_000)
    completions: list[str] = Field(min_length=1, max_length=64)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(f"{m.role}: {m.content}" for m in self.prompt)


class ScoreOut(BaseModel):
    scores: list[float]
