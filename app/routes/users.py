"""Admin user management: list, create, pause and resume accounts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field

from app.deps import AdminUser, Db
from app.errors import DomainError
from app.models import Role
from app.services import users
from app.web import render

router = APIRouter(tags=["users"])


class UserIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    role: Role
    password: str | None = Field(default=None, min_length=8)


class UserOut(BaseModel):
    id: int
    username: str
    role: Role
    active: bool


@router.get("/api/v1/users")
def list_users(db: Db, _admin: AdminUser) -> list[UserOut]:
    return [
        UserOut(id=u.id, username=u.username, role=u.role, active=u.active)
        for u in users.list_users(db)
    ]


@router.post("/api/v1/users", status_code=201)
def create_user(body: UserIn, db: Db, _admin: AdminUser) -> UserOut:
    u = users.create(db, body.username, body.role, body.password)
    return UserOut(id=u.id, username=u.username, role=u.role, active=u.active)


@router.post("/api/v1/users/{user_id}/pause")
def pause_user(user_id: int, db: Db, _admin: AdminUser) -> UserOut:
    u = users.set_active(db, user_id, False)
    return UserOut(id=u.id, username=u.username, role=u.role, active=u.active)


@router.post("/api/v1/users/{user_id}/resume")
def resume_user(user_id: int, db: Db, _admin: AdminUser) -> UserOut:
    u = users.set_active(db, user_id, True)
    return UserOut(id=u.id, username=u.username, role=u.role, active=u.active)


@router.get("/users", include_in_schema=False)
def users_page(request: Request, db: Db, _admin: AdminUser) -> Response:
    return render(request, "users/index.html", {"users": users.list_users(db), "error": None})


@router.post("/users", include_in_schema=False)
def users_create_form(
    request: Request,
    db: Db,
    admin: AdminUser,
    username: Annotated[str, Form()],
    role: Annotated[Role, Form()],
    password: Annotated[str, Form()],
) -> Response:
    try:
        users.create(db, username, role, password)
    except DomainError as exc:
        return render(
            request,
            "users/index.html",
            {"users": users.list_users(db), "error": exc.message},
            status_code=exc.status,
        )
    return RedirectResponse("/users", status_code=303)


@router.post("/users/{user_id}/active", include_in_schema=False)
def users_toggle_form(
    user_id: int, db: Db, admin: AdminUser, active: Annotated[bool, Form()]
) -> Response:
    users.set_active(db, user_id, active)
    return RedirectResponse("/users", status_code=303)
