"""Monitoring as plain functions returning dicts, served as JSON and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import Image, Study
from pipeline.queue import QUEUES, redis_client
from pipeline.redis_server import resolve_redis_url
from pipeline.settings import Settings


def study_counts(session: Session) -> dict[str, int]:
    """Studies by status."""
    rows = session.execute(select(Study.status, func.count(Study.id)).group_by(Study.status))
    return {status: int(n) for status, n in rows}


def image_counts(session: Session) -> dict[str, int]:
    """Images by status."""
    rows = session.execute(select(Image.status, func.count(Image.id)).group_by(Image.status))
    return {status: int(n) for status, n in rows}


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting per lane; None when Redis does not answer."""
    url = resolve_redis_url(settings)
    if url is None:
        return {lane: None for lane in QUEUES}
    client = redis_client(url)
    try:
        return {lane: int(client.llen(name)) for lane, name in QUEUES.items()}
    except Exception:
        return {lane: None for lane in QUEUES}
    finally:
        client.close()


def overview(session: Session, settings: Settings) -> dict[str, Any]:
    """Everything an admin's first glance needs."""
    return {
        "studies": study_counts(session),
        "images": image_counts(session),
        "queues": queue_depths(settings),
    }


ABNORMAL_CLASSES = ("critical", "urgent", "routine")
WAITING_STATES = ("received", "queued", "processing", "done")


def _wait_stats(hours: list[float]) -> dict[str, Any]:
    if not hours:
        return {"n": 0, "mean_h": None, "max_h": None}
    return {
        "n": len(hours),
        "mean_h": round(sum(hours) / len(hours), 2),
        "max_h": round(max(hours), 2),
    }


def waiting_times(session: Session, now: Any) -> dict[str, Any]:
    """How long unread studies in the worklist have waited so far, abnormal vs normal (hours)."""
    from datetime import UTC

    from pipeline.models import Review

    unread = (
        select(Study.triage_class, Study.received_at)
        .where(Study.status.in_(WAITING_STATES))
        .where(~select(Review.id).where(Review.study_id == Study.id).exists())
    )
    groups: dict[str, list[float]] = {"abnormal": [], "normal": [], "unscored": []}
    by_class: dict[str, list[float]] = {c: [] for c in (*ABNORMAL_CLASSES, "normal")}
    for triage_class, received_at in session.execute(unread):
        # SQLite hands back naive datetimes that are UTC by construction.
        received = received_at if received_at.tzinfo else received_at.replace(tzinfo=UTC)
        hours = max(0.0, (now - received).total_seconds() / 3600.0)
        if triage_class is None:
            groups["unscored"].append(hours)
            continue
        groups["abnormal" if triage_class in ABNORMAL_CLASSES else "normal"].append(hours)
        by_class.setdefault(triage_class, []).append(hours)
    doc: dict[str, Any] = {name: _wait_stats(hours) for name, hours in groups.items()}
    doc["by_class"] = {name: _wait_stats(hours) for name, hours in by_class.items()}
    doc["as_of"] = now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return doc
