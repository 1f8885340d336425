"""A full disk, recognised wherever it shows: the OS, SQLite, PostgreSQL.

Ingest turns one into ``StorageFull`` before anything is committed, so every source can answer
with the error its protocol has for it (HTTP 507, DICOM 0xA700 out of resources, a message and
exit status 4 from ``cxr-triage ingest``) instead of a generic failure, and the sender keeps the
file to send again once there is space.
"""

from __future__ import annotations

import errno
from typing import Any

SQLITE_FULL = 13
PG_DISK_FULL = "53100"  # SQLSTATE disk_full
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class StorageFull(Exception):
    """Nothing of the file was stored: the disk the database or the upload spool is on is full."""

    def __init__(self, where: str = "the database") -> None:
        super().__init__(
            f"the disk holding {where} is full: the file was not stored; "
            "free space there and send it again"
        )
        self.where = where
        self.report: Any = None  # ingest_paths: what was stored before the disk filled


def is_storage_full(exc: BaseException | None) -> bool:
    """True when exc, or an error it wraps (SQLAlchemy's ``orig``, a cause), is a full disk."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageFull):
            return True
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
            return True
        if "database or disk is full" in str(exc):  # SQLite before Python 3.11 said only this
            return True
        if PG_DISK_FULL in (getattr(exc, "pgcode", None), getattr(exc, "sqlstate", None)):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__
    return False
