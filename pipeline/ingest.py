"""Ingest: validate, de-duplicate, persist, then enqueue.

The study row is committed before its task is sent (persist first, then enqueue), so a worker
never looks for a row that does not exist and a lost message can be re-sent from the database.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pipeline import imaging
from pipeline.db import session_scope
from pipeline.imaging import DecodedImage, Limits, RejectedInput
from pipeline.models import Image, Study, utcnow
from pipeline.queue import Dispatcher, delete_payloads, put_payload

log = logging.getLogger(__name__)


@dataclass
class IngestItem:
    path: str
    study_id: int | None
    image_id: int | None
    status: str
    reason: str | None = None
    duplicate: bool = False


@dataclass
class IngestReport:
    items: list[IngestItem] = field(default_factory=list)

    @property
    def accepted(self) -> list[IngestItem]:
        return [i for i in self.items if not i.duplicate and i.status != "rejected"]

    @property
    def duplicates(self) -> list[IngestItem]:
        return [i for i in self.items if i.duplicate]

    @property
    def rejected(self) -> list[IngestItem]:
        return [i for i in self.items if not i.duplicate and i.status == "rejected"]


def iter_input_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Yield files named directly, and files in folders (recursive) that look ingestible."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.name.startswith("."):
                    continue
                if child.suffix.lower() in imaging.ACCEPTED_SUFFIXES or _has_dicom_magic(child):
                    yield child
        else:
            yield path


def _has_dicom_magic(path: Path) -> bool:
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _study_fields(meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = {**meta, **{k: v for k, v in extra.items() if v not in (None, "")}}
    priority = merged.get("RequestedProcedurePriority") or merged.get("StudyPriorityID")
    return {
        "study_uid": merged.get("StudyInstanceUID"),
        "accession_number": merged.get("AccessionNumber"),
        "patient_id": merged.get("PatientID"),
        "patient_name": merged.get("PatientName"),
        "study_date": merged.get("StudyDate"),
        "requested_priority": (str(priority).upper() if priority else None),
    }


def _existing(session: Session, key: str, filename: str) -> IngestItem | None:
    found = session.scalars(select(Image).where(Image.dedup_key == key)).first()
    if found is None:
        return None
    return IngestItem(
        filename, found.study_id, found.id, found.status, found.reason, duplicate=True
    )


def record_rejection(
    session: Session, key: str, filename: str, reason: str, source: str, lane: str
) -> IngestItem:
    """Write a rejected study and image with the reason (not committed); dedup first."""
    existing = _existing(session, key, filename)
    if existing is not None:
        return existing
    now = utcnow()
    study = Study(source=source, lane=lane, status="rejected", reason=reason, done_at=now)
    session.add(study)
    session.flush()
    image = Image(study_id=study.id, dedup_key=key, filename=filename[-255:], kind="unknown",
                  status="rejected", reason=reason, done_at=now)  # fmt: skip
    session.add(image)
    session.flush()
    return IngestItem(filename, study.id, image.id, "rejected", reason)


def _file_key(path: Path) -> str:
    """Content-hash dedup key of a file, read in chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def persist_file(
    session: Session,
    data: bytes,
    filename: str,
    limits: Limits,
    source: str = "cli",
    lane: str = "live",
    extra_meta: dict[str, Any] | None = None,
) -> IngestItem:
    """Decode one file and write its study and image rows (not committed); dedup first."""
    extra_meta = extra_meta or {}
    decoded: DecodedImage | None = None
    try:
        decoded = imaging.decode_bytes(data, filename, limits)
        key, reason = decoded.dedup_key, None
    except RejectedInput as exc:
        key, reason = imaging.content_key(data), str(exc)
    existing = _existing(session, key, filename)
    if existing is not None:
        return existing
    if decoded is None:
        return record_rejection(session, key, filename, reason or "rejected", source, lane)
    fields = _study_fields(decoded.meta, extra_meta)
    study: Study | None = None
    if fields["study_uid"]:
        study = session.scalars(select(Study).where(Study.study_uid == fields["study_uid"])).first()
    if study is None:
        study = Study(source=source, lane=lane, status="queued", **fields)
        session.add(study)
        session.flush()
    status, reason = "queued", None
    if decoded.is_lateral:
        status = "skipped"
        reason = f"lateral view ({decoded.meta.get('ViewPosition')}): the model reads frontal films"
    meta = decoded.meta
    image = Image(
        study_id=study.id,
        dedup_key=key,
        filename=filename[-255:],
        kind=decoded.kind,
        sop_uid=meta.get("SOPInstanceUID"),
        series_uid=meta.get("SeriesInstanceUID"),
        modality=meta.get("Modality"),
        view_position=meta.get("ViewPosition"),
        body_part=meta.get("BodyPartExamined"),
        width=decoded.width,
        height=decoded.height,
        meta=meta,
        preview=imaging.encode_preview(decoded.pixels),
        status=status,
        reason=reason,
        queued_at=utcnow() if status == "queued" else None,
        done_at=utcnow() if status == "skipped" else None,
    )
    session.add(image)
    session.flush()
    if status == "queued":
        if study.status != "processing":
            study.status, study.done_at = "queued", None
    elif not _has_other_work(session, study.id, image.id):
        # The study's only images are skipped: it is final now, not waiting for a worker.
        study.status, study.reason, study.done_at = status, reason, utcnow()
    return IngestItem(filename, study.id, image.id, status, reason)


def _has_other_work(session: Session, study_id: int, image_id: int) -> bool:
    """True when another image of the study is waiting, running or done."""
    found = session.scalars(
        select(Image.id).where(
            Image.study_id == study_id,
            Image.id != image_id,
            Image.status.in_(("received", "queued", "processing", "done")),
        )
    ).first()
    return found is not None


def ingest_bytes(
    factory: sessionmaker[Session],
    data: bytes,
    filename: str,
    limits: Limits,
    **kwargs: Any,
) -> IngestItem:
    """Persist one file in its own transaction; a concurrent duplicate is reported as such."""
    session = factory()
    try:
        item = persist_file(session, data, filename, limits, **kwargs)
        session.commit()
        return item
    except IntegrityError:
        session.rollback()
        key_item = persist_file(session, data, filename, limits, **kwargs)
        session.commit()
        return key_item
    finally:
        session.close()


def enqueue(
    factory: sessionmaker[Session],
    redis_client: Any,
    dispatcher: Dispatcher,
    image_ids: list[int],
    input_size: int,
    ttl_s: int,
    lane: str = "live",
) -> int:
    """Put each image's model input in Redis, then send its task; return how many were sent."""
    if not image_ids:
        return 0
    session = factory()
    try:
        rows = session.execute(select(Image.id, Image.preview).where(Image.id.in_(image_ids))).all()
    finally:
        session.close()
    ready = []
    for image_id, preview in rows:
        if preview is None:
            continue
        put_payload(redis_client, image_id, imaging.model_input(preview, input_size), ttl_s)
        ready.append(image_id)
    try:
        return dispatcher.send(ready, lane=lane)
    except Exception:
        # Without its message a payload would make the reconciler think the image is waiting.
        delete_payloads(redis_client, ready)
        raise


def ingest_paths(
    factory: sessionmaker[Session],
    paths: Iterable[Path],
    limits: Limits,
    source: str = "cli",
    lane: str = "live",
    sink: Callable[[list[int]], object] | None = None,
    chunk: int = 16,
) -> IngestReport:
    """Persist every file under paths; unreadable files are rejected, never fatal.

    With a sink, queued image ids are handed to it every ``chunk`` accepted files, so the
    workers start on the first studies while later ones are still being read.
    """
    report = IngestReport()
    pending: list[int] = []

    def flush() -> None:
        nonlocal sink
        if sink is not None and pending:
            try:
                sink(list(pending))
            except Exception as exc:
                # The rows are committed as queued: the reconciler sends them later.
                log.warning("could not send work (%s); it stays queued", type(exc).__name__)
                sink = None
        pending.clear()

    for path in iter_input_files(paths):
        try:
            size = path.stat().st_size
            if size > limits.max_bytes:
                # Recorded on a study like any bad input, without reading the file into memory.
                reason = (f"the file is {size / 1e6:.1f} MB, "
                          f"over the {limits.max_bytes / 1e6:.0f} MB limit")  # fmt: skip
                with session_scope(factory) as session:
                    item = record_rejection(session, _file_key(path), path.name, reason,
                                            source, lane)  # fmt: skip
                item.path = str(path)
                report.items.append(item)
                continue
            data = path.read_bytes()
        except OSError:
            # Nothing can be read, so nothing identifies it for dedup: reported, not stored.
            reason = "the file cannot be read"
            report.items.append(IngestItem(str(path), None, None, "rejected", reason))
            continue
        item = ingest_bytes(factory, data, path.name, limits, source=source, lane=lane)
        item.path = str(path)
        report.items.append(item)
        if item.status == "queued" and not item.duplicate and item.image_id is not None:
            pending.append(item.image_id)
            if len(pending) >= chunk:
                flush()
    flush()
    log.info(
        "ingested %d files: %d accepted, %d duplicates, %d rejected",
        len(report.items),
        len(report.accepted),
        len(report.duplicates),
        len(report.rejected),
    )
    return report
