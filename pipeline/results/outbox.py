"""Persist, then send: what must leave the system, for whom.

``queue_results`` is a reconciler pass over the database, so it cannot miss a study: every
``done`` study (finished after a destination was added) that has no result objects for its
current model and films gets them (an SR, one capture per scored DICOM film, an alert when
critical), each with its SOP Instance UID fixed once, and one ``outbox`` row per destination
that wants it. Senders then take the rows under a lease (``pipeline.results.claims``).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.db import session_scope
from pipeline.models import AuditEvent, Image, Study, as_utc
from pipeline.results.destinations import ALERT_KINDS, PACS_KINDS
from pipeline.results.snapshots import ModelInfo, alert_snapshot, scored_images, study_snapshot
from pipeline.states import ObjectState, State
from pipeline.tables_results import Destination, OutboxItem, ResultObject

log = logging.getLogger(__name__)

NOT_DICOM = "a JPEG/PNG study has no DICOM study in the PACS to return results to"


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


def _study_objects(session: Session, study: Study, model: ModelInfo) -> None:
    scored = scored_images(session, study)
    mv = study.model_version or "?"
    key = f"sr:{study.id}:{mv}:{len([1 for _ in scored])}"
    # The SR row's own fields, whether it is skipped (a JPEG/PNG study) or made.
    sr: dict[str, Any] = {
        "study_id": study.id,
        "kind": "sr",
        "key": key,
        "model_version": mv,
        "images": len(scored),
    }
    dicom = [
        (img, pred)
        for img, pred in scored
        if img.kind == "dicom" and img.sop_uid and img.series_uid
    ]
    if not study.study_uid or not dicom:
        session.add(
            ResultObject(
                **sr, uid=f"skipped-{key}"[:64], status=ObjectState.SKIPPED, reason=NOT_DICOM
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
    snapshot = study_snapshot(session, study, dicom, model, sc_uids)
    session.add(ResultObject(**sr, uid=str(generate_uid()), snapshot=snapshot))
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
    snapshot = alert_snapshot(study, model)
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
