"""Write the study, image and instance rows of decoded files (not committed), de-duplicated."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.imaging.decode import DecodedImage, Limits
from pipeline.imaging.header import storable_name
from pipeline.ingest.prepare import Prepared, prepare, study_fields
from pipeline.models import Image, Study, utcnow
from pipeline.profiling import STAGES
from pipeline.states import ACTIVE_STATES, State
from pipeline.store import instances
from pipeline.store.capture import capture
from pipeline.store.instances import InstanceStore


@dataclass
class IngestItem:
    path: str
    study_id: int | None
    image_id: int | None
    status: str
    reason: str | None = None
    duplicate: bool = False
    # Why it was rejected, as a code (imaging.RejectedInput.code); None unless rejected.
    code: str | None = None
    # The stored preview of a newly queued image, kept so enqueueing need not read it back.
    preview: bytes | None = field(default=None, repr=False, compare=False)


def _code(image: Any) -> str | None:
    """A rejected image's code, as recorded with it (an Image or a row with status and meta)."""
    if image.status != State.REJECTED:
        return None
    return str((image.meta or {}).get("rejection") or "unreadable")


def _duplicate_of(filename: str, found: Any) -> IngestItem:
    """The item of a file whose image is stored already (an Image, or a row of its columns)."""
    return IngestItem(
        filename,
        found.study_id,
        found.id,
        found.status,
        found.reason,
        duplicate=True,
        code=_code(found),
    )


def _rejected_rows(
    key: str, filename: str, reason: str, source: str, lane: str, code: str, now: datetime
) -> tuple[Study, Image]:
    """A rejected study and its image, with the reason and the rejection code."""
    study = Study(source=source, lane=lane, status=State.REJECTED, reason=reason, done_at=now)
    image = Image(
        study=study,
        dedup_key=key,
        filename=storable_name(filename),
        kind="unknown",
        status=State.REJECTED,
        reason=reason,
        done_at=now,
        meta={"rejection": code},
    )
    return study, image


def record_rejection(
    session: Session,
    key: str,
    filename: str,
    reason: str,
    source: str,
    lane: str,
    code: str = "unreadable",
) -> IngestItem:
    """Write a rejected study and image with the reason (not committed); dedup first."""
    found = session.scalars(select(Image).where(Image.dedup_key == key)).first()
    if found is not None:
        return _duplicate_of(filename, found)
    study, image = _rejected_rows(key, filename, reason, source, lane, code, utcnow())
    session.add(image)
    session.flush()
    return IngestItem(filename, study.id, image.id, State.REJECTED, reason, code=code)


def persist_file(
    session: Session,
    data: bytes,
    filename: str,
    limits: Limits,
    source: str = "cli",
    lane: str = "live",
    extra_meta: dict[str, Any] | None = None,
    store: InstanceStore | None = None,
) -> IngestItem:
    """Decode one file and write its study and image rows (not committed); dedup first."""
    return persist_files(session, [(data, filename)], limits, source, lane, extra_meta, store)[0]


Plan = tuple[Prepared, Image | None, Study | None]


def persist_files(
    session: Session,
    files: list[tuple[bytes, str]],
    limits: Limits,
    source: str = "cli",
    lane: str = "live",
    extra_meta: dict[str, Any] | None = None,
    store: InstanceStore | None = None,
) -> list[IngestItem]:
    """Decode files and write their study and image rows (not committed), in order.

    The lot costs one dedup query, one study lookup and one flush (multi-row INSERTs),
    however many files it holds. A file already stored, or earlier in the lot, is reported as
    a duplicate of that image; images with one StudyInstanceUID share one study.

    With a ``store``, every accepted file is kept there as DICOM (``pipeline.store.instances``) before
    the rows are committed, and a study without a StudyInstanceUID is given one.
    """
    extra = extra_meta or {}
    prepared = [prepare(data, name, limits, extra) for data, name in files]
    if store is not None and any(p.decoded is not None for p in prepared):
        store.check_room(session)
    known = {
        row.dedup_key: row
        for row in session.execute(
            select(
                Image.id, Image.study_id, Image.status, Image.reason, Image.dedup_key, Image.meta
            ).where(Image.dedup_key.in_({p.key for p in prepared}))
        )
    }
    fields = [study_fields(p.decoded.meta, extra) if p.decoded else None for p in prepared]
    studies = _studies_by_uid(session, {f["study_uid"] for f in fields if f and f["study_uid"]})
    # dedup key -> the rows written for its first file in this lot
    written: dict[str, tuple[Image, Study]] = {}
    plans: list[Plan] = []
    now = utcnow()
    with session.no_autoflush:
        for p, f in zip(prepared, fields, strict=True):
            if p.key in known or p.key in written:
                plans.append((p, None, None))
                continue
            if store is not None and f is not None and not f["study_uid"]:
                f["study_uid"] = instances.derived_uid("study", p.key)
            if p.decoded is None or f is None:
                reason, code = p.reason or "rejected", p.code or "unreadable"
                study, image = _rejected_rows(p.key, p.filename, reason, source, lane, code, now)
            else:
                image, study = _new_image(p, p.decoded, f, studies, source, lane)
            session.add(image)
            written[p.key] = (image, study)
            plans.append((p, image, study))
    session.flush()
    if store is not None:
        _keep_instances(session, store, files, plans, fields)
    items = []
    for p, written_image, written_study in plans:
        if written_image is None or written_study is None:
            first = known[p.key] if p.key in known else written[p.key][0]
            items.append(_duplicate_of(p.filename, first))
        else:
            items.append(_settle(session, p, written_image, written_study))
    return items


def _studies_by_uid(session: Session, uids: set[str]) -> dict[str, Study]:
    """The stored study of each StudyInstanceUID: the oldest, as one lookup finds."""
    studies: dict[str, Study] = {}
    if uids:
        for found in session.scalars(
            select(Study).where(Study.study_uid.in_(uids)).order_by(Study.id)
        ):
            studies.setdefault(str(found.study_uid), found)
    return studies


def _settle(session: Session, p: Prepared, image: Image, study: Study) -> IngestItem:
    """Bring the study's state in line with its new image; the image's item."""
    if image.status == State.QUEUED:
        if study.status not in (State.PROCESSING, State.QUEUED):
            # A study that was final (its other images skipped) has work again.
            study.status, study.done_at = State.QUEUED, None
    elif image.status == State.SKIPPED and not _has_other_work(session, study.id, image.id):
        # The study's only images are skipped: it is final now, not waiting for a worker.
        study.status, study.reason, study.done_at = State.SKIPPED, image.reason, utcnow()
    item = IngestItem(p.filename, study.id, image.id, image.status, image.reason, code=_code(image))
    if image.status == State.QUEUED:
        item.preview = p.preview
    return item


def _keep_instances(
    session: Session,
    store: InstanceStore,
    files: list[tuple[bytes, str]],
    plans: list[Plan],
    fields: list[dict[str, Any] | None],
) -> None:
    """Keep each new accepted file in the instance store: DICOM as received, else a capture."""
    with STAGES.time("store", len(files)):
        for (data, _), (p, image, study), f in zip(files, plans, fields, strict=True):
            if image is None or study is None or p.decoded is None or f is None:
                continue  # a duplicate, or rejected: nothing new to keep
            if p.decoded.kind == "dicom":
                kind, dicom = "received", data
            else:
                kind = "capture"
                dicom = capture(data, p.decoded.kind, f, p.decoded.meta, p.key)
            instances.keep(session, store, study, image.id, kind, dicom, f["study_uid"])
    session.flush()


def _new_image(
    p: Prepared,
    decoded: DecodedImage,
    fields: dict[str, Any],
    studies: dict[str, Study],
    source: str,
    lane: str,
) -> tuple[Image, Study]:
    """The image row of a decoded file, and its study: found by UID, or new."""
    study = studies.get(fields["study_uid"]) if fields["study_uid"] else None
    if study is None:
        study = Study(source=source, lane=lane, status=State.QUEUED, **fields)
        if fields["study_uid"]:
            studies[fields["study_uid"]] = study
    reason = decoded.skip_reason  # lateral view or not a chest
    status = State.SKIPPED if reason else State.QUEUED
    meta = decoded.meta
    # A new study is inserted in the same flush; an existing one is referred to by id (no load
    # of its image collection).
    link: dict[str, Any] = {"study": study} if study.id is None else {"study_id": study.id}
    image = Image(
        **link,
        dedup_key=p.key,
        filename=storable_name(p.filename),
        kind=decoded.kind,
        sop_uid=meta.get("SOPInstanceUID"),
        series_uid=meta.get("SeriesInstanceUID"),
        modality=meta.get("Modality"),
        view_position=meta.get("ViewPosition"),
        body_part=meta.get("BodyPartExamined"),
        width=decoded.width,
        height=decoded.height,
        meta=meta,
        preview=p.preview,
        status=status,
        reason=reason,
        queued_at=utcnow() if status == State.QUEUED else None,
        done_at=utcnow() if status == State.SKIPPED else None,
    )
    return image, study


def _has_other_work(session: Session, study_id: int, image_id: int) -> bool:
    """True when another image of the study is waiting, running or done."""
    found = session.scalars(
        select(Image.id).where(
            Image.study_id == study_id,
            Image.id != image_id,
            Image.status.in_((*ACTIVE_STATES, State.DONE)),
        )
    ).first()
    return found is not None
