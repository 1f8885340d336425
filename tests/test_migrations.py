"""Alembic: one head, and the migrated schema equals the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from pipeline import tables_registry, tables_results  # noqa: F401 - their tables join Base
from pipeline.db import make_engine
from pipeline.migrate import alembic_config, upgrade
from pipeline.models import Base


def test_single_head() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


def test_migrated_schema_equals_models(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            tables = set(inspect(conn).get_table_names())
        assert diff == []
        assert {"studies", "images", "predictions", "reviews", "users", "audit_events"} <= tables
        upgrade(database_url)  # idempotent: a second run is a no-op
    finally:
        engine.dispose()
