"""``cxr-triage models register FILE --user ADMIN [--note TEXT]`` and ``models list``.

Registering copies the file into the data directory's registry as a candidate (audited); the
console's Models page puts it in shadow, promotes or discards it. ``--json``: one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline import migrate
from pipeline.db import dispose_engines, session_factory
from pipeline.models import AuditEvent, User
from pipeline.settings import Settings
from pipeline.states import Role


def _out(args: argparse.Namespace, doc: dict[str, Any], text: str, code: int = 0) -> int:
    if args.json:
        print(json.dumps(doc))
    else:
        print(text, file=sys.stderr if code else sys.stdout)
    return code


def cmd_register(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.classifier.registry import RegistryError, register

    migrate.upgrade(settings.db_url)
    try:
        with session_factory(settings)() as session:
            user = session.scalars(select(User).where(User.username == args.user)).first()
            if user is None or not user.active or user.role != Role.ADMIN:
                msg = f"--user {args.user!r} is not an active admin account"
                return _out(args, {"ok": False, "error": msg}, f"cxr-triage models: {msg}", 2)
            try:
                row = register(
                    session, Path(args.file), Path(settings.data_dir), user.id, args.note
                )
            except (RegistryError, OSError) as exc:
                session.rollback()
                return _out(args, {"ok": False, "error": str(exc)}, f"cxr-triage models: {exc}", 2)
            session.add(
                AuditEvent(
                    user_id=user.id,
                    action="model_register",
                    target=f"model:{row.version}"[:80],
                    detail=args.note,
                )
            )
            session.commit()
            doc = {"ok": True, "version": row.version, "status": row.status, "path": row.path}
    finally:
        dispose_engines()
    return _out(
        args,
        doc,
        f"registered {doc['version']} as a candidate; the console's Models "
        "page puts it in shadow or promotes it",
    )


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.classifier.registry import listing

    migrate.upgrade(settings.db_url)
    try:
        with session_factory(settings)() as session:
            rows = listing(session)
    finally:
        dispose_engines()
    text = "\n".join(f"{r['version']:<24} {r['status']:<10} {r['registered_at']}" for r in rows)
    return _out(args, {"models": rows}, text or "no model registered (the shipped one is live)")


def register(sub: Any) -> None:
    models = sub.add_parser("models", help="the model registry: register a candidate, list")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    reg = msub.add_parser("register", help="add a weights file as a candidate")
    reg.add_argument("file")
    reg.add_argument("--user", required=True, help="the admin account registering it")
    reg.add_argument("--note", help="what it is (kept with the version)")
    reg.add_argument("--json", action="store_true")
    reg.set_defaults(handler=cmd_register)
    ls = msub.add_parser("list", help="every registered model and its status")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=cmd_list)
