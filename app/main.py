"""The web application factory. Everything stateful is built here and hung on ``app.state``."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException
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
from app.web import browser_navigation, error_page, is_api, make_templates

STATIC_DIR = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "prefloop_session"


def _wants_json(request: Request) -> bool:
    """JSON for API clients and for scripts that ask for it (label.js); a page for the rest,
    and for a browser that opens an API address itself (the export page's filter form)."""
    if is_api(request):
        return not browser_navigation(request)
    return "application/json" in request.headers.get("accept", "")


def _login_target(request: Request) -> str:
    """Where to come back to after logging in: the page the user is on. For htmx that is
    the page in the address bar (``HX-Current-URL``), not the fragment it was refreshing;
    only its path and query are kept, so it stays on this site."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    current = request.headers.get("hx-current-url")
    if request.headers.get("hx-request") != "true" or not current:
        return here
    parts = urlsplit(current)
    page = parts.path + (f"?{parts.query}" if parts.query else "")
    if not page.startswith("/") or page.startswith("//") or "\\" in page:
        return here
    return page


def _to_login(request: Request) -> Response:
    """A 303 to the login page; for htmx a 401 with ``HX-Redirect``, so that htmx loads the
    login page in place of the whole page rather than swapping it into a polled section."""
    url = f"/login?next={quote(_login_target(request))}"
    if request.headers.get("hx-request") == "true":
        return Response(status_code=401, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    if exc.status == 204:
        return Response(status_code=204)
    if _wants_json(request):
        body = {"error": exc.code, "detail": exc.message, **exc.details}
        return JSONResponse(body, status_code=exc.status)
    if isinstance(exc, NotAuthenticated):
        return _to_login(request)
    return error_page(request, exc.status, exc.message, details=exc.details)


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404:
        return f"There is no page at {request.url.path}."
    if exc.status_code == 405 and request.method in ("GET", "HEAD"):
        return (
            "This address only receives a submitted form, so it cannot be opened or "
            "reloaded directly. Go back to the page with the form."
        )
    if exc.status_code == 405:
        return f"This address does not accept {request.method} requests."
    return str(exc.detail)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing's own errors (no such address, wrong method) and any HTTPException: a page
    for a browser's navigation, FastAPI's ``{"detail": ...}`` for everyone else."""
    assert isinstance(exc, StarletteHTTPException)
    if not browser_navigation(request):
        return await http_exception_handler(request, exc)
    message = _http_message(request, exc)
    return error_page(request, exc.status_code, message, headers=exc.headers)


LOCATIONS = {
    "path": "In the address, {name}",
    "query": "The parameter {name}",
    "body": "The form field {name}",
    "header": "The header {name}",
    "cookie": "The cookie {name}",
}


def _in_words(error: Mapping[str, Any]) -> str:
    """One validation error as a sentence, e.g. 'The parameter days is "abc": input should
    be a valid integer, unable to parse string as an integer.'"""
    loc = [str(part) for part in error.get("loc", ())]
    where, name = (loc[0], ".".join(loc[1:]) or loc[0]) if loc else ("body", "the request")
    subject = LOCATIONS.get(where, "{name}").format(name=name)
    if error.get("type") == "missing":
        return f"{subject} is missing."
    msg = str(error.get("msg", "is not valid"))
    msg = msg[:1].lower() + msg[1:]
    given = error.get("input")
    if isinstance(given, str | int | float):
        shown = str(given) if len(str(given)) <= 60 else str(given)[:57] + "..."
        return f'{subject} is "{shown}": {msg}.'
    return f"{subject}: {msg}."


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if browser_navigation(request):
        problems = [_in_words(e) for e in exc.errors()]
        return error_page(
            request, 422, "Some values in this request are not valid:", problems=problems
        )
    errors = [
        {"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse(
        {"error": "invalid_input", "detail": "invalid request", "errors": errors}, 422
    )


def _favicon_ico(rows: tuple[str, ...]) -> bytes:
    """A 16x16 32-bit ICO from a picture in characters: '#' white, '.' blue, ' ' clear."""
    colours = {"#": b"\xff\xff\xff\xff", ".": b"\xd6\x59\x24\xff", " ": b"\x00\x00\x00\x00"}
    pixels = b"".join(colours[c] for row in reversed(rows) for c in row)  # BGRA, bottom-up
    mask = bytes(4 * 16)  # the AND mask, unused with an alpha channel
    header = struct.pack("<IiiHHIIiiII", 40, 16, 32, 1, 32, 0, len(pixels) + len(mask), 0, 0, 0, 0)
    image = header + pixels + mask
    return (
        struct.pack("<HHH", 0, 1, 1)
        + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(image), 22)
        + image
    )


FAVICON = _favicon_ico(
    (
        " .............. ",
        "................",
        "....######......",
        "....#######.....",
        "....##...###....",
        "....##....##....",
        "....##....##....",
        "....##...###....",
        "....#######.....",
        "....######......",
        "....##..........",
        "....##..........",
        "....##..........",
        "....##..........",
        "................",
        " .............. ",
    )
)
"""The app's icon, so browsers asking for /favicon.ico get one (the base template names none)."""


async def _favicon() -> Response:
    return Response(FAVICON, media_type="image/x-icon", headers={"Cache-Control": "max-age=86400"})


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
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(DataError, _out_of_range)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/favicon.ico", _favicon, methods=["GET"], include_in_schema=False)
    routers = (ops, auth, api_tokens, projects, labeling, export, jobs, models, users, admin)
    for module in (*routers, quality, snapshots, loop, webhooks, iterations):
        app.include_router(module.router)
    return app
