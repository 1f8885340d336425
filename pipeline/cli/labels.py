"""``cxr-triage labels import FILE.csv --user ADMIN``: outcomes from the RIS as ground truth.

Exit 0 when the file was imported (or was already), 1 when a row is bad (nothing imported; each
bad row is listed with its line and why), 2 when the file or the account cannot be used.
``--json`` prints exactly one line on stdout in every case.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline import migrate
from pipeline.db import dispose_engines, session_factory
from pipeline.models import AuditEvent, User
from pipeline.monitoring.labels import LabelFileError, import_labels
from pipeline.settings import Settings
from pipeline.states import Role


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in a bare container
        return "unknown"


def _fail(args: argparse.Namespace, message: str, code: int = 2) -> int:
    if args.json:
        print(json.dumps({"ok": False, "error": message, "imported": 0}))
    else:
        print(f"cxr-triage labels import: {message}", file=sys.stderr)
    return code


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return _fail(args, f"cannot read {path}: {exc.strerror}")
    migrate.upgrade(settings.db_url)
    factory = session_factory(settings)
    try:
        with factory() as session:
            user = session.scalars(select(User).where(User.username == args.user)).first()
            if user is None or not user.active or user.role != Role.ADMIN:
                return _fail(
                    args,
                    f"--user {args.user!r} is not an active admin account; "
                    "an admin runs RIS imports",
                )
            try:
                report = import_labels(session, data, user.id)
            except LabelFileError as exc:
                session.rollback()
                return _fail(args, str(exc))
            digest = hashlib.sha256(data).hexdigest()[:16]
            doc: dict[str, Any] = {**report.as_dict(), "file": path.name, "sha256": digest}
            if report.errors:
                session.rollback()
                detail = f"refused: {len(report.errors)} bad row(s) of {report.rows}"
            else:
                detail = (
                    f"{report.imported} imported ({report.abnormal} abnormal), "
                    f"{report.unchanged} unchanged of {report.rows}"
                )
            session.add(
                AuditEvent(
                    user_id=user.id,
                    action="labels_import",
                    target=f"file:{path.name}"[:80],
                    detail=f"{detail}; sha256 {digest}; os user {_os_user()}",
                )
            )
            session.commit()  # the outcomes and their audit event together, or only the refusal
    finally:
        dispose_engines()
    if args.json:
        print(json.dumps(doc))
    elif report.errors:
        for e in report.errors:
            print(f"{path.name}: row {e.row}: {e.error}", file=sys.stderr)
        print(
            f"nothing imported: {len(report.errors)} bad row(s) of {report.rows}", file=sys.stderr
        )
    else:
        print(
            f"{report.imported} outcome(s) imported ({report.abnormal} abnormal), "
            f"{report.unchanged} already recorded, from {report.rows} row(s)"
        )
    return 1 if report.errors else 0


def register(sub: Any) -> None:
    labels = sub.add_parser("labels", help="ground truth: import outcomes from the RIS")
    labels_sub = labels.add_subparsers(dest="labels_cmd", required=True)
    imp = labels_sub.add_parser(
        "import",
        help="import a CSV (accession_number, abnormal, optional finding); all rows or none",
    )
    imp.add_argument("file", help="CSV with a header: accession_number,abnormal[,finding]")
    imp.add_argument("--user", required=True, help="the admin account running the import")
    imp.add_argument("--json", action="store_true", help="one JSON line on stdout")
    imp.set_defaults(handler=cmd_import)
