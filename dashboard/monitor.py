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
