"""Template rendering: full pages, or one named block when htmx asks (jinja2-fragments)."""

from __future__ import annotations

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
