"""API tokens for the logged-in user (the CLI's `prefloop token create` does the same)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.deps import CurrentUser, Db
from app.services import users

router = APIRouter(prefix="/api/v1", tags=["auth"])


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)


class TokenOut(BaseModel):
    name: str
    token: str


@router.post("/tokens", status_code=201)
def create_token(body: TokenIn, user: CurrentUser, db: Db) -> TokenOut:
    return TokenOut(name=body.name, token=users.create_token(db, user, body.name))


@router.get("/me")
def me(user: CurrentUser) -> dict[str, object]:
    return {"id": user.id, "username": user.username, "role": user.role.value}
