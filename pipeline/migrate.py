"""Run the Alembic migrations shipped in the ``migrations`` package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(db_url: str) -> Config:
    """An Alembic config pointing at the shipped scripts and the given database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return cfg


def upgrade(db_url: str, revision: str = "head") -> None:
    """Bring the database schema up to the given revision."""
    from pipeline.db import make_engine

    engine = make_engine(db_url)  # creates the SQLite folder when needed
    engine.dispose()
    command.upgrade(alembic_config(db_url), revision)
