"""Persist, then send: what must leave the system, for whom, and whether it has.

``queue_results`` is a reconciler pass over the database, so it cannot miss a study: every
``done`` study (finished after a destination was added) that has no result objects for its
current model and films gets them (an SR, one capture per scored DICOM film, an alert when
critical), each with its SOP Instance UID fixed once, and one ``outbox`` row per destination
that wants it. ``claim_due`` hands rows to a sender under a lease; ``renew`` extends it while
the sender works through them; ``record`` writes the outcome. Each claim increments the row's
``attempts``, which fences it: a sender whose lease lapsed and whose row was claimed again by
another can neither renew nor record it. A row that was sent is never picked again; one whose
sender died before recording is picked again when its lease ends and the SAME object (same
UID, same bytes) is sent again, which a PACS stores as the instance it already has.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.imaging.cam_place import snapshot_fields
from pipeline.models import (
    AuditEvent,
    Destination,
    Image,
    OutboxItem,
    Prediction,
    ResultObject,
    Study,
    as_utc,
    utcnow,
)
from pipeline.results.destinations import ALERT_KINDS, PACS_KINDS
from pipeline.states import ObjectState, OutboxState, State
from pipeline.triage import score as triage

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 600.0
LEASE_S = 120.0  # the default lease of a claim (CXR_OUTBOX_LEASE_S)
MAX_REJECTIONS = 5  # a destination that answers "no" this many times: failed, resend by hand
NOT_DICOM = "a JPEG/PNG study has no DICOM study in the PACS to return results to"
PATIENT_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "IssuerOfPatientID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def backoff_s(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones: 5, 10, 20 … 600."""
    return float(min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)))


def policy(model: dict[str, Any], temperature: float | None) -> tuple[str, list[str]]:
    """The ranking policy in force: a version string and its parameters in words.

    Today the policy is the weights' thresholds and temperature plus the fixed score bands
    and STAT boost of ``pipeline.triage.score``; its version is a digest of exactly those.
    """
    thresholds = model.get("thresholds") or {}
    doc = {
        "thresholds": thresholds,
        "temperature": temperature,
        "bands": triage.BANDS,
        "stat_boost": triage.STAT_BOOST,
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
    params = [
        f"{name} >= {thresholds[name]:.4f}"
        for name in ("critical", "urgent", "routine")
        if name in thresholds
    ]
    if temperature is not None:
        params.append(f"temperature {temperature:.3f}")
    params.append(f"STAT boost +{triage.STAT_BOOST:g}")
    return f"{model.get('version')}/policy-{digest}", params


@dataclass
class ModelInfo:
    """The model the sender knows: its version, name and ranking policy."""

    version: str
    name: str
    policy_version: str
    policy_parameters: list[str]
    weights: Path | None = None  # the file the settings name: where its CAMs lie on a film


def _n_done() -> Any:
    return (
        select(func.count(Image.id))
        .where(Image.study_id == Study.id, Image.status == State.DONE)
        .scalar_subquery()
    )


def queue_results(
    factory: sessionmaker[Session],
    model: ModelInfo,
    limit: int = 200,
    kinds: tuple[str, ...] = PACS_KINDS + ALERT_KINDS,
    done_since: datetime | None = None,
) -> dict[str, int]:
    """Create the result objects and outbox rows still owed to destinations of these
    ``kinds``; return counts.

    ``done_since`` limits the search to studies finished since then (the sender's frequent
    passes; its full pass, at start and every few minutes, has none), so a pass costs what
    recent work costs, not the whole history.

    Each study's objects are made in a transaction of their own: a concurrent sender that
    made them first wins (unique keys), and this one moves on.
    """
    counts = {"studies": 0, "alerts": 0, "outbox": 0}
    with session_scope(factory) as session:
        dests = list(
            session.scalars(
                select(Destination).where(
                    Destination.enabled.is_(True), Destination.kind.in_(kinds)
                )
            )
        )
        pacs = [d for d in dests if d.kind in PACS_KINDS]
        alerts = [d for d in dests if d.kind in ALERT_KINDS]
        owe_sr: list[int] = []
        owe_alert: list[int] = []
        if pacs:
            has_sr = exists().where(
                ResultObject.study_id == Study.id,
                ResultObject.kind == "sr",
                ResultObject.model_version == Study.model_version,
                ResultObject.images == _n_done(),
            )
            since = min(as_utc(d.created_at) for d in pacs)
            since = max(since, done_since) if done_since else since
            owe_sr = list(
                session.scalars(
                    select(Study.id)
                    .where(Study.status == State.DONE, Study.done_at >= since, ~has_sr)
                    .order_by(Study.done_at)
                    .limit(limit)
                )
            )
        if alerts:
            has_alert = exists().where(
                ResultObject.study_id == Study.id,
                ResultObject.kind == "alert",
                ResultObject.model_version == Study.model_version,
            )
            since = min(as_utc(d.created_at) for d in alerts)
            since = max(since, done_since) if done_since else since
            owe_alert = list(
                session.scalars(
                    select(Study.id)
                    .where(
                        Study.status == State.DONE,
                        Study.triage_class == "critical",
                        Study.done_at >= since,
                        ~has_alert,
                    )
                    .order_by(Study.done_at)
                    .limit(limit)
                )
            )
        dest_ids = [d.id for d in dests]
    for study_id in owe_sr:
        counts["studies"] += _guarded(factory, study_id, model, _study_objects)
    for study_id in owe_alert:
        counts["alerts"] += _guarded(factory, study_id, model, _alert_object)
    for dest_id in dest_ids:
        try:
            with session_scope(factory) as session:
                dest = session.get(Destination, dest_id)
                counts["outbox"] += _fan_out(session, dest) if dest is not None else 0
        except IntegrityError:
            log.info("outbox rows of destination %d were made by another sender", dest_id)
    return counts


def _guarded(factory: sessionmaker[Session], study_id: int, model: ModelInfo, make: Any) -> int:
    try:
        with session_scope(factory) as session:
            study = session.get(Study, study_id)
            if study is None or study.status != State.DONE:
                return 0
            make(session, study, model)
        return 1
    except IntegrityError:
        return 0


def _scored(session: Session, study: Study) -> list[tuple[Image, Prediction]]:
    images = session.scalars(
        select(Image)
        .where(Image.study_id == study.id, Image.status == State.DONE)
        .order_by(Image.id)
    )
    out = []
    for img in images:
        pred = session.scalars(
            select(Prediction)
            .where(Prediction.image_id == img.id, Prediction.model_version == study.model_version)
            .order_by(Prediction.id.desc())
            .limit(1)
        ).first()
        if pred is not None:
            out.append((img, pred))
    return out


def _snapshot(
    session: Session,
    study: Study,
    scored: list[tuple[Image, Prediction]],
    model: ModelInfo,
    sc_uids: dict[int, str],
) -> dict[str, Any]:
    patient = patient_of(study, scored[0][0].meta or {})
    known = model.version == study.model_version
    return {
        "study_instance_uid": study.study_uid,
        "patient": patient,
        "p_abnormal": float(study.p_abnormal or 0.0),
        "triage_class": study.triage_class,
        "label": study.label,
        "priority": float(study.priority or 0.0),
        "accession_number": study.accession_number,
        "requested_priority": study.requested_priority,
        "model_version": study.model_version,
        "model_name": model.name,
        "policy_version": model.policy_version if known else "unknown",
        "policy_parameters": model.policy_parameters
        if known
        else [f"ranked by model {study.model_version}, not the one loaded now"],
        "content_datetime": utcnow().replace(microsecond=0, tzinfo=None).isoformat(),
        "images": [
            {
                "image_id": img.id,
                "sop_class_uid": (img.meta or {}).get("SOPClassUID")
                or "1.2.840.10008.5.1.4.1.1.1.1",
                "sop_instance_uid": img.sop_uid,
                "series_instance_uid": img.series_uid,
                "p_abnormal": float(pred.p_abnormal),
                "label": pred.label,
                "sc_uid": sc_uids.get(img.id),
                "view_position": img.view_position,
                **snapshot_fields(session, img, pred, model.weights),
            }
            for img, pred in scored
        ],
    }


def patient_of(study: Study, header: dict[str, Any]) -> dict[str, str]:
    """The patient and study attributes results carry: the first film's header, then the
    study row's for what the header lacks."""
    patient = {k: str(header[k]) for k in PATIENT_KEYS if header.get(k)}
    for key, value in (
        ("AccessionNumber", study.accession_number),
        ("PatientID", study.patient_id),
        ("PatientName", study.patient_name),
        ("StudyDate", study.study_date),
    ):
        if value and key not in patient:
            patient[key] = value
    return patient


def _study_objects(session: Session, study: Study, model: ModelInfo) -> None:
    scored = _scored(session, study)
    mv = study.model_version or "?"
    key = f"sr:{study.id}:{mv}:{len([1 for _ in scored])}"
    dicom = [
        (img, pred)
        for img, pred in scored
        if img.kind == "dicom" and img.sop_uid and img.series_uid
    ]
    if not study.study_uid or not dicom:
        session.add(
            ResultObject(
                study_id=study.id,
                kind="sr",
                key=key,
                model_version=mv,
                images=len(scored),
                uid=f"skipped-{key}"[:64],
                status=ObjectState.SKIPPED,
                reason=NOT_DICOM,
            )
        )
        session.flush()
        return
    sc_uids: dict[int, str] = {}
    new_sc = []
    for img, _ in dicom:
        found = session.scalars(
            select(ResultObject).where(ResultObject.key == f"sc:{img.id}:{mv}")
        ).first()
        if found is not None:
            sc_uids[img.id] = found.uid
        else:
            sc_uids[img.id] = str(generate_uid())
            new_sc.append(img)
    snapshot = _snapshot(session, study, dicom, model, sc_uids)
    session.add(
        ResultObject(
            study_id=study.id,
            kind="sr",
            key=key,
            model_version=mv,
            images=len(scored),
            uid=str(generate_uid()),
            snapshot=snapshot,
        )
    )
    for img in new_sc:
        session.add(
            ResultObject(
                study_id=study.id,
                image_id=img.id,
                kind="sc",
                key=f"sc:{img.id}:{mv}",
                model_version=mv,
                images=1,
                uid=sc_uids[img.id],
                snapshot=snapshot,
            )
        )
    session.flush()


def _alert_object(session: Session, study: Study, model: ModelInfo) -> None:
    mv = study.model_version or "?"
    known = model.version == study.model_version
    snapshot = {
        "accession_number": study.accession_number,
        "study_instance_uid": study.study_uid,
        "triage_class": study.triage_class,
        "priority": float(study.priority or 0.0),
        "requested_priority": study.requested_priority,
        "p_abnormal": float(study.p_abnormal or 0.0),
        "model_version": study.model_version,
        "policy_version": model.policy_version if known else "unknown",
        "study_id": study.id,
        "created_at": utcnow().replace(microsecond=0, tzinfo=None).isoformat() + "Z",
    }
    uid = str(generate_uid())
    session.add(
        ResultObject(
            study_id=study.id,
            kind="alert",
            key=f"alert:{study.id}:{mv}",
            model_version=mv,
            uid=uid,
            snapshot=snapshot,
        )
    )
    session.flush()  # the unique key first: a concurrent sender's duplicate fails here
    session.add(
        AuditEvent(
            action="alert_raised",
            target=f"study:{study.id}",
            detail=f"critical, priority {snapshot['priority']:.1f}, model {mv}, event {uid}",
        )
    )


def _fan_out(session: Session, dest: Destination) -> int:
    """Outbox rows for the objects this destination wants and does not have yet."""
    if dest.kind in ALERT_KINDS:
        kinds = ["alert"]
    else:
        kinds = [k for k, on in (("sr", dest.want_sr), ("sc", dest.want_sc)) if on]
    if not kinds:
        return 0
    owed = exists().where(
        OutboxItem.object_id == ResultObject.id, OutboxItem.destination_id == dest.id
    )
    ids = session.scalars(
        select(ResultObject.id)
        .where(
            ResultObject.status == ObjectState.READY,
            ResultObject.kind.in_(kinds),
            ResultObject.created_at >= as_utc(dest.created_at),
            ~owed,
        )
        .order_by(ResultObject.id)
    ).all()
    session.add_all(OutboxItem(object_id=o, destination_id=dest.id) for o in ids)
    session.flush()
    return len(ids)


# --------------------------------------------------------------------------- sending


def claim_due(
    session: Session,
    limit: int = 50,
    now: datetime | None = None,
    kinds: tuple[str, ...] | None = None,
    lease_s: float = LEASE_S,
) -> dict[int, int]:
    """Take due rows (pending and due, or a lapsed claim) of enabled destinations (of these
    ``kinds``) under a lease; return ``{row id: attempts}``, the fence of each claim.

    The UPDATE re-checks "due" on each row it writes, so of two senders selecting the same
    rows at once only one claims each (PostgreSQL re-evaluates the condition on the row the
    first committed; SQLite serialises the writers).
    """
    now = now or utcnow()
    due = or_(
        and_(OutboxItem.status == OutboxState.PENDING, OutboxItem.next_attempt_at <= now),
        and_(OutboxItem.status == OutboxState.SENDING, OutboxItem.claimed_until < now),
    )
    enabled = select(Destination.id).where(Destination.enabled.is_(True))
    if kinds is not None:
        enabled = enabled.where(Destination.kind.in_(kinds))
    ids = session.scalars(
        select(OutboxItem.id)
        .where(due, OutboxItem.destination_id.in_(enabled))
        .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
        .limit(limit)
    ).all()
    if not ids:
        return {}
    rows = session.execute(
        update(OutboxItem)
        .where(OutboxItem.id.in_(ids), due)
        .values(
            status=OutboxState.SENDING,
            claimed_until=now + timedelta(seconds=lease_s),
            attempts=OutboxItem.attempts + 1,
        )
        .returning(OutboxItem.id, OutboxItem.attempts)
        .execution_options(synchronize_session=False)
    ).all()
    return {int(r[0]): int(r[1]) for r in sorted(rows)}


def renew(
    session: Session, claims: dict[int, int], lease_s: float = LEASE_S, now: datetime | None = None
) -> int:
    """Extend the lease of claims still held (same attempt, still sending); return how many."""
    if not claims:
        return 0
    now = now or utcnow()
    held = or_(*(and_(OutboxItem.id == i, OutboxItem.attempts == a) for i, a in claims.items()))
    moved = session.execute(
        update(OutboxItem)
        .where(held, OutboxItem.status == OutboxState.SENDING)
        .values(claimed_until=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return int(moved.rowcount)  # type: ignore[attr-defined]


@dataclass
class Outcome:
    """How one send went: ok, or an error that is ``transient`` (retry) or a rejection."""

    ok: bool
    error: str | None = None
    transient: bool = True


def record(
    session: Session,
    item_id: int,
    outcome: Outcome,
    now: datetime | None = None,
    attempt: int | None = None,
) -> str:
    """Write a send's outcome on its row and its destination; return the new status.

    With ``attempt`` (the claim's fence), a row claimed again since is left alone ("gone").
    A delivered or given-up alert is audited.
    """
    now = now or utcnow()
    item = session.get(OutboxItem, item_id, with_for_update=True)
    if (
        item is None
        or item.status != OutboxState.SENDING
        or (attempt is not None and item.attempts != attempt)
    ):
        return "gone"
    dest = session.get(Destination, item.destination_id)
    obj = session.get(ResultObject, item.object_id)
    where = f"{dest.kind} destination {dest.name!r}" if dest is not None else "a destination"
    if outcome.ok:
        item.status, item.sent_at, item.last_error, item.claimed_until = (
            OutboxState.SENT,
            now,
            None,
            None,
        )
        if dest is not None:
            dest.last_ok_at = now
        if obj is not None and obj.kind == "alert":
            session.add(
                AuditEvent(
                    action="alert_sent",
                    target=f"study:{obj.study_id}",
                    detail=f"event {obj.uid} delivered to {where}, attempt {item.attempts}",
                )
            )
        return OutboxState.SENT
    item.last_error = (outcome.error or "failed")[:2000]
    item.claimed_until = None
    if dest is not None:
        dest.last_error, dest.last_error_at = item.last_error, now
    if not outcome.transient and item.attempts >= MAX_REJECTIONS:
        item.status = OutboxState.FAILED
        if obj is not None and obj.kind == "alert":
            session.add(
                AuditEvent(
                    action="alert_failed",
                    target=f"study:{obj.study_id}",
                    detail=f"event {obj.uid} refused by {where} "
                    f"{item.attempts} times: {item.last_error}"[:2000],
                )
            )
    else:
        item.status = OutboxState.PENDING
        item.next_attempt_at = now + timedelta(seconds=backoff_s(item.attempts))
    return item.status


def resend(session: Session, item_id: int) -> bool:
    """Queue one row again now (an admin's resend): same object, same UID."""
    moved = session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item_id, OutboxItem.status != OutboxState.SENDING)
        .values(status=OutboxState.PENDING, next_attempt_at=utcnow(), claimed_until=None)
        .execution_options(synchronize_session=False)
    )
    return bool(moved.rowcount)  # type: ignore[attr-defined]


def retry_now(session: Session, destination_id: int) -> int:
    """Make every waiting row of a destination due now (it is back; skip the backoff)."""
    moved = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.destination_id == destination_id,
            OutboxItem.status.in_((OutboxState.PENDING, OutboxState.FAILED)),
        )
        .values(status=OutboxState.PENDING, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(moved.rowcount)  # type: ignore[attr-defined]


def destination_states(session: Session) -> list[dict[str, Any]]:
    """Per destination: counts by status, oldest waiting, last success and last error."""
    from pipeline.results.destinations import describe
    from pipeline.triage.studies import iso

    counts: dict[int, dict[str, int]] = {}
    for dest_id, status, n in session.execute(
        select(OutboxItem.destination_id, OutboxItem.status, func.count(OutboxItem.id)).group_by(
            OutboxItem.destination_id, OutboxItem.status
        )
    ):
        counts.setdefault(dest_id, {})[status] = int(n)
    oldest = dict(
        session.execute(
            select(OutboxItem.destination_id, func.min(OutboxItem.created_at))
            .where(OutboxItem.status.in_((OutboxState.PENDING, OutboxState.SENDING)))
            .group_by(OutboxItem.destination_id)
        ).all()
    )
    out = []
    for dest in session.scalars(select(Destination).order_by(Destination.id)):
        by = {s: counts.get(dest.id, {}).get(s, 0) for s in OutboxState}
        waiting = oldest.get(dest.id)
        state = (
            "disabled"
            if not dest.enabled
            else (
                "failing"
                if dest.last_error_at
                and (not dest.last_ok_at or as_utc(dest.last_error_at) > as_utc(dest.last_ok_at))
                else "ok"
            )
        )
        out.append(
            {
                **describe(dest),
                "state": state,
                "counts": by,
                "oldest_waiting": iso(waiting),
                "last_ok_at": iso(dest.last_ok_at),
                "last_error": dest.last_error,
                "last_error_at": iso(dest.last_error_at),
            }
        )
    return out


def recent_items(session: Session, destination_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The latest rows of one destination, for the console's resend buttons."""
    from pipeline.triage.studies import iso

    rows = session.execute(
        select(OutboxItem, ResultObject)
        .join(ResultObject, ResultObject.id == OutboxItem.object_id)
        .where(OutboxItem.destination_id == destination_id)
        .order_by(OutboxItem.id.desc())
        .limit(limit)
    ).all()
    return [
        {
            "id": item.id,
            "study_id": obj.study_id,
            "kind": obj.kind,
            "uid": obj.uid,
            "status": item.status,
            "attempts": item.attempts,
            "last_error": item.last_error,
            "sent_at": iso(item.sent_at),
            "next_attempt_at": iso(item.next_attempt_at),
        }
        for item, obj in rows
    ]
