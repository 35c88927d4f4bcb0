"""Domain exceptions. Services raise these; one handler in ``app.main`` maps them to HTTP."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """Base class: `status` is the HTTP status the API answers with, `code` a stable slug."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotAuthenticated(DomainError):
    status = 401
    code = "not_authenticated"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class InvalidInput(DomainError):
    status = 422
    code = "invalid_input"


class InvalidUpload(DomainError):
    """A file that cannot be imported; `errors` lists every bad line with its reason."""

    status = 422
    code = "invalid_upload"

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message, errors=errors)
        self.errors = errors


class UploadTooLarge(DomainError):
    status = 413
    code = "upload_too_large"


class NoTaskLeft(DomainError):
    status = 204
    code = "no_task_left"


class LeaseExpired(DomainError):
    """The lease ran out and the task no longer needs this judgment."""

    status = 409
    code = "lease_expired"


class AlreadyJudged(DomainError):
    status = 409
    code = "already_judged"
