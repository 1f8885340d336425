"""Accounts: people with passwords and roles, machine feeds with API tokens."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from pipeline.models import PERSON_ROLES, ROLES, SCOPES, User


class UserError(ValueError):
    """An account operation that cannot be done; the message says why."""


def create_user(session: Session, username: str, password: str | None, role: str) -> User:
    """Add an account; usernames are unique, passwords at least 8 characters.

    Machine accounts (feed, monitor) take no password: they cannot log in, only hold a token.
    """
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if not username or len(username) > 80:
        raise UserError("username must be 1 to 80 characters")
    if role not in PERSON_ROLES:
        if password:
            raise UserError(f"a {role} account logs in with a token only: give no password")
        password = secrets.token_urlsafe(32)  # never shown; login is refused anyway
    if password is None or len(password) < 8:
        raise UserError("password must be at least 8 characters")
    if session.scalars(select(User).where(User.username == username)).first():
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=generate_password_hash(password), role=role)
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """Return the active user whose password matches, else None."""
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None or not user.active or user.role not in PERSON_ROLES:
        return None
    if not check_password_hash(user.password_hash, password):
        return None
    return user


def has_scope(role: str, scope: str) -> bool:
    """True when accounts of this role may do ``scope`` (see ``models.SCOPES``)."""
    return scope in SCOPES.get(role, frozenset())


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(session: Session, user: User) -> str:
    """Give the user a new API token (shown once; only its hash is stored)."""
    token = "cxr_" + secrets.token_urlsafe(32)
    user.api_token_hash = _token_hash(token)
    session.flush()
    return token


def user_for_token(session: Session, token: str) -> User | None:
    """Return the active user holding this API token, else None."""
    if not token:
        return None
    user = session.scalars(select(User).where(User.api_token_hash == _token_hash(token))).first()
    return user if user is not None and user.active else None


def has_users(session: Session) -> bool:
    """True once any account exists."""
    return session.scalars(select(User.id).limit(1)).first() is not None
