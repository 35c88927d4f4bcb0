"""Users, passwords and API tokens. Passwords use argon2; tokens are stored as sha256 only."""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotAuthenticated, NotFound
from app.models import ApiToken, Role, User, utcnow

TOKEN_PREFIX = "pfl_"
_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(session: Session, username: str, role: Role, password: str | None) -> User:
    """Create a user; a user with no password can only use API tokens."""
    username = username.strip()
    if (
        not username
        or len(username) > 64
        or not username.replace("-", "").replace("_", "").replace(".", "").isalnum()
    ):
        raise InvalidInput("username must be 1-64 letters, digits, '.', '-' or '_'")
    if password is not None and len(password) < 8:
        raise InvalidInput("password must be at least 8 characters")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise Conflict(f"user {username!r} already exists")
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
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


def authenticate(session: Session, username: str, password: str) -> User:
    """Check a password; the same error for an unknown user and a wrong password."""
    user = session.scalar(select(User).where(User.username == username))
    bad = NotAuthenticated("wrong username or password")
    if user is None or not user.active or not user.password_hash:
        _hasher.hash(password)  # spend the same time as a real check
        raise bad
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        raise bad from None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def set_active(session: Session, user_id: int, active: bool) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    user.active = active
    return user


def create_token(session: Session, user: User, name: str) -> str:
    """Create an API token and return its only plaintext copy."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, name=name, token_hash=_hash_token(token)))
    session.flush()
    return token


def user_for_token(session: Session, token: str) -> User:
    row = session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == _hash_token(token), ApiToken.revoked.is_(False)
        )
    )
    if row is None or not row.user.active:
        raise NotAuthenticated("invalid or revoked API token")
    row.last_used_at = utcnow()
    return row.user


def revoke_token(session: Session, token_id: int) -> None:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no token {token_id}")
    row.revoked = True


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))
