"""Monitoring as plain functions returning dicts, served as JSON and Prometheus metrics."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from pipeline.models import AuditEvent, Batch, Image, Prediction, Review, Study, User, as_utc
from pipeline.queue.dispatch import HEARTBEAT_PREFIX, QUEUES, redis_client
from pipeline.queue.redis_server import resolve_redis_url
from pipeline.queue.requeue import requeueable_image_ids
from pipeline.settings import Settings
from pipeline.states import ACTIVE_STATES, State
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


ABNORMAL_CLASSES = ("critical", "urgent", "routine")
WAITING_STATES = (*ACTIVE_STATES, State.DONE)


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
    unread = (
        select(Study.triage_class, Study.received_at)
        .where(Study.status.in_(WAITING_STATES))
        .where(~select(Review.id).where(Review.study_id == Study.id).exists())
    )
    groups: dict[str, list[float]] = {"abnormal": [], "normal": [], "unscored": []}
    by_class: dict[str, list[float]] = {c: [] for c in (*ABNORMAL_CLASSES, "normal")}
    for triage_class, received_at in session.execute(unread):
        received = as_utc(received_at)
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


WINDOW_MIN = 60


def _minute(dt: datetime) -> datetime:
    return as_utc(dt).replace(second=0, microsecond=0)


def throughput_per_minute(session: Session, now: datetime) -> list[dict[str, Any]]:
    """Images finished (done or failed) in each of the last 60 minutes, oldest first."""
    end = _minute(now) + timedelta(minutes=1)
    start = end - timedelta(minutes=WINDOW_MIN)
    rows = session.execute(
        select(Image.done_at, Image.status).where(
            Image.done_at >= start, Image.status.in_((State.DONE, State.FAILED))
        )
    )
    done, failed = [0] * WINDOW_MIN, [0] * WINDOW_MIN
    for done_at, status in rows:
        if done_at is None:  # not selected (done_at >= start), but the column is nullable
            continue
        slot = int((_minute(done_at) - start).total_seconds() // 60)
        if 0 <= slot < WINDOW_MIN:
            (done if status == State.DONE else failed)[slot] += 1
    return [
        {"minute": iso(start + timedelta(minutes=i)), "done": done[i], "failed": failed[i]}
        for i in range(WINDOW_MIN)
    ]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0-100): always a value that was observed."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_last_hour(session: Session, now: datetime) -> dict[str, Any]:
    """Ingest-to-result latency of the images finished in the last hour: n, p50, p95 (ms)."""
    since = now - timedelta(minutes=WINDOW_MIN)
    values = [
        float(v)
        for v in session.scalars(
            select(Image.latency_ms).where(Image.done_at >= since, Image.latency_ms.is_not(None))
        )
        if v is not None
    ]
    p50, p95 = percentile(values, 50), percentile(values, 95)
    return {
        "n": len(values),
        "p50_ms": None if p50 is None else round(p50, 1),
        "p95_ms": None if p95 is None else round(p95, 1),
    }


def problem_studies(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """Failed and rejected studies, newest first, with their reasons and whether re-runnable."""
    rows = session.scalars(
        select(Study)
        .where(Study.status.in_((State.FAILED, State.REJECTED)))
        .order_by(Study.updated_at.desc(), Study.id.desc())
        .limit(limit)
    ).all()
    rerun = requeueable_image_ids(session, [s.id for s in rows])
    return [
        {
            "id": s.id,
            "status": s.status,
            "reason": s.reason,
            "source": s.source,
            "accession_number": s.accession_number,
            "received_at": iso(s.received_at),
            "requeueable": s.status == State.FAILED and bool(rerun.get(s.id)),
        }
        for s in rows
    ]


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
    from pipeline.store.instances import InstanceStore, store_state

    state = store_state(session, InstanceStore.of(settings))
    state.pop("root")  # a path on the server: not for the page
    state["retention_days"] = settings.store_retention_days
    return state


def audit_log(
    session: Session, page: int = 1, per_page: int = 50, action: str | None = None
) -> dict[str, Any]:
    """Audit events newest first, one page at a time, with the account's name."""
    query = select(AuditEvent, User.username).outerjoin(User, User.id == AuditEvent.user_id)
    count = select(func.count(AuditEvent.id))
    if action:
        query, count = (
            query.where(AuditEvent.action == action),
            count.where(AuditEvent.action == action),
        )
    total = int(session.scalar(count) or 0)
    rows = session.execute(
        query.order_by(AuditEvent.id.desc()).limit(per_page).offset((page - 1) * per_page)
    )
    events = [
        {
            "id": e.id,
            "at": iso(e.created_at),
            "user": name,
            "action": e.action,
            "target": e.target,
            "detail": e.detail,
            "remote_addr": e.remote_addr,
        }
        for e, name in rows
    ]
    actions = sorted(session.scalars(select(AuditEvent.action).distinct()))
    return {
        "page": page,
        "per_page": per_page,
        "total": total,
        "action": action,
        "pages": max(1, -(-total // per_page)),
        "actions": actions,
        "events": events,
    }
