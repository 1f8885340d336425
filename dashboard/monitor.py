"""Monitoring as plain functions returning dicts, served as JSON and Prometheus metrics."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from dashboard.monitor_activity import latency_last_hour, problem_studies, throughput_per_minute
from pipeline.models import AuditEvent, Batch, Image, Prediction, Review, Study, User
from pipeline.queue.dispatch import HEARTBEAT_PREFIX, QUEUES, redis_client
from pipeline.queue.locate import resolve_redis_url
from pipeline.settings import Settings
from pipeline.triage.studies import iso


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


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
INFERENCE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS_S = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


def _histogram(session: Session, column: Any, buckets: tuple[float, ...], scale: float) -> dict:
    """Cumulative bucket counts and the sum of a column, computed by the database."""
    counts = [func.sum(case((column <= b * scale, 1), else_=0)) for b in buckets]
    row = session.execute(select(func.count(column), func.sum(column), *counts)).one()
    total, summed, *cumulative = row
    return {
        "buckets": [[b, int(c or 0)] for b, c in zip(buckets, cumulative, strict=True)],
        "count": int(total or 0),
        "sum": float(summed or 0.0) / scale,
    }


def batch_size_histogram(session: Session) -> dict[str, Any]:
    """Forward passes by number of images."""
    return _histogram(session, Batch.size, BATCH_BUCKETS, 1.0)


def inference_seconds_histogram(session: Session) -> dict[str, Any]:
    """Seconds per forward pass (batch)."""
    return _histogram(session, Batch.inference_ms, INFERENCE_BUCKETS_S, 1000.0)


def end_to_end_seconds_histogram(session: Session) -> dict[str, Any]:
    """Seconds from ingest to result, per classified image."""
    return _histogram(session, Image.latency_ms, LATENCY_BUCKETS_S, 1000.0)


def workers_alive(settings: Settings) -> list[dict[str, Any]] | None:
    """Workers whose heartbeat is fresh; None when Redis does not answer."""
    url = resolve_redis_url(settings)
    if url is None:
        return None
    client = redis_client(url)
    try:
        keys = sorted(client.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=100))
        values = client.mget(keys) if keys else []
    except Exception:
        return None
    finally:
        client.close()
    workers = []
    for key, raw in zip(keys, values, strict=True):
        if raw is None:
            continue
        info = json.loads(raw)
        info["name"] = key.decode()[len(HEARTBEAT_PREFIX) :]
        workers.append(info)
    return workers


def overview(session: Session, settings: Settings) -> dict[str, Any]:
    """Everything an admin's first glance needs."""
    return {
        "studies": study_counts(session),
        "images": image_counts(session),
        "queues": queue_depths(settings),
        "workers": workers_alive(settings),
        "batch_size": batch_size_histogram(session),
        "inference_seconds": inference_seconds_histogram(session),
        "end_to_end_seconds": end_to_end_seconds_histogram(session),
    }


def database_counts(session: Session) -> dict[str, int]:
    """Rows per table, for a sense of size."""
    tables = {
        "studies": Study.id,
        "images": Image.id,
        "predictions": Prediction.id,
        "batches": Batch.id,
        "reviews": Review.id,
        "users": User.id,
        "audit_events": AuditEvent.id,
    }
    return {name: int(session.scalar(select(func.count(col))) or 0) for name, col in tables.items()}


def console(session: Session, settings: Settings, model: dict[str, Any], now: datetime) -> dict:
    """The admin console's document: queues, throughput, latency, workers, problems, model."""
    minutes = throughput_per_minute(session, now)
    return {
        "as_of": iso(now),
        "queues": queue_depths(settings),
        "workers": workers_alive(settings),
        "throughput": {"per_minute": minutes, "last_hour": sum(m["done"] for m in minutes)},
        "latency": latency_last_hour(session, now),
        "studies": study_counts(session),
        "images": image_counts(session),
        "problems": problem_studies(session),
        "model": {k: model[k] for k in ("version", "arch", "trained", "thresholds", "file")},
        "database": database_counts(session),
        "store": instance_store(session, settings),
    }


def instance_store(session: Session, settings: Settings) -> dict[str, Any]:
    """The instance store: bytes held against the limit, instances, unread share."""
    from pipeline.store.instances import InstanceStore
    from pipeline.store.retention import store_state

    state = store_state(session, InstanceStore.of(settings))
    state.pop("root")  # a path on the server: not for the page
    state["retention_days"] = settings.store_retention_days
    return state
