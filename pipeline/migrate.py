"""Run the Alembic migrations shipped in the ``migrations`` package."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import Any

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(db_url: str) -> Any:
    """An Alembic config pointing at the shipped scripts and the given database."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return cfg


@cache
def shipped_heads() -> frozenset[str]:
    """The head revisions of the shipped scripts, read from their source (no Alembic import)."""
    revisions: dict[str, object] = {}
    for script in (MIGRATIONS_DIR / "versions").glob("*.py"):
        values = {}
        for node in ast.parse(script.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                if node.targets[0].id in ("revision", "down_revision"):
                    values[node.targets[0].id] = ast.literal_eval(node.value)
        if "revision" in values:
            revisions[str(values["revision"])] = values.get("down_revision")
    downs: set[object] = set()
    for down in revisions.values():
        downs.update(down if isinstance(down, tuple | list) else (down,))
    return frozenset(r for r in revisions if r not in downs)


def _at_head(engine: Any) -> bool:
    from sqlalchemy import inspect, text

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return False
        current = {row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))}
    return bool(current) and current == set(shipped_heads())


def upgrade(db_url: str, revision: str = "head") -> None:
    """Bring the database schema up to the given revision.

    A database already at the shipped head is left alone without importing Alembic: every
    command calls this, and a command that does not run the network starts in well under a
    second.
    """
    from pipeline.db import make_engine

    engine = make_engine(db_url)  # creates the SQLite folder when needed
    try:
        if revision == "head" and _at_head(engine):
            return
    finally:
        engine.dispose()
    from alembic import command

    command.upgrade(alembic_config(db_url), revision)
