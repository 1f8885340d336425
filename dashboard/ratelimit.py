"""Login rate limit: five failed attempts per username and address in five minutes, then 429.

Failures are counted from the audit log in the database, not in process memory, so every
gunicorn worker and every dashboard replica sees the same count; the audit log also shows
admins who was guessing. A successful login from the same address starts the count afresh.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import AuditEvent, as_utc

MAX_FAILURES = 5
WINDOW_S = 300
FAILED, SUCCEEDED = "login_failed", "login"


def login_target(username: str) -> str:
    """The audit target naming the account a login was for (usernames are not PHI)."""
    return f"user:{username}"[:80]


def retry_after_s(
    session: Session,
    username: str,
    remote_addr: str | None,
    now: datetime,
    max_failures: int = MAX_FAILURES,
    window_s: int = WINDOW_S,
) -> int | None:
    """Seconds until this username may try again from this address; None when it may now."""
    target = login_target(username)
    since = now - timedelta(seconds=window_s)
    last_ok = session.scalar(
        select(func.max(AuditEvent.created_at)).where(
            AuditEvent.action == SUCCEEDED,
            AuditEvent.target == target,
            AuditEvent.remote_addr == remote_addr,
        )
    )
    if last_ok is not None and as_utc(last_ok) > since:
        since = as_utc(last_ok)
    failures = session.scalars(
        select(AuditEvent.created_at)
        .where(
            AuditEvent.action == FAILED,
            AuditEvent.target == target,
            AuditEvent.remote_addr == remote_addr,
            AuditEvent.created_at > since,
        )
        .order_by(AuditEvent.created_at.desc())
        .limit(max_failures)
    ).all()
    if len(failures) < max_failures:
        return None
    # Allowed again once the oldest of the last max_failures failures leaves the window.
    free_at = as_utc(failures[-1]) + timedelta(seconds=window_s)
    return max(1, math.ceil((free_at - now).total_seconds()))
