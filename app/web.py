"""Template rendering: full pages, or one named block when htmx asks (jinja2-fragments)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from jinja2_fragments.fastapi import Jinja2Blocks

from app.deps import csrf_token

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


def make_templates() -> Jinja2Blocks:
    templates = Jinja2Blocks(directory=str(TEMPLATE_DIR))
    templates.env.autoescape = True  # model outputs are untrusted: always escape
    templates.env.globals["csrf_token"] = csrf_token
    return templates


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    *,
    block: str | None = None,
    status_code: int = 200,
) -> Response:
    """Render `name`; if the request comes from htmx and `block` is given, only that block."""
    templates: Jinja2Blocks = request.app.state.templates
    ctx = dict(context or {})
    ctx.setdefault("current_user", getattr(request.state, "user", None))
    if block and request.headers.get("hx-request") == "true":
        return templates.TemplateResponse(
            request, name, ctx, block_name=block, status_code=status_code
        )
    return templates.TemplateResponse(request, name, ctx, status_code=status_code)


# --- error pages ----------------------------------------------------------------------------

PAGES = (
    (r"/projects", "Back to the projects"),
    (r"/projects/\d+", "Back to the project page"),
    (r"/projects/\d+/admin", "Back to the monitor page"),
    (r"/projects/\d+/export", "Back to the export page"),
    (r"/projects/\d+/jobs", "Back to the project's jobs"),
    (r"/projects/\d+/snapshots", "Back to the snapshots"),
    (r"/projects/\d+/quality", "Back to the quality page"),
    (r"/projects/\d+/iterations", "Back to the iterations"),
    (r"/jobs/\d+", "Back to the job"),
    (r"/label", "Back to the labeling queues"),
    (r"/label/\d+", "Go to the next task"),
    (r"/models", "Back to the models"),
    (r"/users", "Back to the users"),
)
"""Pages an error page links back to, with what the link says (the rest link home)."""
API_PREFIX = "/api/v1"


def accept_quality(accept: str, media: str) -> tuple[float, bool]:
    """The quality an Accept header gives `media` by its most specific matching range, and
    whether that range names `media` itself rather than a wildcard."""
    kind = media.partition("/")[0]
    ranges = {media: 2, f"{kind}/*": 1, "*/*": 0}
    best, best_rank = 0.0, -1
    for part in accept.lower().split(","):
        name, *params = (p.strip() for p in part.split(";"))
        rank = ranges.get(name, -1)
        if rank <= best_rank:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best, best_rank = q, rank
    return best, best_rank == 2


def prefers_html(request: Request) -> bool:
    """Whether the Accept header asks for HTML before JSON, as a browser's navigation does
    (``text/html,…,*/*;q=0.8``). curl, requests and TestClient send ``*/*``: not HTML."""
    accept = request.headers.get("accept", "")
    html, html_named = accept_quality(accept, "text/html")
    json_q, json_named = accept_quality(accept, "application/json")
    return html_named and html > 0 and (html > json_q or (html == json_q and not json_named))


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def browser_navigation(request: Request) -> bool:
    """A page the browser itself opens (a link, the address bar, a form), whose error should
    be a page: it asks for HTML first, is no htmx or script request, and on the JSON API is a
    GET (the export page's filter form submits to the API)."""
    if request.headers.get("hx-request") == "true" or not prefers_html(request):
        return False
    return not is_api(request) or request.method in ("GET", "HEAD")


def way_back(request: Request) -> tuple[str, str] | None:
    """The page to go on from after an error: the nearest page at or above the failed
    address, e.g. ``/projects/4`` for a reload of ``/projects/4/settings`` (POST only),
    ``/label/7`` (the next task) for a refused ``POST /label/7/submit``, the export page
    for the export API. A failed GET's own address is skipped: it is what failed."""
    path = request.url.path.rstrip("/")
    own = request.method not in ("GET", "HEAD")
    if path.startswith(API_PREFIX + "/"):
        path, own = path.removeprefix(API_PREFIX), True
    parts = path.split("/")
    for end in range(len(parts), 1, -1):
        candidate = "/".join(parts[:end])
        if end == len(parts) and not own:
            continue
        for pattern, text in PAGES:
            if re.fullmatch(pattern, candidate):
                return candidate, text
    return None


def error_page(
    request: Request,
    status: int,
    message: str,
    *,
    details: dict[str, Any] | None = None,
    problems: list[str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The HTML error page: the message, any problems listed, and links on (the nearest
    page, then home)."""
    back = way_back(request)
    links = [back, ("/", "Home")] if back is not None else [("/", "Home")]
    context = {
        "status": status,
        "message": message,
        "details": details or {},
        "problems": problems or [],
        "links": links,
    }
    response = render(request, "error.html", context, status_code=status)
    response.headers.update(headers or {})
    return response
