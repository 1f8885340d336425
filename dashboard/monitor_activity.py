"""Monitoring over time as plain functions returning dicts: waits, throughput, latency, audit log."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import AuditEvent, Image, Review, Study, User, as_utc
from pipeline.queue.rerun import requeueable_image_ids
from pipeline.states import ACTIVE_STATES, State
from pipeline.triage.studies import iso

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
