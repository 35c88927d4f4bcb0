"""Users, passwords and API tokens. Passwords use argon2; tokens are stored as sha256 only.

Token authentication runs on every API request (an annotator's `next` and `submit` among
them), so it is one statement: the token joined to its user. Its `last_used_at` is written
at most once per TOKEN_TOUCH_INTERVAL, not on every request: an UPDATE per request cost a
statement and held the token's row lock until the request committed.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Table, bindparam, func, or_, select, update
from sqlalchemy.orm import Session, joinedload

from app.errors import Conflict, InvalidInput, NotAuthenticated, NotFound
from app.models import ApiToken, Role, User, utcnow

TOKEN_PREFIX = "pfl_"
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)
"""How stale a token's `last_used_at` may get before a request writes it again."""
_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(session: Session, username: str, role: Role, password: str | None) -> User:
    """Create a user; a user with no password can only use API tokens.

    Names are unique regardless of case (`Alice` is refused when `alice` exists), checked
    here rather than by an index on lower(username): a database may already hold names that
    differ only in case, and those accounts keep logging in by their exact name. Names are
    ASCII: SQLite's lower() folds ASCII only, and non-ASCII look-alikes ("Аlice" with a
    Cyrillic А) would defeat the point of the check.
    """
    username = username.strip()
    if (
        not username
        or len(username) > 64
        or not username.isascii()
        or not username.replace("-", "").replace("_", "").replace(".", "").isalnum()
    ):
        raise InvalidInput("username must be 1-64 ASCII letters, digits, '.', '-' or '_'")
    if password is not None and len(password) < 8:
        raise InvalidInput("password must be at least 8 characters")
    taken = session.scalar(
        select(User.username).where(func.lower(User.username) == username.lower()).limit(1)
    )
    if taken is not None:
        raise Conflict(f"user {taken!r} already exists (usernames ignore case)")
    user = User(
        username=username,
        role=role,
        password_hash=hash_password(password) if password else None,
        active=True,
    )
    session.add(user)
    session.flush()
    return user


def get_by_name(session: Session, username: str) -> User:
    """The user named exactly `username`, else the one user whose name matches it ignoring
    case (names made before case-insensitive uniqueness may differ only in case: then only
    the exact name finds one)."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        matches = session.scalars(
            select(User).where(func.lower(User.username) == username.lower()).limit(2)
        ).all()
        user = matches[0] if len(matches) == 1 else None
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


def authenticate(session: Session, username: str, password: str) -> User:
    """Check a password; the same error for an unknown user and a wrong password. A paused
    account is told so, but only once its password was right (so the message reveals nothing
    to someone guessing)."""
    user = session.scalar(select(User).where(User.username == username))
    bad = NotAuthenticated("wrong username or password")
    if user is None or not user.password_hash:
        _hasher.hash(password)  # spend the same time as a real check
        raise bad
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        raise bad from None
    if not user.active:
        raise NotAuthenticated("this account is paused; ask an admin to resume it")
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def _get(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    return user


def _keep_an_active_admin(session: Session, user: User, change: str) -> None:
    """Refuse to take away the last active admin (nobody could manage users after it).

    The active admins' rows are locked first, so two admins pausing each other at once are
    serialised on Postgres (the second re-reads and sees one admin left); SQLite has one
    writer at a time anyway.
    """
    if user.role is not Role.admin or not user.active:
        return
    admins = session.scalars(
        select(User.id).where(User.role == Role.admin, User.active.is_(True)).with_for_update()
    ).all()
    if not set(admins) - {user.id}:
        raise Conflict(
            f"{user.username!r} is the last active admin; cannot {change} them "
            "(make or resume another admin first)"
        )


def set_active(session: Session, user_id: int, active: bool, *, by: User | None = None) -> User:
    """Pause or resume a user. `by` is the admin doing it (None from the CLI): nobody pauses
    their own account, and the last active admin is never paused."""
    user = _get(session, user_id)
    if not active:
        if by is not None and by.id == user.id:
            raise Conflict("you cannot pause your own account; another admin can")
        _keep_an_active_admin(session, user, "pause")
    user.active = active
    return user


def set_role(session: Session, user_id: int, role: Role) -> User:
    """Change a user's role; the last active admin is never demoted (demoting yourself is
    fine while another admin is active)."""
    user = _get(session, user_id)
    if role is not Role.admin:
        _keep_an_active_admin(session, user, "demote")
    user.role = role
    return user


def active_admins(session: Session) -> list[User]:
    """Admins who can log in (a paused admin cannot manage anything)."""
    return list(
        session.scalars(
            select(User).where(User.role == Role.admin, User.active.is_(True)).order_by(User.id)
        )
    )


def create_token(session: Session, user: User, name: str) -> str:
    """Create an API token and return its only plaintext copy."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, name=name, token_hash=_hash_token(token)))
    session.flush()
    return token


_TOKEN_USER = (
    select(User, ApiToken.id, ApiToken.last_used_at)
    .join(ApiToken, ApiToken.user_id == User.id)
    .where(ApiToken.token_hash == bindparam("token_hash"), ApiToken.revoked.is_(False))
)
_tokens = cast(Table, ApiToken.__table__)
_TOUCH_TOKEN = (
    update(_tokens)
    .where(
        _tokens.c.id == bindparam("token_id"),
        or_(_tokens.c.last_used_at.is_(None), _tokens.c.last_used_at <= bindparam("stale_before")),
    )
    .values(last_used_at=bindparam("now"))
)
# Built once: auth runs on every API request.


def token_needs_touch(last_used_at: datetime | None, now: datetime) -> bool:
    """Whether a request at `now` should write the token's `last_used_at` again."""
    return last_used_at is None or now - last_used_at >= TOKEN_TOUCH_INTERVAL


def user_for_token(session: Session, token: str, *, now: datetime | None = None) -> User:
    """The active user a live token belongs to, from one statement; NotAuthenticated if the
    token is unknown or revoked or its user is paused."""
    row = session.execute(_TOKEN_USER, {"token_hash": _hash_token(token)}).first()
    if row is None:
        raise NotAuthenticated("invalid or revoked API token")
    if not row[0].active:
        raise NotAuthenticated("this account is paused; ask an admin to resume it")
    user, token_id, last_used_at = row
    now = now or utcnow()
    if token_needs_touch(last_used_at, now):
        # The WHERE repeats the staleness test, so concurrent requests write it once.
        params = {"token_id": token_id, "now": now, "stale_before": now - TOKEN_TOUCH_INTERVAL}
        session.execute(_TOUCH_TOKEN, params)
    return user  # type: ignore[no-any-return]


def user_for_session(session: Session, user_id: int) -> User | None:
    """The active user behind a signed session cookie (one statement), or None."""
    user = session.get(User, user_id)
    return user if user is not None and user.active else None


def list_tokens(session: Session, user_id: int | None = None) -> list[ApiToken]:
    """Tokens (never their secrets, which are not stored), each with its user loaded; one
    user's, or everyone's when `user_id` is None. Oldest first."""
    query = select(ApiToken).options(joinedload(ApiToken.user)).order_by(ApiToken.id)
    if user_id is not None:
        query = query.where(ApiToken.user_id == user_id)
    return list(session.scalars(query))


def revoke_token(
    session: Session, token_id: int, *, by: User | None = None
) -> tuple[ApiToken, bool]:
    """Revoke a token: its next request is refused. Returns the token and whether this call
    revoked it (False: it already was; revoking again changes nothing).

    `by` is the user asking (None from the CLI): anyone may revoke their own tokens, an admin
    anyone's; someone else's token is NotFound, as if it did not exist, so ids reveal nothing.
    """
    row = session.get(ApiToken, token_id)
    if row is None or (by is not None and by.role is not Role.admin and row.user_id != by.id):
        raise NotFound(f"no token {token_id}")
    newly = not row.revoked
    row.revoked = True
    session.flush()
    return row, newly


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))
