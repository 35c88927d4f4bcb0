"""Request-scoped dependencies: settings, DB session, the current user, role and CSRF checks.

Routes declare what they need with the ``Annotated`` aliases at the bottom
(``Db``, ``CurrentUser``, ``AdminUser`` …), never by reaching into globals.

FastAPI runs every plain ``def`` dependency in a worker thread, one thread hop each (under
bench/annotate.py's load, anyio's thread hand-offs were still ~12% of a web worker's Python
time at three or four hops per request). So only what does I/O is a ``def``: authentication
(one query) and the commit at the end of the request. Everything else (settings, opening
the session, which does no I/O until its first statement, role and CSRF checks) is
``async def`` and runs on the event loop: a request makes three hops (auth, the route, the
commit) instead of five.

The labeling API's hot routes (``tasks/next`` and posting a judgment) go further with
``AnnotatorWork`` (`OneHop`): authentication, the route's work and the commit in one
thread, with at most as many such requests in threads as the pool has connections.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from app.db import POOL_CONNECTIONS, transaction
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


@dataclass(frozen=True)
class Credentials:
    """What a request presents, read without the database: a bearer token, or the user id
    from the signed session cookie (already CSRF-checked for unsafe methods)."""

    token: str | None = None
    session_user_id: int | None = None


async def get_credentials(
    request: Request, _csrf: None = Depends(_csrf_for_cookie_auth)
) -> Credentials:
    """Bearer token first, then the session cookie; 401 when there is neither."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return Credentials(token=auth[7:].strip())
    user_id = request.session.get("user_id")
    if user_id is None:
        raise NotAuthenticated("log in or send an 'Authorization: Bearer <token>' header")
    return Credentials(session_user_id=int(user_id))


class _SessionEnded(NotAuthenticated):
    """The cookie names a user who is gone or paused: the cookie session is cleared."""


def _authenticate(request: Request, db: Session, credentials: Credentials) -> User:
    """The user behind `credentials`, from one statement (app.services.users)."""
    if credentials.token is not None:
        user = users.user_for_token(db, credentials.token)
    else:
        assert credentials.session_user_id is not None
        found = users.user_for_session(db, credentials.session_user_id)
        if found is None:
            raise _SessionEnded("your session has ended; log in again")
        user = found
    request.state.user = Viewer.of(user)
    return user


def get_current_user(
    request: Request, db: Db, credentials: Annotated[Credentials, Depends(get_credentials)]
) -> User:
    """The authenticated user; 401 when the token or session is not valid."""
    try:
        return _authenticate(request, db, credentials)
    except _SessionEnded:
        request.session.clear()
        raise


CurrentUser = Annotated[User, Depends(get_current_user)]


def _check_role(user: User, roles: tuple[Role, ...]) -> None:
    if user.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise Forbidden(f"this needs the {allowed} role; you are {user.role.value}")


def require_role(*roles: Role) -> Callable[[User], Awaitable[User]]:
    """A dependency that lets only the given roles through (403 for the others). It reads
    an already-loaded user, so it runs on the event loop rather than in a thread."""

    async def dependency(user: CurrentUser) -> User:
        _check_role(user, roles)
        return user

    return dependency


T = TypeVar("T")


@dataclass(frozen=True)
class OneHop:
    """A request's whole database work (authentication, the route's work, the commit) in one
    worker thread and one transaction, for the labeling API's hot routes.

    The usual dependencies make three thread hops per request (auth, route, commit), and a
    request holds its pooled connection from the first to the last, so the thread limiter
    must stay above the number of requests in flight (app.main._enough_threads) and under
    200 annotators some 200 threads contend for 30 connections and the GIL. Here a request
    waits on the event loop for one of `limiter`'s tokens (as many as the pool has
    connections), then takes its connection, does everything, and gives both back: a
    token holder never waits on another request, so there is nothing to deadlock on.
    """

    request: Request
    credentials: Credentials
    roles: tuple[Role, ...]

    async def run(self, work: Callable[[Session, User], T]) -> T:
        """`work(db, user)` in a thread; committed if it returns, rolled back if it raises."""
        state = self.request.app.state
        limiter = getattr(state, "db_limiter", None)
        if limiter is None:  # made on the event loop, at the first such request
            limiter = state.db_limiter = anyio.CapacityLimiter(POOL_CONNECTIONS)
        try:
            return await anyio.to_thread.run_sync(
                self._in_thread, state.sessionmaker, work, limiter=limiter
            )
        except _SessionEnded:
            self.request.session.clear()
            raise

    def _in_thread(self, factory: sessionmaker[Session], work: Callable[[Session, User], T]) -> T:
        with transaction(factory) as db:
            user = _authenticate(self.request, db, self.credentials)
            _check_role(user, self.roles)
            return work(db, user)


def one_hop(*roles: Role) -> Callable[..., Awaitable[OneHop]]:
    async def dependency(
        request: Request, credentials: Annotated[Credentials, Depends(get_credentials)]
    ) -> OneHop:
        return OneHop(request, credentials, roles)

    return dependency


AdminUser = Annotated[User, Depends(require_role(Role.admin))]
AnnotatorUser = Annotated[User, Depends(require_role(Role.annotator, Role.admin))]
ExportUser = Annotated[User, Depends(require_role(Role.admin, Role.researcher))]
AnnotatorWork = Annotated[OneHop, Depends(one_hop(Role.annotator, Role.admin))]
CsrfChecked = Annotated[None, Depends(check_csrf)]
