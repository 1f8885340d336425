"""A study's state and priority, derived from its images."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from pipeline import triage
from pipeline.models import Image, Prediction, Study, as_utc, utcnow


def refresh_study(session: Session, study: Study, thresholds: Mapping[str, float]) -> None:
    """Recompute a study's status, label, p_abnormal and priority from its images."""
    images = list(session.scalars(select(Image).where(Image.study_id == study.id)))
    statuses = [img.status for img in images]
    if any(s in ("received", "queued", "processing") for s in statuses):
        study.status = "processing" if "processing" in statuses else "queued"
        return
    scored: list[tuple[float, Prediction]] = []
    for img in images:
        if img.status != "done":
            continue
        pred = session.scalars(
            select(Prediction)
            .where(Prediction.image_id == img.id)
            .order_by(Prediction.created_at.desc())
        ).first()
        if pred is not None:
            scored.append((pred.p_abnormal, pred))
    if scored:
        p, top = max(scored, key=lambda pair: pair[0])
        study.status = "done"
        study.reason = None
        study.p_abnormal = p
        study.label = top.label
        study.model_version = top.model_version
        study.triage_class = triage.triage_class(p, thresholds)
        study.priority = triage.priority_score(p, thresholds, study.requested_priority)
        study.done_at = study.done_at or utcnow()
        return
    for final in ("failed", "skipped", "rejected"):
        if final in statuses:
            study.status = final
            study.reason = next(img.reason for img in images if img.status == final)
            study.done_at = study.done_at or utcnow()
            return


def open_image_count(session: Session, image_ids: list[int]) -> int:
    """How many of these images are still queued or being processed."""
    query = select(func.count(Image.id)).where(
        Image.id.in_(image_ids), Image.status.in_(("received", "queued", "processing"))
    )
    return int(session.scalar(query) or 0)


def worklist_query(limit: int | None = None, offset: int = 0) -> Select[Study]:
    """Studies by priority desc (unscored last), then arrival asc."""
    unscored_last = func.coalesce(Study.priority, -1.0)
    query = select(Study).order_by(unscored_last.desc(), Study.received_at.asc(), Study.id.asc())
    if limit:
        query = query.limit(limit).offset(offset)
    return query


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC; SQLite hands back naive datetimes that are UTC by construction."""
    if dt is None:
        return None
    return as_utc(dt).astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def study_summary(study: Study) -> dict[str, object]:
    """The stable JSON form of a study used by the CLI and the API (no patient name)."""
    return {
        "id": study.id,
        "status": study.status,
        "reason": study.reason,
        "label": study.label,
        "p_abnormal": None if study.p_abnormal is None else round(study.p_abnormal, 4),
        "triage_class": study.triage_class,
        "priority": study.priority,
        "accession_number": study.accession_number,
        "requested_priority": study.requested_priority,
        "model_version": study.model_version,
        "received_at": iso(study.received_at),
        "done_at": iso(study.done_at),
    }


def worklist_document(
    session: Session, model: Mapping[str, object], limit: int | None
) -> dict[str, Any]:
    """The worklist JSON shared by ``cxr-triage worklist --json`` and ``GET /api/worklist``."""
    studies = session.scalars(worklist_query(limit)).all()
    return {
        "model": {"version": model["version"], "trained": model["trained"]},
        "studies": [study_summary(s) for s in studies],
    }
