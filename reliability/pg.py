"""A PostgreSQL database of the run's own, created on the given server and dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager


def _plain(url: str) -> str:
    """A libpq URL (psycopg) from a SQLAlchemy one."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def reachable(admin_url: str) -> str | None:
    """None when the server answers, else why not."""
    import psycopg

    try:
        psycopg.connect(_plain(admin_url), connect_timeout=3).close()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"


@contextmanager
def temporary_database(admin_url: str) -> Iterator[str]:
    """Yield a SQLAlchemy URL of a fresh database on admin_url's server; drop it at the end."""
    import psycopg

    name = f"cxr_reliability_{uuid.uuid4().hex[:10]}"
    conn = psycopg.connect(_plain(admin_url), autocommit=True, connect_timeout=5)
    conn.execute(f'CREATE DATABASE "{name}"')
    base = _plain(admin_url).rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
