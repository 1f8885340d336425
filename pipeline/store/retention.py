"""The instance store's bounds: expiring read studies and orphan files, and its state."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.models import Instance, Review, Study, utcnow
from pipeline.settings import Settings
from pipeline.store.instances import InstanceStore

log = logging.getLogger(__name__)


def _read() -> Any:
    return exists().where(Review.study_id == Study.id)


def expire(
    factory: sessionmaker[Session],
    store: InstanceStore,
    settings: Settings,
    now: datetime | None = None,
    orphan_age_s: float = 3600.0,
) -> dict[str, int]:
    """Delete what retention allows: read studies past the retention, then, while the store
    is over its size limit, the oldest read studies. Unread studies are never touched.
    Files no row names (a crash between write and commit) older than an hour go too."""
    now = now or utcnow()
    cutoff = now - timedelta(days=settings.store_retention_days)
    counts = {"studies": 0, "instances": 0, "bytes": 0, "orphans": 0}
    with session_scope(factory) as session:
        has_instances = exists().where(Instance.study_id == Study.id)
        old = list(
            session.scalars(
                select(Study.id)
                .where(_read(), has_instances, Study.received_at < cutoff)
                .order_by(Study.received_at)
            )
        )
        total = store.usage(session, fresh=True)
        over = total - store.max_bytes
        if over > 0:
            oldest_read = session.execute(
                select(Study.id, func.sum(Instance.size))
                .join(Instance, Instance.study_id == Study.id)
                .where(_read(), Study.id.not_in(old or [-1]))
                .group_by(Study.id, Study.received_at)
                .order_by(Study.received_at)
            ).all()
            freed = (
                int(
                    session.scalar(
                        select(func.coalesce(func.sum(Instance.size), 0)).where(
                            Instance.study_id.in_(old)
                        )
                    )
                    or 0
                )
                if old
                else 0
            )
            for study_id, size in oldest_read:
                if freed >= over:
                    break
                old.append(study_id)
                freed += int(size or 0)
    for start in range(0, len(old), 200):
        chunk = old[start : start + 200]
        with session_scope(factory) as session:
            rows = session.execute(
                select(Instance.path, Instance.size).where(Instance.study_id.in_(chunk))
            ).all()
            session.execute(delete(Instance).where(Instance.study_id.in_(chunk)))
        for rel, size in rows:  # rows first: a crash here leaves files, which go as orphans
            store.remove(rel)
            counts["instances"] += 1
            counts["bytes"] += int(size)
        counts["studies"] += len(chunk)
    counts["orphans"] = _orphans(factory, store, orphan_age_s)
    with session_scope(factory) as session:
        store.usage(session, fresh=True)
    if counts["studies"] or counts["orphans"]:
        log.info(
            "instance store: expired %d instances of %d read studies (%.1f MB), %d orphans",
            counts["instances"],
            counts["studies"],
            counts["bytes"] / 1e6,
            counts["orphans"],
        )
    return counts


def _orphans(factory: sessionmaker[Session], store: InstanceStore, age_s: float) -> int:
    cutoff = time.time() - age_s
    candidates = [rel for rel, mtime in store.files() if mtime < cutoff]
    removed = 0
    for start in range(0, len(candidates), 500):
        chunk = candidates[start : start + 500]
        with session_scope(factory) as session:
            named = set(session.scalars(select(Instance.path).where(Instance.path.in_(chunk))))
        for rel in chunk:
            if rel not in named:
                store.remove(rel)
                removed += 1
    return removed


def store_state(session: Session, store: InstanceStore) -> dict[str, Any]:
    """What the admin console shows: size, limit, counts, unread share."""
    total = store.usage(session, fresh=True)
    instances = int(session.scalar(select(func.count(Instance.id))) or 0)
    studies = int(session.scalar(select(func.count(func.distinct(Instance.study_id)))) or 0)
    unread = int(
        session.scalar(
            select(func.coalesce(func.sum(Instance.size), 0))
            .join(Study, Study.id == Instance.study_id)
            .where(~_read())
        )
        or 0
    )
    return {
        "bytes": total,
        "limit_bytes": store.max_bytes,
        "used_share": round(total / store.max_bytes, 4) if store.max_bytes else 0.0,
        "instances": instances,
        "studies": studies,
        "unread_bytes": unread,
        "root": str(store.root),
    }
