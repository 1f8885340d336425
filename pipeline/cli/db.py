"""``cxr-triage db upgrade``: bring the database to the latest schema."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline import migrate
from pipeline.settings import Settings


def register(sub: Any) -> None:
    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("db_cmd", choices=("upgrade",))
    db.set_defaults(handler=cmd_db)


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    migrate.upgrade(settings.db_url)
    print("database is at the latest schema")
    return 0
