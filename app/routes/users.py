"""Admin user management: list, create, pause and resume accounts, change roles.

The service refuses what would lock everyone out (pausing yourself, pausing or demoting the
last active admin); the page shows those refusals, and bad form values, on the page."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field

from app.deps import AdminUser, Db
from app.errors import Conflict, InvalidInput
from app.models import Role, User
from app.services import users
from app.web import render

router = APIRouter(tags=["users"])


class UserIn(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    role: Role
    password: str | None = Field(default=None, min_length=8)


class RoleIn(BaseModel):
    role: Role


class UserOut(BaseModel):
    id: int
    username: str
    role: Role
    active: bool

    @classmethod
    def of(cls, u: User) -> UserOut:
        return cls(id=u.id, username=u.username, role=u.role, active=u.active)


@router.get("/api/v1/users")
def list_users(db: Db, _admin: AdminUser) -> list[UserOut]:
    return [UserOut.of(u) for u in users.list_users(db)]


@router.post("/api/v1/users", status_code=201)
def create_user(body: UserIn, db: Db, _admin: AdminUser) -> UserOut:
    return UserOut.of(users.create(db, body.username, body.role, body.password))


@router.post("/api/v1/users/{user_id}/pause")
def pause_user(user_id: int, db: Db, admin: AdminUser) -> UserOut:
    """409 for your own account or the last active admin."""
    return UserOut.of(users.set_active(db, user_id, False, by=admin))


@router.post("/api/v1/users/{user_id}/resume")
def resume_user(user_id: int, db: Db, admin: AdminUser) -> UserOut:
    return UserOut.of(users.set_active(db, user_id, True, by=admin))


@router.post("/api/v1/users/{user_id}/role")
def set_role(user_id: int, body: RoleIn, db: Db, _admin: AdminUser) -> UserOut:
    """409 when it would demote the last active admin."""
    return UserOut.of(users.set_role(db, user_id, body.role))


@router.get("/users", include_in_schema=False)
def users_page(request: Request, db: Db, _admin: AdminUser) -> Response:
    return _render(request, db)


def _form_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise InvalidInput(f"role must be one of {allowed}") from None


@router.post("/users", include_in_schema=False)
def users_create_form(
    request: Request,
    db: Db,
    admin: AdminUser,
    username: Annotated[str, Form()] = "",
    role: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
) -> Response:
    """Create from the plain form; a bad value re-renders the page with the message (an empty
    password is refused here: the page makes people, token-only accounts come from the API)."""
    try:
        users.create(db, username, _form_role(role), password)
    except (InvalidInput, Conflict) as exc:
        form = {"username": username, "role": role}
        return _render(request, db, form=form, error=exc.message, status_code=exc.status)
    return RedirectResponse("/users", status_code=303)


@router.post("/users/{user_id}/active", include_in_schema=False)
def users_toggle_form(
    request: Request,
    user_id: int,
    db: Db,
    admin: AdminUser,
    active: Annotated[bool, Form()],
) -> Response:
    """Pause or resume; a refusal (yourself, the last active admin) is shown on the page."""
    try:
        users.set_active(db, user_id, active, by=admin)
    except Conflict as exc:
        return _render(request, db, list_error=exc.message, status_code=exc.status)
    return RedirectResponse("/users", status_code=303)


def _render(
    request: Request,
    db: Db,
    *,
    form: dict[str, str] | None = None,
    error: str | None = None,
    list_error: str | None = None,
    status_code: int = 200,
) -> Response:
    context: dict[str, Any] = {
        "users": users.list_users(db),
        "form": form or {},
        "error": error,
        "list_error": list_error,
    }
    return render(request, "users/index.html", context, status_code=status_code)
