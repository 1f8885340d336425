"""Fixtures the monitoring tests share: a migrated database, SQLite and PostgreSQL in turn."""

from __future__ import annotations

import pytest

from pipeline.db import make_engine, make_session_factory
from pipeline.migrate import upgrade


@pytest.fixture
def factory(database_url):  # type: ignore[no-untyped-def]
    upgrade(database_url)
    return make_session_factory(make_engine(database_url))
