"""A study's state and priority, derived from its images; its JSON forms.

``worklist_document`` is the worklist JSON shared by ``cxr-triage worklist --json`` and
``GET /api/worklist``; the order and the filters are ``pipeline.triage.worklist``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, load_only

from pipeline.models import Image, Prediction, Study, as_utc, utcnow
from pipeline.states import ACTIVE_STATES, State
from pipeline.triage import score as triage
from pipeline.triage.filters import WorklistFilter
from pipeline.triage.worklist import worklist_count, worklist_page


def refresh_study(session: Session, study: Study, thresholds: Mapping[str, float]) -> None:
    """Recompute a study's status, label, p_abnormal and priority from its images."""
    refresh_studies(session, [study], thresholds)


def refresh_studies(
    session: Session, studies: Iterable[Study], thresholds: Mapping[str, float]
) -> None:
    """``refresh_study`` for many studies with three queries in all (a worker's batch).

    ``thresholds`` are the model's; the site's policy in force (pipeline.triage.policy) may set its
    own, and its STAT boost; each scored study records the policy version.
    """
    from pipeline.triage.policy import active

    by_id = {study.id: study for study in studies}
    if not by_id:
        return
    policy = active(session, who=False)
    images: dict[int, list[Image]] = {i: [] for i in by_id}
    # Only what _derive reads: a worker's batch refreshes its studies on every commit, and
    # whole rows would bring each image's header and each prediction's CAM along.
    query = (
        select(Image)
        .where(Image.study_id.in_(list(by_id)))
        .options(load_only(Image.id, Image.study_id, Image.status, Image.reason))
    )
    for img in session.scalars(query):
        images[img.study_id].append(img)
    done = [img.id for imgs in images.values() for img in imgs if img.status == State.DONE]
    latest: dict[int, Prediction] = {}
    if done:
        preds = (
            select(Prediction)
            .where(Prediction.image_id.in_(done))
            .options(
                load_only(
                    Prediction.id,
                    Prediction.image_id,
                    Prediction.created_at,
                    Prediction.p_abnormal,
                    Prediction.label,
                    Prediction.model_version,
                )
            )
            .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        )
        for pred in session.scalars(preds):
            latest.setdefault(pred.image_id, pred)
    for study_id, study in by_id.items():
        _derive(
            study,
            images[study_id],
            latest,
            policy.thresholds_for(thresholds),
            policy.stat_boost,
            policy.version,
            policy.temperature_scale,
        )


def _derive(
    study: Study,
    images: list[Image],
    latest: Mapping[int, Prediction],
    thresholds: Mapping[str, float],
    stat_boost: float = triage.STAT_BOOST,
    policy_version: int | None = None,
    temperature_scale: float = 1.0,
) -> None:
    statuses = [img.status for img in images]
    if any(s in ACTIVE_STATES for s in statuses):
        study.status = State.PROCESSING if State.PROCESSING in statuses else State.QUEUED
        return
    scored = [
        (latest[img.id].p_abnormal, latest[img.id])
        for img in images
        if img.status == State.DONE and img.id in latest
    ]
    if scored:
        p, top = max(scored, key=lambda pair: pair[0])
        study.status = State.DONE
        study.reason = None
        study.p_abnormal = p
        study.label = top.label
        study.model_version = top.model_version
        site_p = triage.rescale(p, temperature_scale)
        study.triage_class = triage.triage_class(site_p, thresholds)
        study.priority = triage.priority_score(
            site_p, thresholds, study.requested_priority, stat_boost=stat_boost
        )
        study.policy_version = policy_version
        study.done_at = study.done_at or utcnow()
        return
    for final in (State.FAILED, State.SKIPPED, State.REJECTED):
        if final in statuses:
            study.status = final
            study.reason = next(img.reason for img in images if img.status == final)
            study.done_at = study.done_at or utcnow()
            return


def open_image_count(session: Session, image_ids: list[int]) -> int:
    """How many of these images are still queued or being processed."""
    query = select(func.count(Image.id)).where(
        Image.id.in_(image_ids), Image.status.in_(ACTIVE_STATES)
    )
    return int(session.scalar(query) or 0)


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 in UTC; SQLite hands back naive datetimes that are UTC by construction."""
    if dt is None:
        return None
    return as_utc(dt).astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def study_summary(study: Study, reviewed: bool | None = None) -> dict[str, object]:
    """The stable JSON form of a study used by the CLI and the API (no patient name)."""
    doc: dict[str, object] = {
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
        "policy_version": study.policy_version,
        "received_at": iso(study.received_at),
        "done_at": iso(study.done_at),
    }
    if reviewed is not None:
        doc["reviewed"] = reviewed
    return doc


def worklist_document(
    session: Session,
    model: Mapping[str, object],
    limit: int | None,
    filters: WorklistFilter | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """The worklist JSON shared by ``cxr-triage worklist --json`` and ``GET /api/worklist``."""
    from pipeline.triage.reviews import reviewed_study_ids

    page = worklist_page(session, limit, offset, filters)
    reviewed = reviewed_study_ids(session, [s.id for s in page.studies])
    return {
        "model": {"version": model["version"], "trained": model["trained"]},
        "policy_version": page.policy_version,
        "total": worklist_count(session, filters),
        "offset": offset,
        "limit": limit,
        "studies": [
            {**study_summary(s, s.id in reviewed), "due": s.id in page.due} for s in page.studies
        ],
    }


def format_wait(seconds: float) -> str:
    """A waiting time as a radiologist says it: "45 min", "3 h 12 min", "2 d 5 h"."""
    minutes = max(0, int(seconds // 60))
    if minutes < 1:
        return "< 1 min"
    hours, mins = divmod(minutes, 60)
    if hours == 0:
        return f"{mins} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if days else f"{hours} h {mins} min"


def waiting_seconds(study: Study, now: datetime | None = None) -> float:
    """Seconds since the study arrived."""
    return ((now or utcnow()) - as_utc(study.received_at)).total_seconds()
