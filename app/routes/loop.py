"""The RLHF loop's settings: retrain every N judgments, PPO after reward, generate after PPO,
and which tasks annotators get first (the active-learning strategy)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.deps import AdminUser, Db
from app.domain.active import AssignmentStrategy
from app.services import chaining

router = APIRouter(tags=["loop"])


class LoopSettings(BaseModel):
    """The project's loop settings (every field, defaults filled in)."""

    reward_every_n_judgments: int | None = Field(
        description="queue a reward job after this many new judgments; null: never"
    )
    ppo_after_reward: bool = Field(description="a new reward model starts a PPO job")
    generate_after_policy: bool = Field(description="a new policy starts a generate job")
    reward_params: dict[str, Any] = Field(description="params of scheduled reward jobs")
    ppo_params: dict[str, Any] = Field(description="params of chained PPO jobs")
    generate_params: dict[str, Any] = Field(
        description="params of chained generate jobs (prompts default to heldout)"
    )
    assignment_strategy: AssignmentStrategy = Field(
        description="task order: default (partly judged, then priority), uncertainty (the "
        "reward model's closest calls first) or disagreement (main vs held-out model)"
    )
    random_share: float = Field(
        description="share of claims that ignore the strategy and use the default order"
    )


class LoopUpdate(BaseModel):
    """The settings to change; fields left out keep their value, null turns N off."""

    # strict: "yes" is not true and true is not 1 (a retrain after every judgment)
    model_config = ConfigDict(extra="forbid", strict=True)

    reward_every_n_judgments: int | None = Field(default=None, ge=1, le=10_000_000)
    ppo_after_reward: bool | None = None
    generate_after_policy: bool | None = None
    reward_params: dict[str, Any] | None = None
    ppo_params: dict[str, Any] | None = None
    generate_params: dict[str, Any] | None = None
    assignment_strategy: AssignmentStrategy | None = Field(default=None, strict=False)
    random_share: float | None = Field(default=None, ge=0, le=1)


@router.get("/api/v1/projects/{project_id}/loop")
def get_loop(project_id: int, db: Db, user: AdminUser) -> LoopSettings:
    return LoopSettings.model_validate(chaining.get_loop(db, project_id))


@router.put("/api/v1/projects/{project_id}/loop")
def put_loop(project_id: int, body: LoopUpdate, db: Db, user: AdminUser) -> LoopSettings:
    """Change the fields sent; answers with every setting."""
    changes = body.model_dump(exclude_unset=True)
    return LoopSettings.model_validate(chaining.update_loop(db, project_id, changes))
