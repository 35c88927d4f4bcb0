"""The model registry: trained artifacts, their lineage, archives and on-demand scoring.

A ``model_versions`` row points at a ``save_pretrained`` directory under the artifact
directory and records what produced it (job, snapshot, config) and how well it did (metrics).
The web process never imports torch: scoring runs ``python -m worker.score_cli`` in a
subprocess, so a web server without the worker extra still serves the registry and answers
scoring with a clear 503.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import DomainError, InvalidInput, NotFound
from app.models import ModelKind, ModelVersion
from app.services import webhooks

ROOT = Path(__file__).resolve().parent.parent.parent
SCORE_TIMEOUT_S = 120.0
MAX_SCORE_COMPLETIONS = 64
EXIT_MISSING_EXTRA = 3
"""Exit status of ``worker.score_cli`` when torch/transformers are not installed."""
_ARCHIVE_CHUNK = 1 << 20


class ScoringUnavailable(DomainError):
    """The worker extra (torch, transformers) is missing, or the scorer failed or timed out."""

    status = 503
    code = "scoring_unavailable"


def register(
    session: Session,
    *,
    kind: ModelKind,
    artifact_path: str | Path,
    project_id: int | None = None,
    job_id: int | None = None,
    snapshot_id: int | None = None,
    parent_id: int | None = None,
    reward_model_id: int | None = None,
    name: str = "",
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    """Record a finished artifact. Call it in the same transaction that finishes the job,
    so a model version exists exactly when its job succeeded."""
    path = Path(artifact_path)
    if not path.is_dir():
        raise InvalidInput(f"artifact directory {path} does not exist")
    model = ModelVersion(
        kind=kind,
        project_id=project_id,
        job_id=job_id,
        snapshot_id=snapshot_id,
        parent_id=parent_id,
        reward_model_id=reward_model_id,
        name=name or path.name,
        artifact_path=str(path.resolve()),
        config=dict(config or {}),
        metrics=dict(metrics or {}),
        state="ready",
    )
    session.add(model)
    session.flush()
    if project_id is not None:
        webhooks.emit(
            session,
            project_id,
            "model.ready",
            {
                "model_id": model.id,
                "kind": kind.value,
                "parent_id": parent_id,
                "reward_model_id": reward_model_id,
                "snapshot_id": snapshot_id,
            },
        )
    return model


def get(session: Session, model_id: int) -> ModelVersion:
    model = session.get(ModelVersion, model_id)
    if model is None:
        raise NotFound(f"no model {model_id}")
    return model


def list_models(
    session: Session,
    *,
    project_id: int | None = None,
    kind: ModelKind | None = None,
    limit: int = 200,
) -> list[ModelVersion]:
    """Newest first."""
    stmt = select(ModelVersion).order_by(ModelVersion.id.desc()).limit(limit)
    if project_id is not None:
        stmt = stmt.where(ModelVersion.project_id == project_id)
    if kind is not None:
        stmt = stmt.where(ModelVersion.kind == kind)
    return list(session.scalars(stmt))


def latest(session: Session, project_id: int, kind: ModelKind) -> ModelVersion | None:
    stmt = (
        select(ModelVersion)
        .where(ModelVersion.project_id == project_id, ModelVersion.kind == kind)
        .order_by(ModelVersion.id.desc())
        .limit(1)
    )
    return session.scalar(stmt)


def _artifact_dir(model: ModelVersion) -> Path:
    path = Path(model.artifact_path)
    if not path.is_dir():
        raise NotFound(f"model {model.id}'s artifact directory is missing on this server")
    return path


def archive(session: Session, model_id: int) -> tuple[str, Iterator[bytes]]:
    """The model's directory as a .tar.gz: a file name and the bytes, in chunks.

    Built into a temporary file (a model can be hundreds of megabytes, so not in memory)
    when the response starts sending, and deleted when it is done.
    """
    model = get(session, model_id)
    directory = _artifact_dir(model)
    top = f"{model.kind.value}-{model.id}"

    def chunks() -> Iterator[bytes]:
        with tempfile.TemporaryFile() as tmp:
            with tarfile.open(fileobj=tmp, mode="w:gz") as tar:
                tar.add(directory, arcname=top)
            tmp.seek(0)
            while block := tmp.read(_ARCHIVE_CHUNK):
                yield block

    return f"{top}.tar.gz", chunks()


def _worker_extra_installed() -> bool:
    """Cheap check (no import) that this interpreter could run the scorer at all."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def _run_scorer(directory: Path, payload: dict[str, Any], timeout_s: float) -> list[float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "worker.score_cli", str(directory)],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            cwd=str(ROOT),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ScoringUnavailable(
            f"scoring took longer than {timeout_s:.0f} s and was stopped"
        ) from None
    if proc.returncode == EXIT_MISSING_EXTRA:
        raise ScoringUnavailable(
            "scoring needs the worker extra (torch, transformers): pip install 'prefloop[worker]'"
        )
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise ScoringUnavailable(f"the scorer failed: {tail[0]}")
    try:
        scores = json.loads(proc.stdout)["scores"]
    except (ValueError, KeyError, TypeError):
        raise ScoringUnavailable("the scorer returned something that is not a score list") from None
    return [float(s) for s in scores]


def scorable_dir(session: Session, model_id: int) -> Path:
    """The directory of a reward model that can score, or the reason it cannot."""
    model = get(session, model_id)
    if model.kind is not ModelKind.reward:
        raise InvalidInput(
            f"model {model_id} is a {model.kind.value} model; only reward models score"
        )
    return _artifact_dir(model)


def score_dir(
    directory: Path, prompt: str, completions: Sequence[str], *, timeout_s: float = SCORE_TIMEOUT_S
) -> list[float]:
    """One reward per completion from the model in `directory`, computed in a subprocess.

    Needs no database session: callers that can should close their transaction first, since
    loading a model takes seconds (and on SQLite an open transaction blocks writers).
    """
    if not completions:
        raise InvalidInput("send at least one completion")
    if len(completions) > MAX_SCORE_COMPLETIONS:
        raise InvalidInput(f"at most {MAX_SCORE_COMPLETIONS} completions per request")
    if not _worker_extra_installed():
        raise ScoringUnavailable(
            "scoring needs the worker extra (torch, transformers): pip install 'prefloop[worker]'"
        )
    scores = _run_scorer(directory, {"prompt": prompt, "completions": list(completions)}, timeout_s)
    if len(scores) != len(completions):
        raise ScoringUnavailable("the scorer returned the wrong number of scores")
    return scores


def score(
    session: Session,
    model_id: int,
    prompt: str,
    completions: Sequence[str],
    *,
    timeout_s: float = SCORE_TIMEOUT_S,
) -> list[float]:
    """One reward per completion from reward model `model_id` (see `score_dir`)."""
    return score_dir(scorable_dir(session, model_id), prompt, completions, timeout_s=timeout_s)


def curve(metrics: dict[str, Any]) -> list[float]:
    """The training-loss curve stored in a model's metrics, as plain finite floats.

    Trainers store it as ``train_curve`` (a list of numbers or of dicts with a ``loss``) or
    as ``history`` (per-step or per-epoch dicts); whichever is there is used.
    """
    for key in ("train_curve", "history"):
        raw = metrics.get(key)
        if not isinstance(raw, list):
            continue
        values = []
        for point in raw:
            value = point.get("loss", point.get("train_loss")) if isinstance(point, dict) else point
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                values.append(float(value))
        if values:
            return values
    return []


def svg_polyline(values: Sequence[float], width: int = 240, height: int = 60, pad: int = 3) -> str:
    """SVG ``points`` for a line plot of `values` scaled into the box (pure, numbers only)."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    n = len(values)
    step = (width - 2 * pad) / max(n - 1, 1)
    points = []
    for i, v in enumerate(values):
        x = pad + i * step
        y = pad + (hi - v) / span * (height - 2 * pad)
        points.append(f"{x:.1f},{y:.1f}")
    return " ".join(points)
