"""Browser login and logout (signed HttpOnly session cookie, CSRF-checked forms)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlparse

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from app.deps import CsrfChecked, CurrentUser, Db
from app.errors import NotAuthenticated
from app.models import Role
from app.services import users
from app.web import render

router = APIRouter(tags=["auth"], include_in_schema=False)


def _safe_next(target: str | None) -> str:
    """Only same-site relative redirects after login."""
    if not target:
        return "/"
    parsed = urlparse(target)
    if parsed.scheme or parsed.netloc or not target.startswith("/") or target.startswith("//"):
        return "/"
    return target


@router.get("/login")
def login_page(request: Request, next: str | None = None) -> Response:
    return render(request, "auth/login.html", {"next": _safe_next(next), "error": None})


@router.post("/login")
def login(
    request: Request,
    db: Db,
    _csrf: CsrfChecked,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str | None, Form()] = None,
) -> Response:
    try:
        user = users.authenticate(db, username, password)
    except NotAuthenticated as exc:
        return render(
            request,
            "auth/login.html",
            {"next": _safe_next(next), "error": exc.message, "username": username},
            status_code=401,
        )
    csrf = request.session.get("csrf")
    request.session.clear()
    request.session["user_id"] = user.id
    if csrf:
        request.session["csrf"] = csrf
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
def logout(request: Request, _csrf: CsrfChecked) -> Response:
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


@router.get("/")
def home(user: CurrentUser) -> Response:
    """Send each role to where its work is."""
    target = {Role.admin: "/projects", Role.researcher: "/projects", Role.annotator: "/label"}
    return RedirectResponse(target[user.role], status_code=303)
