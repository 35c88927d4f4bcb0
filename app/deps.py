"""Request-scoped dependencies: settings, DB session, the current user, role and CSRF checks.

Routes declare what they need with the ``Annotated`` aliases at the bottom
(``Db``, ``CurrentUser``, ``AdminUser`` …), never by reaching into globals.

FastAPI runs every plain ``def`` dependency in a worker thread, one thread hop each (under
bench/annotate.py's load, anyio's thread hand-offs were still ~12% of a web worker's Python
time at three or four hops per request). So only what does I/O is a ``def``: authentication
(one query) and the commit at the end of the request. Everything else (settings, opening the session, which does no I/O until its
first statement, role and CSRF checks) is ``async def`` and runs on the event loop: a JSON
request makes three hops (auth, the route, the commit) instead of five.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Forbidden, NotAuthenticated
from app.models import Role, User
from app.services import users
from app.settings import Settings

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSRF_SESSION_KEY = "csrf"
CSRF_FORM_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Viewer:
    """Who is looking, as plain values: templates read it even after the request's
    transaction rolled back (an error page), when ORM rows would be expired."""

    id: int
    username: str
    role: Role

    @classmethod
    def of(cls, user: User) -> Viewer:
        return cls(id=user.id, username=user.username, role=user.role)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessionmaker  # type: ignore[no-any-return]


def _commit(session: Session) -> None:
    with session:
        session.commit()


def _rollback(session: Session) -> None:
    with session:
        session.rollback()


async def get_db(request: Request) -> AsyncIterator[Session]:
    """One transaction per request, committed before the response is sent (scope="function")
    and rolled back when the request fails.

    The session is made on the event loop (it touches the database only at its first
    statement, in a thread); the commit or rollback, which does I/O, runs in a thread and is
    shielded, so a cancelled request (a client gone) still hands its connection back.
    """
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    session = factory()
    try:
        yield session
    except BaseException:
        await _finish(session, _rollback)
        raise
    await _finish(session, _commit)


async def _finish(session: Session, end: Callable[[Session], None]) -> None:
    if not session.in_transaction():  # it never touched the database: nothing to send
        session.close()
        return
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(end, session)


Db = Annotated[Session, Depends(get_db, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use; templates put it in every form."""
    token = request.session.get(CSRF_SESSION_KEY)
    if not token:
        token = secrets.token_urlsafe(32)
        request.session[CSRF_SESSION_KEY] = token
    return str(token)


async def check_csrf(request: Request) -> None:
    """Reject an unsafe cookie-authenticated request whose token does not match the session's.

    The token comes from the ``X-CSRF-Token`` header (htmx / fetch) or the ``csrf_token`` form
    field (plain forms, which work without JavaScript).
    """
    if request.method in SAFE_METHODS:
        return
    expected = request.session.get(CSRF_SESSION_KEY)
    sent = request.headers.get(CSRF_HEADER)
    if sent is None:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get(CSRF_FORM_FIELD)
            sent = value if isinstance(value, str) else None
    if not expected or not sent or not hmac.compare_digest(str(expected), sent):
        raise Forbidden("CSRF token missing or invalid; reload the page and try again")


async def _csrf_for_cookie_auth(request: Request) -> None:
    """CSRF applies to cookie sessions only: a bearer token cannot be sent by another site, and
    a request with no session at all is answered 401 by authentication instead."""
    bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
    if not bearer and request.session.get("user_id") is not None:
        await check_csrf(request)


def get_current_user(
    request: Request, db: Db, _csrf: None = Depends(_csrf_for_cookie_auth)
) -> User:
    """Bearer token first, then the signed session cookie; 401 when neither is valid. Either
    way it is one statement (app.services.users)."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        user = users.user_for_token(db, auth[7:].strip())
        request.state.user = Viewer.of(user)
        return user
    user_id = request.session.get("user_id")
    if user_id is None:
        raise NotAuthenticated("log in or send an 'Authorization: Bearer <token>' header")
    found = users.user_for_session(db, int(user_id))
    if found is None:
        request.session.clear()
        raise NotAuthenticated("your session has ended; log in again")
    request.state.user = Viewer.of(found)
    return found


CurrentUser = Annotated[User, Depends(get_current_user)]


def require_role(*roles: Role) -> Callable[[User], Awaitable[User]]:
    """A dependency that lets only the given roles through (403 for the others). It reads
    an already-loaded user, so it runs on the event loop rather than in a thread."""

    async def dependency(user: CurrentUser) -> User:
        if user.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise Forbidden(f"this needs the {allowed} role; you are {user.role.value}")
        return user

    return dependency


AdminUser = Annotated[User, Depends(require_role(Role.admin))]
AnnotatorUser = Annotated[User, Depends(require_role(Role.annotator, Role.admin))]
ExportUser = Annotated[User, Depends(require_role(Role.admin, Role.researcher))]
CsrfChecked = Annotated[None, Depends(check_csrf)]
