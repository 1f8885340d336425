"""Persist files in transactions: a race is a duplicate, a value the database refuses a rejection."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.imaging import decode as imaging
from pipeline.imaging.decode import Limits
from pipeline.ingest.persist import IngestItem, persist_file, persist_files, record_rejection
from pipeline.profiling import STAGES
from pipeline.storage import StorageFull, is_storage_full

log = logging.getLogger(__name__)


@contextmanager
def full_disk_refused() -> Iterator[None]:
    """Turn a database (or spool) write that hit a full disk into ``StorageFull``.

    The transaction it interrupted is rolled back when its session closes: nothing of the
    file is stored, and the caller says so to the sender.
    """
    try:
        yield
    except StorageFull:
        raise
    except Exception as exc:
        if is_storage_full(exc):
            log.error(
                "the disk holding the database is full (%s): refusing new studies until "
                "there is space",
                type(exc).__name__,
            )
            raise StorageFull() from exc
        raise


def ingest_bytes(
    factory: sessionmaker[Session],
    data: bytes,
    filename: str,
    limits: Limits,
    **kwargs: Any,
) -> IngestItem:
    """Persist one file in its own transaction; a concurrent duplicate is reported as such.

    A value the database refuses (a header field it cannot store) rejects this file with the
    reason; a database that is down raises, so the caller can retry, and one whose disk is
    full raises ``StorageFull`` with nothing stored.
    """
    with full_disk_refused():
        return _ingest_bytes(factory, data, filename, limits, **kwargs)


def _ingest_bytes(
    factory: sessionmaker[Session],
    data: bytes,
    filename: str,
    limits: Limits,
    **kwargs: Any,
) -> IngestItem:
    session = factory()
    try:
        try:
            item = persist_file(session, data, filename, limits, **kwargs)
            session.commit()
            return item
        except IntegrityError:
            session.rollback()
            item = persist_file(session, data, filename, limits, **kwargs)
            session.commit()
            return item
    except DataError as exc:
        session.rollback()
        log.warning("a header value could not be stored (%s)", type(exc.orig).__name__)
        reason = "the file's header holds values the database cannot store"
        item = record_rejection(
            session,
            imaging.content_key(data),
            filename,
            reason,
            kwargs.get("source", "cli"),
            kwargs.get("lane", "live"),
        )
        session.commit()
        return item
    finally:
        session.close()


def ingest_many(
    factory: sessionmaker[Session],
    files: list[tuple[bytes, str]],
    limits: Limits,
    **kwargs: Any,
) -> list[IngestItem]:
    """Persist several files in one transaction: one commit for the lot.

    A unique-key conflict (the same file arriving through another process at the same moment)
    or a value the database refuses rolls the lot back and persists each file in its own
    transaction, where the conflict is reported as a duplicate and the bad file alone is
    rejected. Other errors (the database down) propagate with nothing committed; a full disk
    as ``StorageFull``.
    """
    session = factory()
    try:
        with full_disk_refused(), STAGES.time("sql", len(files)):
            items = persist_files(session, files, limits, **kwargs)
            session.commit()
        return items
    except (IntegrityError, DataError):
        session.rollback()
    finally:
        session.close()
    return [ingest_bytes(factory, data, name, limits, **kwargs) for data, name in files]
