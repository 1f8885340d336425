"""Database engines and sessions: one engine per database for the life of a process
(``session_factory``), closed by ``dispose_engines``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from pipeline.settings import Settings


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            # WAL lets the dashboard read while the worker writes.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """Yield a session; commit on success, roll back on error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


_OPENED: set[str] = set()


@cache
def _factory_for(url: str) -> sessionmaker[Session]:
    return make_session_factory(make_engine(url))


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the settings' database; every caller in a process shares one engine."""
    _OPENED.add(settings.db_url)
    return _factory_for(settings.db_url)


def dispose_engines() -> None:
    """Close every pooled connection ``session_factory`` opened (at exit, or in tests)."""
    for url in list(_OPENED):
        _factory_for(url).kw["bind"].dispose()
    _factory_for.cache_clear()
    _OPENED.clear()
