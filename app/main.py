"""The web application factory. Everything stateful is built here and hung on ``app.state``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError
from starlette.middleware.sessions import SessionMiddleware

from app.db import make_engine, make_sessionmaker
from app.errors import DomainError, InvalidInput, NotAuthenticated
from app.routes import (
    admin,
    api_tokens,
    auth,
    export,
    iterations,
    jobs,
    labeling,
    loop,
    models,
    ops,
    projects,
    quality,
    snapshots,
    users,
    webhooks,
)
from app.settings import Settings
from app.web import make_templates, render

STATIC_DIR = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "prefloop_session"


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get(
        "accept", ""
    )


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    if exc.status == 204:
        return Response(status_code=204)
    if _wants_json(request):
        body = {"error": exc.code, "detail": exc.message, **exc.details}
        return JSONResponse(body, status_code=exc.status)
    if isinstance(exc, NotAuthenticated):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
    return render(
        request,
        "error.html",
        {"status": exc.status, "message": exc.message, "details": exc.details},
        status_code=exc.status,
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse(
        {"error": "invalid_input", "detail": "invalid request", "errors": errors}, 422
    )


NUMERIC_VALUE_OUT_OF_RANGE = "22003"
"""The SQLSTATE of Postgres's NumericValueOutOfRange."""
OUT_OF_RANGE = "value out of range: a number in the request is too large for the database"


async def _out_of_range(request: Request, exc: Exception) -> Response:
    """A number too large for its column, e.g. an id above 2**63 in a path, is the client's
    mistake: 422. SQLite's driver raises OverflowError for it; Postgres answers
    NumericValueOutOfRange, which SQLAlchemy wraps in DataError. Other DataErrors stay 500s."""
    if (
        isinstance(exc, DataError)
        and getattr(exc.orig, "sqlstate", None) != NUMERIC_VALUE_OUT_OF_RANGE
    ):
        raise exc
    return await _domain_error(request, InvalidInput(OUT_OF_RANGE))


REQUEST_THREADS = 400
"""Worker threads for sync routes and dependencies, per web process (anyio's default is 40)."""


@asynccontextmanager
async def _enough_threads(_app: FastAPI) -> AsyncIterator[None]:
    """Let every in-flight request have a thread, so none can hold a DB connection while
    queueing for one.

    A request checks out its connection in the auth dependency (one thread hop) and uses it
    again in the route (another hop). With anyio's 40 threads and 200 annotators at once,
    all 40 threads ended up blocked waiting for a pooled connection while every connection
    was held by a request waiting for a thread: pool timeouts after 30 s (bench/annotate.py).
    With a thread for each request, connection holders always run on, and the pool, not the
    thread limiter, is what queues. Idle threads cost next to nothing.
    """
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, REQUEST_THREADS)
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app: engine, sessionmaker, templates, middleware, routes."""
    settings = settings or Settings()
    engine = make_engine(settings)
    app = FastAPI(
        title="Prefloop",
        version="0.1.0",
        docs_url="/docs",
        openapi_url="/openapi.json",
        lifespan=_enough_threads,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.templates = make_templates()

    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.secret_key,
        session_cookie=SESSION_COOKIE,
        max_age=settings.session_max_age_s,
        same_site="lax",
        https_only=settings.cookie_secure,
    )
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(DataError, _out_of_range)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    routers = (ops, auth, api_tokens, projects, labeling, export, jobs, models, users, admin)
    for module in (*routers, quality, snapshots, loop, webhooks, iterations):
        app.include_router(module.router)
    return app
